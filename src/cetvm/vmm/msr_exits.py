"""The VMM's side of KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: the local APIC's MSRs.

cetvm's KVM has no in-kernel LAPIC, so the VMM owns the APIC (as QEMU with
``kernel-irqchip=off`` would, had KVM supported x2APIC that way). At machine creation
(:func:`claim_apic_msrs`) it asks KVM for:

- KVM_CAP_X86_USER_SPACE_MSR with reasons INVAL | FILTER: x2APIC MSRs 0x800-0x8FF fail in
  KVM with "invalid" (kvm_x2apic_msr_read/write without an in-kernel APIC), so they exit
  with reason INVAL; UNKNOWN is not requested, so unknown MSRs keep KVM's #GP.
- KVM_X86_SET_MSR_FILTER denying reads and writes of IA32_APIC_BASE (0x1B) and
  IA32_TSC_DEADLINE (0x6E0), default allow: KVM would otherwise answer them from its own
  copies, so the filter routes them here (reason FILTER). x2APIC MSRs cannot be filtered
  (api.rst), hence INVAL above.

:func:`complete_msr_exit` answers an exit (kvm_run.msr): 0x1B → :meth:`LocalApic.write_apic_base`
/ ``apic_base`` — a successful write is copied to KVM with KVM_SET_MSRS so that KVM's
vcpu->arch.apic_base (saved in snapshots) agrees; 0x6E0 → the APIC's TSC-deadline register
(:meth:`LocalApic.read_tsc_deadline` / :meth:`LocalApic.write_tsc_deadline`); 0x800-0x8FF → :meth:`LocalApic.msr_read` /
:meth:`LocalApic.msr_write`, whose x2APIC-mode and register checks decide. Any refusal, and any
other MSR (a failed PAT or CET write reported as INVAL), completes with ``error = 1``, and KVM
injects #GP(0) — the architecturally correct outcome.
"""

from __future__ import annotations

from cetvm.arch.msr import Msr
from cetvm.kvm.api import (
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    KvmExitReason,
    KvmMsrExitReason,
    KvmRun,
    KvmVcpu,
    MsrFilterRange,
    Vm,
)
from cetvm.vmm.devices.lapic import X2APIC_MSR_FIRST, X2APIC_MSR_LAST, LocalApic
from cetvm.vmm.requests import GuestFaultRequest

APIC_BASE = int(Msr.IA32_APIC_BASE)
TSC_DEADLINE = int(Msr.IA32_TSC_DEADLINE)


def claim_apic_msrs(vm: Vm) -> None:
    """Enable the userspace MSR exits the APIC needs (module docstring)."""
    vm.enable_cap_user_space_msr(int(KvmMsrExitReason.INVAL | KvmMsrExitReason.FILTER))
    access = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
    vm.set_msr_filter([MsrFilterRange(access, APIC_BASE, 1, b"\x00"),
                       MsrFilterRange(access, TSC_DEADLINE, 1, b"\x00")])


def is_apic_msr(index: int) -> bool:
    return index in (APIC_BASE, TSC_DEADLINE) or X2APIC_MSR_FIRST <= index <= X2APIC_MSR_LAST


def _apic_read(apic: LocalApic, index: int) -> int:
    if index == TSC_DEADLINE:
        return apic.read_tsc_deadline()
    return apic.apic_base if index == APIC_BASE else apic.msr_read(index)


def _apic_write(apic: LocalApic, vcpu: KvmVcpu, index: int, value: int) -> None:
    if index == TSC_DEADLINE:
        apic.write_tsc_deadline(value)
        return
    if index != APIC_BASE:
        apic.msr_write(index, value)
        return
    apic.write_apic_base(value)
    vcpu.set_msrs([(APIC_BASE, value)])  # keep KVM's apic_base in step (host-initiated)


def complete_msr_exit(run: KvmRun, apic: LocalApic, vcpu: KvmVcpu) -> None:
    """Fill kvm_run.msr for KVM to complete at the next KVM_RUN (module docstring)."""
    msr = run.msr
    assert msr is not None
    if not is_apic_msr(msr.index):
        msr.error = 1
        return
    try:
        if run.exit_reason is KvmExitReason.X86_RDMSR:
            msr.data = _apic_read(apic, msr.index)
        else:
            _apic_write(apic, vcpu, msr.index, msr.data)
    except GuestFaultRequest:
        msr.error = 1
