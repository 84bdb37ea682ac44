"""Guest RDMSR/WRMSR of the CET MSRs through the KVM run loop (interception per
vmx_update_intercept_for_cet_msr, #GP delivered to the guest's IDT) [SDM Vol. 4 Table 2-2, KVM vmx.c/x86.c]."""

from __future__ import annotations

from conftest import make_guest

from cetvm.arch import Msr, VmcsField
from cetvm.kvm.api import KvmExitReason
from cetvm.kvm.vmx import CET_INTERCEPTABLE_MSRS

GP = (13, 0)


def test_cet_msrs_with_guest_cet_pass_through_and_fault_architecturally():
    g = make_guest("cet_msrs")
    assert g.vcpu.run(budget=1_000_000).exit_reason is KvmExitReason.HLT
    # misaligned PL3_SSP, U_CET reserved bit 6, non-canonical INT_SSP_TAB
    assert g.log() == [GP, GP, GP]
    assert g.slot(0) == 0x7F00_0000_1000 and g.slot(1) == 0x7F00_0000_1000  # bad write changed nothing
    assert g.slot(2) == 0x7F00_0000_2003  # INT_SSP_TAB has no alignment rule
    assert g.slot(3) == 0x4 and g.slot(4) == 0
    msrs = dict(g.vcpu.get_msrs([Msr.IA32_PL3_SSP, Msr.IA32_PL0_SSP, Msr.IA32_S_CET, Msr.IA32_INT_SSP_TAB]))
    assert msrs == {Msr.IA32_PL3_SSP: 0x7F00_0000_1000, Msr.IA32_PL0_SSP: 0x7F00_0000_3000,
                    Msr.IA32_S_CET: 0x4, Msr.IA32_INT_SSP_TAB: 0x7F00_0000_2003}


def _cet_intercepts(guest) -> set[int]:
    """The CET/XSS MSRs whose guest access exits to KVM (the MSR bitmap intercepts every MSR
    the CPU does not hold, so only the CET ones are compared)."""
    return guest.vcpu.state.vmcs.msr_bitmap.intercepted(CET_INTERCEPTABLE_MSRS)


def test_interception_follows_guest_cpuid():
    both = _cet_intercepts(make_guest("cet_msrs"))
    assert both == {Msr.IA32_INT_SSP_TAB, Msr.IA32_XSS}
    ibt_only = _cet_intercepts(make_guest("cet_msrs", shstk=False))
    assert ibt_only == {Msr.IA32_INT_SSP_TAB, Msr.IA32_XSS, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP,
                        Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP}
    none = _cet_intercepts(make_guest("cet_msrs", shstk=False, ibt=False))
    assert {Msr.IA32_U_CET, Msr.IA32_S_CET} <= none


def test_guest_without_cet_cpuid_gets_gp_on_every_cet_msr():
    g = make_guest("cet_msrs", shstk=False, ibt=False)
    assert g.vcpu.run(budget=1_000_000).exit_reason is KvmExitReason.HLT
    assert g.log() == [GP] * 12  # 7 WRMSR + 5 RDMSR
    assert all(g.slot(n) == 0xDEADBEEF for n in range(5))  # no RDMSR completed


def test_state_lives_in_vmcs_and_xstate_after_run():
    g = make_guest("cet_msrs")
    g.vcpu.run(budget=1_000_000)
    state = g.vcpu.state
    assert state.fpu.loaded  # the guest FPU stays in the CPU after KVM_RUN (cetvm.kvm.api) ...
    g.vcpu.get_xsave()
    assert not state.fpu.loaded  # ... until an ioctl reads the fpstate: kvm_put_guest_fpu then
    assert state.fpu.xstate_bv & 0x1800 == 0x1800  # CET_U (PL3_SSP) and CET_S (PL0_SSP) in use
    assert state.vmcs.read(VmcsField.GUEST_S_CET) == 0x4
    assert state.vmcs.read(VmcsField.GUEST_INTR_SSP_TABLE) == 0x7F00_0000_2003


def test_host_s_cet_restored_on_every_exit():
    g = make_guest("cet_msrs")
    g.vcpu.run(budget=1_000_000)
    host = g.kvm.host_cpu
    assert host.exits > 0
    assert host.s_cet == 0 and host.ssp == 0 and host.intr_ssp_table == 0
    assert g.vcpu.cpu.cet_msr(Msr.IA32_S_CET) == 0x4  # the guest's value stayed in the guest
