"""vCPU policy: CPUID runtime sizes, where CET state lives, ONE_REG, CR0/CR4 rules (KVM vmx.c/x86.c)."""

from __future__ import annotations

import errno

import pytest

from cetvm.arch import Cr0, Cr4, VmcsField
from cetvm.cpuid import get_model
from cetvm.kvm.caps import kvm_caps_for_host
from cetvm.kvm.cr import kvm_is_valid_sregs, kvm_set_cr0, kvm_set_cr4
from cetvm.kvm.errors import KvmIoctlError
from cetvm.kvm.host import Host
from cetvm.kvm.msr import MsrResult, get_one_reg, kvm_get_msr, kvm_set_msr, set_one_reg
from cetvm.kvm.vcpu import VcpuArch

GUEST_SSP_REG = 0x2030000300000000


@pytest.fixture(scope="module")
def caps():
    return kvm_caps_for_host(Host(get_model("sapphire-rapids")))


def vcpu_with(caps, shstk=True, ibt=True) -> VcpuArch:
    cpuid = caps.get_supported_cpuid()
    cpuid.set_feature("shstk", shstk)
    cpuid.set_feature("ibt", ibt)
    return VcpuArch.create(caps, cpuid)


def test_set_cpuid_accepts_shstk_without_ibt_and_derives_guest_xss(caps):
    cpuid = caps.get_supported_cpuid()
    cpuid.set_feature("ibt", False)
    _, ebx, _, edx = cpuid.get(0xD, 1)
    cpuid.set(0xD, 1, cpuid.get(0xD, 1)[0], ebx, 0x1900, edx)  # PT bit KVM does not support
    vcpu = VcpuArch.create(caps, cpuid)
    assert vcpu.cpuid.guest_cpu_cap_has("shstk") and not vcpu.cpuid.guest_cpu_cap_has("ibt")
    assert vcpu.cpuid.guest_supported_xss == 0x1800


def test_xss_write_recomputes_compacted_size(caps):
    """CPUID.(0xD,1).EBX = compacted size of XCR0 | XSS: 576 + CET_U 16 + CET_S 24 for XCR0=1."""
    vcpu = vcpu_with(caps)
    assert vcpu.cpuid.entries.get(0xD, 1)[1] == 576
    assert kvm_set_msr(vcpu, 0xDA0, 0x1800) is MsrResult.OK
    assert vcpu.cpuid.entries.get(0xD, 1)[1] == 576 + 16 + 24
    assert kvm_set_msr(vcpu, 0xDA0, 0x800) is MsrResult.OK
    assert vcpu.cpuid.entries.get(0xD, 1)[1] == 576 + 16  # 0x800 = CET_U only
    assert kvm_set_msr(vcpu, 0xDA0, 0x100) is MsrResult.GUEST_GP


def test_xstate_msrs_live_in_the_guest_fpu_and_load_it(caps):
    vcpu = vcpu_with(caps)
    loads = vcpu.fpu.loads
    assert kvm_set_msr(vcpu, 0x6A7, 0x7FFF_0000_1000) is MsrResult.OK  # PL3_SSP → CET_U +8
    assert kvm_set_msr(vcpu, 0x6A4, 0x7FFF_0000_2000) is MsrResult.OK  # PL0_SSP → CET_S +0
    assert vcpu.fpu.loads == loads + 2
    assert vcpu.fpu.xstate_bv & 0x1800 == 0x1800
    raw = bytes(vcpu.fpu.buffer)
    assert (0x7FFF_0000_1000).to_bytes(8, "little") in raw
    assert (0x7FFF_0000_2000).to_bytes(8, "little") in raw
    assert vcpu.vmcs.read(VmcsField.GUEST_SSP) == 0


def test_non_xstate_msrs_live_in_the_vmcs(caps):
    vcpu = vcpu_with(caps)
    loads = vcpu.fpu.loads
    assert kvm_set_msr(vcpu, 0x6A2, 0x5) is MsrResult.OK
    assert kvm_set_msr(vcpu, 0x6A8, 0x7FFF_0000_0003) is MsrResult.OK  # no alignment rule
    assert vcpu.vmcs.read(VmcsField.GUEST_S_CET) == 0x5
    assert vcpu.vmcs.read(VmcsField.GUEST_INTR_SSP_TABLE) == 0x7FFF_0000_0003
    assert vcpu.fpu.loads == loads


def test_one_reg_guest_ssp(caps):
    vcpu = vcpu_with(caps)
    set_one_reg(vcpu, GUEST_SSP_REG, 0x7FFF_0000_0FF8)
    assert get_one_reg(vcpu, GUEST_SSP_REG) == 0x7FFF_0000_0FF8
    assert vcpu.vmcs.read(VmcsField.GUEST_SSP) == 0x7FFF_0000_0FF8
    with pytest.raises(KvmIoctlError) as bad:
        set_one_reg(vcpu, GUEST_SSP_REG, 0x7FFF_0000_0FF9)
    assert bad.value.errno == errno.EINVAL
    assert kvm_get_msr(vcpu, 0x4B564DFF)[0] is MsrResult.GUEST_GP  # never for the guest


def test_one_reg_without_guest_shstk_is_einval(caps):
    vcpu = vcpu_with(caps, shstk=False)
    for call in (lambda: get_one_reg(vcpu, GUEST_SSP_REG), lambda: set_one_reg(vcpu, GUEST_SSP_REG, 0)):
        with pytest.raises(KvmIoctlError) as exc:
            call()
        assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("shstk,ibt,cet_allowed", [(False, False, False), (True, False, True),
                                                     (False, True, True), (True, True, True)])
def test_cr4_cet_reserved_without_guest_cet(caps, shstk, ibt, cet_allowed):
    vcpu = vcpu_with(caps, shstk, ibt)
    vcpu.cr0 = int(Cr0.PE | Cr0.PG | Cr0.WP)
    assert kvm_set_cr4(vcpu, int(Cr4.PAE | Cr4.CET)) is cet_allowed
    assert kvm_is_valid_sregs(vcpu, vcpu.cr0, int(Cr4.PAE | Cr4.CET)) is cet_allowed


def test_cr4_cet_and_cr0_wp_are_tied(caps):
    vcpu = vcpu_with(caps)
    vcpu.cr0 = int(Cr0.PE | Cr0.PG)
    assert not kvm_set_cr4(vcpu, int(Cr4.PAE | Cr4.CET))  # CET with WP=0 → #GP
    assert not kvm_is_valid_sregs(vcpu, vcpu.cr0, int(Cr4.PAE | Cr4.CET))
    assert kvm_set_cr0(vcpu, int(Cr0.PE | Cr0.PG | Cr0.WP))
    assert kvm_set_cr4(vcpu, int(Cr4.PAE | Cr4.CET))
    assert not kvm_set_cr0(vcpu, int(Cr0.PE | Cr0.PG))  # clearing WP with CET on → #GP
    assert vcpu.cr0 & Cr0.WP
