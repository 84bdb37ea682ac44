"""Every CET/XSS MSR rule of KVM vmx.c/x86.c, table-driven, against an oracle written from the
reference text (not from cetvm.kvm): {guest CPUID} × MSR × value × {guest, host} × {read, write}."""

from __future__ import annotations

import itertools

import pytest

from cetvm.cpuid import get_model
from cetvm.kvm.caps import kvm_caps_for_host
from cetvm.kvm.host import Host
from cetvm.kvm.msr import MsrResult, kvm_get_msr, kvm_set_msr
from cetvm.kvm.vcpu import VcpuArch

U_CET, S_CET = 0x6A0, 0x6A2
PL_SSP = (0x6A4, 0x6A5, 0x6A6, 0x6A7)
INT_SSP_TAB, XSS, GUEST_SSP = 0x6A8, 0xDA0, 0x4B564DFF
ALL_MSRS = (U_CET, S_CET, *PL_SSP, INT_SSP_TAB, XSS, GUEST_SSP)

VALUES = {
    "zero": 0,
    "shstk-ctl": 0x3,                      # SH_STK_EN | WR_SHSTK_EN
    "ibt-ctl": 0x4 | 0x10,                 # ENDBR_EN | NO_TRACK_EN
    "aligned-address": 0x7FFF_F000_0000,   # canonical, 4-aligned; bitmap base bits 13:12 = 0
    "reserved": 0x40,                      # U/S_CET bit 6 (reserved)
    "reserved-xss": 0x100,                 # XSS bit 8 (PT): not supported by KVM
    "cet-xss": 0x1800,
    "non-canonical": 0x0000_8000_0000_0000,
    "misaligned-ssp": 0x7FFF_F000_0001,    # bits 1:0
    "misaligned-bitmap": 0x7FFF_F000_1000, # bits 13:12 of the bitmap base
    "suppress-tracker": 0xC00,
}

# Guest CPUID variants: (has SHSTK, has IBT, has XSAVES).
GUESTS = {
    "neither": (False, False, True),
    "shstk": (True, False, True),
    "ibt": (False, True, True),
    "both": (True, True, True),
    "both-no-xsaves": (True, True, False),
}


def canonical48(v: int) -> bool:
    top = v >> 47
    return top in (0, (1 << 17) - 1)


def oracle(msr: int, guest: tuple[bool, bool, bool], value: int, host: bool, write: bool) -> str:
    """Expected outcome per KVM vmx.c/x86.c: 'ok', '#GP' or 'error'."""
    shstk, ibt, xsaves = guest
    guest_supported_xss = 0x1800  # guest CPUID.(0xD,1).ECX = KVM's supported XSS on SPR
    advertised = msr != GUEST_SSP  # SPR: every CET MSR and XSS are in the index list
    if msr == GUEST_SSP and not host:
        return "#GP"
    if msr in (U_CET, S_CET):
        exists = shstk or ibt
        ok = (not value & 0x3C0
              and not (not shstk and value & 0x3)
              and not (not ibt and value & (0x3C | ~0x3FF & (2**64 - 1)))
              and (value >> 12) & 3 == 0
              and not (value & 0x400 and value & 0x800))
    elif msr == XSS:
        if not write:
            return "ok" if host or xsaves else "#GP"
        exists = xsaves
        ok = not value & ~guest_supported_xss
    else:  # PLx_SSP, INT_SSP_TAB (LM is always on here), the guest SSP
        exists = shstk
        ok = canonical48(value) and (msr == INT_SSP_TAB or value & 3 == 0)
    if not write:
        ok = True
    if exists:
        return "ok" if ok else ("error" if host else "#GP")
    # The MSR does not exist for this guest: userspace may read it / write 0 if KVM advertises it.
    if host and advertised and (not write or value == 0):
        return "ok"
    return "error" if host else "#GP"


OUTCOME = {MsrResult.OK: "ok", MsrResult.GUEST_GP: "#GP", MsrResult.ERROR: "error"}


@pytest.fixture(scope="module")
def spr_caps():
    return kvm_caps_for_host(Host(get_model("sapphire-rapids")))


def make_vcpu(caps, guest: tuple[bool, bool, bool]) -> VcpuArch:
    cpuid = caps.get_supported_cpuid()
    shstk, ibt, xsaves = guest
    cpuid.set_feature("shstk", shstk)
    cpuid.set_feature("ibt", ibt)
    cpuid.set_feature("xsaves", xsaves)
    return VcpuArch.create(caps, cpuid)


CASES = list(itertools.product(GUESTS, ALL_MSRS, VALUES, (False, True), (False, True)))


@pytest.mark.parametrize("guest_name", GUESTS)
def test_every_cet_msr_rule(spr_caps, guest_name):
    guest = GUESTS[guest_name]
    failures = []
    checked = 0
    for msr, (vname, value), host, write in itertools.product(ALL_MSRS, VALUES.items(), (False, True), (False, True)):
        vcpu = make_vcpu(spr_caps, guest)
        expected = oracle(msr, guest, value, host, write)
        if write:
            got = OUTCOME[kvm_set_msr(vcpu, msr, value, host_initiated=host)]
        else:
            result, data = kvm_get_msr(vcpu, msr, host_initiated=host)
            got = OUTCOME[result]
            if got != "ok" and data != 0:
                failures.append((msr, vname, host, write, "failed read must return 0"))
        checked += 1
        if got != expected:
            failures.append((hex(msr), vname, "host" if host else "guest", "write" if write else "read",
                             f"expected {expected}, got {got}"))
    assert checked == len(ALL_MSRS) * len(VALUES) * 4
    assert not failures, failures


@pytest.mark.parametrize("msr", [m for m in ALL_MSRS if m != XSS])
def test_written_value_reads_back_from_its_home(spr_caps, msr):
    vcpu = make_vcpu(spr_caps, GUESTS["both"])
    value = 0x7FFF_F000_0008 if msr != U_CET and msr != S_CET else 0x7FFF_F000_0005
    assert kvm_set_msr(vcpu, msr, value, host_initiated=True) is MsrResult.OK
    assert kvm_get_msr(vcpu, msr, host_initiated=True) == (MsrResult.OK, value)


def test_int_ssp_tab_needs_long_mode(spr_caps):
    cpuid = spr_caps.get_supported_cpuid()
    cpuid.set_feature("lm", False)
    vcpu = VcpuArch.create(spr_caps, cpuid)
    assert kvm_set_msr(vcpu, INT_SSP_TAB, 0x1000) is MsrResult.GUEST_GP
    assert kvm_set_msr(vcpu, PL_SSP[0], 0x1000) is MsrResult.OK


def test_kvm_unsupported_shstk_in_guest_cpuid_gives_no_msrs():
    """Userspace may put SHSTK in guest CPUID on a host where KVM lacks it; KVM ignores it."""
    caps = kvm_caps_for_host(Host(get_model("ice-lake")))
    cpuid = caps.get_supported_cpuid()
    cpuid.set_feature("shstk", True)
    vcpu = VcpuArch.create(caps, cpuid)
    assert vcpu.cpuid.guest_cpuid_has("shstk")
    assert kvm_set_msr(vcpu, PL_SSP[3], 0x1000) is MsrResult.GUEST_GP
    # Not advertised by KVM on Ice Lake: even userspace may not read it.
    assert kvm_get_msr(vcpu, PL_SSP[3], host_initiated=True)[0] is MsrResult.ERROR
