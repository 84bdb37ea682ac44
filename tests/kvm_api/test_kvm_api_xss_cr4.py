"""IA32_XSS / XCR0 writes and CPUID.(0xD,n).EBX; CR4.CET and CR0.WP rules (guest and
KVM_SET_SREGS) [SDM Vol. 1 ch. 13, SDM Vol. 3 §2.5, KVM vmx.c/x86.c]."""

from __future__ import annotations

import pytest
from conftest import long_mode_sregs, make_guest

from cetvm.arch import Cr4
from cetvm.kvm.api import KvmExitReason
from cetvm.kvm.errors import KvmIoctlError

GP = (13, 0)
# Sapphire Rapids sizes from SDM Vol. 1 ch. 13: legacy+header 576, AVX 256 @ 0x240, CET_U 16, CET_S 24.
LEGACY = 576


def test_guest_xss_and_xcr0_writes_change_cpuid_leaf_d():
    g = make_guest("xss_cpuid")
    assert g.vcpu.run(budget=1_000_000).exit_reason is KvmExitReason.HLT
    assert g.slot(0) == LEGACY                       # 0xD.1 EBX, XCR0 = x87, XSS = 0
    assert g.slot(1) == LEGACY + 16 + 24             # after WRMSR XSS = CET_U | CET_S
    assert g.slot(2) == 0x1800                       # PT write refused
    assert g.slot(3) == 0x240 + 256                  # 0xD.0 EBX with XCR0 = 7
    assert g.slot(4) == LEGACY + 256 + 16 + 24       # 0xD.1 EBX with XCR0 = 7, XSS = 0x1800
    assert g.slot(5) >> 27 & 1                       # OSXSAVE mirrors CR4
    assert g.log() == [GP, GP]                       # WRMSR XSS=PT, XSETBV AVX without SSE
    assert g.vcpu.get_xcrs() == [(0, 7)]
    assert dict(g.vcpu.get_msrs([0xDA0])) == {0xDA0: 0x1800}
    assert g.vcpu.get_cpuid2().get(0xD, 1)[1] == LEGACY + 256 + 16 + 24


def test_cr4_cet_rules_in_the_guest():
    g = make_guest("cr4_cet")
    g.vcpu.run(budget=1_000_000)
    assert g.log() == [GP, GP]          # CR4.CET without WP; clearing WP under CR4.CET
    assert not g.slot(0) & Cr4.CET
    assert g.slot(1) & Cr4.CET
    assert g.slot(2) & (1 << 16)        # WP stayed set


def test_cr4_cet_reserved_without_guest_cet():
    g = make_guest("cr4_cet", shstk=False, ibt=False)
    g.vcpu.run(budget=1_000_000)
    assert g.log() == [GP, GP]          # both CR4.CET attempts
    assert not g.slot(1) & Cr4.CET
    assert not g.slot(2) & (1 << 16)    # clearing WP is fine without CR4.CET


def test_set_sregs_checks_cr4_cet():
    g = make_guest("cr4_cet")
    g.vcpu.set_sregs(long_mode_sregs(cr4_extra=Cr4.CET))
    bad = long_mode_sregs(cr4_extra=Cr4.CET)
    bad.cr0 &= ~(1 << 16)
    with pytest.raises(KvmIoctlError, match="CR4.CET"):
        g.vcpu.set_sregs(bad)
    no_cet = make_guest("cr4_cet", shstk=False, ibt=False)
    with pytest.raises(KvmIoctlError):
        no_cet.vcpu.set_sregs(long_mode_sregs(cr4_extra=Cr4.CET))


@pytest.mark.parametrize("xsaves", [True, False])
def test_xsaves_follows_the_guest_cpuid(xsaves):
    """KVM enables XSAVES/XRSTORS in the VMCS only for a guest whose CPUID has XSAVES
    (vmx_secondary_exec_control); without it the guest's XSAVES is #UD although the host CPU has
    it [SDM Vol. 3 §26.3]."""
    g = make_guest("xsaves")
    cpuid = g.kvm.get_supported_cpuid()
    cpuid.set_feature("xsaves", xsaves)
    g.vcpu.set_cpuid(cpuid)
    assert g.vcpu.run(budget=1_000_000).exit_reason is KvmExitReason.HLT
    assert g.slot(0) == 1
    assert [vector for vector, _ in g.log()] == ([] if xsaves else [6])
