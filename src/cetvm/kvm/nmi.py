"""Non-maskable interrupts as KVM 6.18 injects them on VMX [K x86.c kvm_vcpu_ioctl_nmi /
kvm_inject_nmi / process_nmi / kvm_check_and_inject_events and the NMI part of
KVM_GET/SET_VCPU_EVENTS; vmx.c vmx_get_nmi_mask / vmx_set_nmi_mask / vmx_nmi_blocked /
vmx_nmi_allowed / vmx_inject_nmi / vmx_enable_nmi_window / handle_nmi_window; SDM Vol. 3 §6.7.1
"Handling multiple NMIs", §26.7.6 "NMI-window exiting", §28.6.1.2 "VM entry with NMI"].

- **KVM_NMI** (``kvm_inject_nmi``) counts the NMI in ``nmi_queued``; ``process_nmi`` moves the
  queue into ``nmi_pending``, at most 2 while NMIs are not blocked and no NMI injection is in
  flight (KVM injects one at once and opens an NMI window for the other), else 1: a third NMI
  in a row is lost, as on bare metal.
- **Injection** at VM entry (``kvm_check_and_inject_events``, after an SMI): when an NMI is
  pending and allowed (``vmx_nmi_allowed``: nothing else is being injected, and
  ``vmx_nmi_blocked`` finds no blocking by NMI, STI or MOV SS in GUEST_INTERRUPTIBILITY_INFO),
  ``vmx_inject_nmi`` writes VM_ENTRY_INTR_INFO = valid | type NMI (2) | vector 2 and the CPU
  delivers it through IDT vector 2 (setting its blocking by NMI). While an NMI stays pending
  KVM sets "NMI-window exiting" (``vmx_enable_nmi_window``); the window exit
  (``handle_nmi_window``) clears it and the next entry injects.
- **The NMI mask** is the CPU's blocking by NMI, which lives in GUEST_INTERRUPTIBILITY_INFO
  (bit 3) between VM exit and VM entry: :func:`vmx_get_nmi_mask` / :func:`vmx_set_nmi_mask`
  read and write that field — the one copy, which SMM (:mod:`cetvm.kvm.smm`: NMIs blocked in
  the SMI handler, HF_SMM_INSIDE_NMI), KVM_SET_VCPU_EVENTS and INIT/RESET change.
- **KVM_GET/SET_VCPU_EVENTS** carry ``nmi``: injected, pending (the number of pending NMIs,
  since "KVM: x86: Save/restore all NMIs when multiple NMIs are pending"), masked
  (:class:`NmiEvents`). KVM_SET_VCPU_EVENTS queues ``pending`` (a u8; ``process_nmi`` clamps
  it) and sets the mask; KVM checks nothing else.

Decisions (cetvm): the CPU delivers an injected NMI at VM entry (or the run fails), so an NMI
injection is left "in flight" after a run only when the run ended before its VM entry (the CPU
left the valid bit of VM_ENTRY_INTR_INFO set); ``vmx_complete_nmi`` reads that instead of the
IDT-vectoring information, and the next entry injects it again. While L2 runs (nested VMX)
NMIs stay pending until L1 runs again (no NMI exiting to L1, no NMI injection into L2).
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch.regs import Vector
from cetvm.arch.vmx import (
    GUEST_INTR_STATE_MOV_SS, GUEST_INTR_STATE_NMI, GUEST_INTR_STATE_STI, INTR_INFO_TYPE_SHIFT, INTR_INFO_VALID,
    INTR_TYPE_NMI, VmcsField,
)
from cetvm.kvm.vcpu import VcpuArch
from cetvm.kvm.vmx import vmx_set_nmi_window

#: process_nmi(): NMIs that may be pending at once while NMIs are not blocked (one is injected
#: at once, the other waits for the NMI window), and while they are.
NMI_LIMIT_UNBLOCKED = 2
NMI_LIMIT_BLOCKED = 1
#: kvm_vcpu_events.nmi.pending is a __u8.
NMI_PENDING_MAX = 0xFF
#: VM_ENTRY_INTR_INFO of an NMI: valid, type NMI, vector 2 [SDM Vol. 3 Table 25-17].
NMI_ENTRY_INTR_INFO = INTR_INFO_VALID | INTR_TYPE_NMI << INTR_INFO_TYPE_SHIFT | int(Vector.NMI)


@dataclass(frozen=True)
class NmiEvents:
    """kvm_vcpu_events.nmi: an NMI injection in flight, the number of NMIs pending, NMIs masked."""

    injected: bool = False
    pending: int = 0
    masked: bool = False


# --------------------------------------------------------------------------- the mask
def vmx_get_nmi_mask(vcpu: VcpuArch) -> bool:
    """vmx_get_nmi_mask(): blocking by NMI (virtual-NMI blocking) in GUEST_INTERRUPTIBILITY_INFO."""
    return bool(vcpu.vmcs.read(VmcsField.GUEST_INTERRUPTIBILITY_INFO) & GUEST_INTR_STATE_NMI)


def vmx_set_nmi_mask(vcpu: VcpuArch, masked: bool) -> None:
    """vmx_set_nmi_mask(): set or clear blocking by NMI in GUEST_INTERRUPTIBILITY_INFO (the CPU
    loads it at the next VM entry)."""
    info = vcpu.vmcs.read(VmcsField.GUEST_INTERRUPTIBILITY_INFO)
    info = info | GUEST_INTR_STATE_NMI if masked else info & ~GUEST_INTR_STATE_NMI
    vcpu.vmcs.write(VmcsField.GUEST_INTERRUPTIBILITY_INFO, info)


def vmx_nmi_blocked(vcpu: VcpuArch) -> bool:
    """vmx_nmi_blocked(): blocking by NMI, STI or MOV SS [SDM Vol. 3 Table 25-3]."""
    blocking = GUEST_INTR_STATE_NMI | GUEST_INTR_STATE_STI | GUEST_INTR_STATE_MOV_SS
    return bool(vcpu.vmcs.read(VmcsField.GUEST_INTERRUPTIBILITY_INFO) & blocking)


def vmx_nmi_allowed(vcpu: VcpuArch, event_pending: bool) -> bool:
    """vmx_nmi_allowed(vcpu, for_injection=true) with kvm_check_and_inject_events' can_inject:
    no other event is being injected (``event_pending``: the CPU still has one to deliver) and
    NMIs are not blocked."""
    return not event_pending and not vmx_nmi_blocked(vcpu)


# --------------------------------------------------------------------------- KVM_NMI
def kvm_inject_nmi(vcpu: VcpuArch) -> None:
    """kvm_inject_nmi() (KVM_NMI, and the in-kernel APIC's NMI delivery): one more NMI queued."""
    vcpu.nmi_queued += 1


def process_nmi(vcpu: VcpuArch) -> None:
    """process_nmi(): the queued NMIs become pending, at most :data:`NMI_LIMIT_UNBLOCKED` (or
    :data:`NMI_LIMIT_BLOCKED` while NMIs are masked or an injection is in flight)."""
    limit = NMI_LIMIT_BLOCKED if vmx_get_nmi_mask(vcpu) or vcpu.nmi_injected else NMI_LIMIT_UNBLOCKED
    vcpu.nmi_pending = min(vcpu.nmi_pending + vcpu.nmi_queued, limit)
    vcpu.nmi_queued = 0


def vmx_inject_nmi(vcpu: VcpuArch) -> None:
    """vmx_inject_nmi(): the NMI goes into the VM-entry interruption-information field."""
    vcpu.vmcs.write(VmcsField.VM_ENTRY_INTR_INFO, NMI_ENTRY_INTR_INFO)


def kvm_check_and_inject_nmi(vcpu: VcpuArch, event_pending: bool) -> bool:
    """The NMI part of kvm_check_and_inject_events(): inject a pending NMI when allowed, and
    keep the NMI window open while one still waits. True when one was injected."""
    process_nmi(vcpu)
    if vcpu.nmi_injected:  # re-injected first, nothing else with it
        vmx_inject_nmi(vcpu)
        vmx_set_nmi_window(vcpu, vcpu.nmi_pending > 0)
        return True
    injected = False
    if vcpu.nmi_pending and vmx_nmi_allowed(vcpu, event_pending):
        vcpu.nmi_pending -= 1
        vcpu.nmi_injected = True
        vmx_inject_nmi(vcpu)
        injected = True
    vmx_set_nmi_window(vcpu, vcpu.nmi_pending > 0)
    return injected


def vmx_complete_nmi(vcpu: VcpuArch) -> None:
    """vmx_complete_interrupts() after a VM exit: the injected NMI is still in flight only when
    the CPU did not enter and left the field valid (module docstring)."""
    vcpu.nmi_injected = bool(vcpu.vmcs.read(VmcsField.VM_ENTRY_INTR_INFO) & INTR_INFO_VALID)


def handle_nmi_window(vcpu: VcpuArch) -> None:
    """handle_nmi_window(): close the window; the next entry injects (KVM_REQ_EVENT)."""
    vmx_set_nmi_window(vcpu, False)


def kvm_nmi_pending(vcpu: VcpuArch) -> bool:
    """kvm_vcpu_has_events()'s NMI part: an NMI queued or pending (it wakes a halted vCPU)."""
    return bool(vcpu.nmi_queued or vcpu.nmi_pending)


# --------------------------------------------------------------------------- vCPU events
def nmi_events(vcpu: VcpuArch) -> NmiEvents:
    """KVM_GET_VCPU_EVENTS's nmi (after process_nmi): pending is kvm_get_nr_pending_nmis()."""
    process_nmi(vcpu)
    return NmiEvents(vcpu.nmi_injected, vcpu.nmi_pending, vmx_get_nmi_mask(vcpu))


def set_nmi_events(vcpu: VcpuArch, nmi: NmiEvents) -> None:
    """KVM_SET_VCPU_EVENTS with KVM_VCPUEVENT_VALID_NMI_PENDING: the pending count is queued
    afresh (process_nmi clamps it), then the mask and the injection in flight."""
    vcpu.nmi_pending = 0
    vcpu.nmi_queued = nmi.pending
    vmx_set_nmi_mask(vcpu, nmi.masked)
    vcpu.nmi_injected = nmi.injected
    process_nmi(vcpu)


def kvm_nmi_reset(vcpu: VcpuArch) -> None:
    """kvm_vcpu_reset(): nmi_pending, nmi_queued and nmi_injected cleared and NMIs unmasked on
    RESET and INIT (the window and an injection not yet entered go with them)."""
    vcpu.nmi_queued = 0
    vcpu.nmi_pending = 0
    vcpu.nmi_injected = False
    vmx_set_nmi_mask(vcpu, False)
    vmx_set_nmi_window(vcpu, False)
    vcpu.vmcs.write(VmcsField.VM_ENTRY_INTR_INFO, 0)
