"""NMIs through the KVM API (cetvm.kvm.nmi): KVM_NMI, process_nmi's limits, injection at VM entry
through VM_ENTRY_INTR_INFO (type NMI, vector 2) whatever RFLAGS.IF says, NMI-window exiting while
NMIs are blocked, the nmi part of KVM_GET/SET_VCPU_EVENTS (bad input refused), INIT, SMM and
snapshots.

The guest: ``cli; nop x4; hlt`` at 1 MiB in 64-bit mode (CET off); the NMI handler at IDT vector 2
counts in SLOTS[0] and returns with IRETQ. The SMI handler at SMBASE + 0x8000 is ``nop; nop;
nop; rsm``.
"""

from __future__ import annotations

import struct

import pytest
from conftest import CODE, SLOTS, Guest, _gate, fresh_copy, make_guest

from cetvm.arch import VmcsField
from cetvm.arch.vmx import GUEST_INTR_STATE_NMI, CpuBasedControls
from cetvm.cpu.exits import ExitReason
from cetvm.kvm.api import KvmExitReason
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.nmi import NMI_ENTRY_INTR_INFO, NmiEvents
from cetvm.kvm.state import restore_vcpu_state, save_vcpu_state

MAIN = bytes([0xFA, 0x90, 0x90, 0x90, 0x90, 0xF4])  # cli; nop x4; hlt
HANDLER_OFFSET = 0x200
#: inc qword [SLOTS]; iretq
HANDLER = bytes([0x48, 0xFF, 0x04, 0x25]) + struct.pack("<I", SLOTS) + bytes([0x48, 0xCF])
SMBASE = 0x30000
SMI_HANDLER = bytes([0x90, 0x90, 0x90, 0x0F, 0xAA])  # nop; nop; nop; rsm


def nmi_guest() -> Guest:
    g = make_guest("nmi", shstk=False, ibt=False, code=MAIN)
    g.vm.put_memory(CODE + HANDLER_OFFSET, HANDLER)
    g.vm.put_memory(0x5000 + 2 * 16, _gate(CODE + HANDLER_OFFSET))
    g.vm.put_memory(SMBASE + 0x8000, SMI_HANDLER)
    return g


def nmi_window_exiting(g: Guest) -> bool:
    return bool(g.vcpu.state.vmcs.read(VmcsField.CPU_BASED_VM_EXEC_CONTROL) & CpuBasedControls.NMI_WINDOW_EXITING)


def test_the_vm_entry_interruption_information_of_an_nmi_is_type_2_vector_2():
    assert NMI_ENTRY_INTR_INFO == 0x8000_0202


def test_kvm_nmi_is_delivered_through_vector_2_with_rflags_if_clear():
    g = nmi_guest()
    g.vcpu.run(budget=1)  # cli
    g.vcpu.nmi()
    assert g.vcpu.get_vcpu_events_nmi() == NmiEvents(pending=1)
    run = g.vcpu.run(budget=20)
    assert run.exit_reason is KvmExitReason.HLT
    assert g.slot(0) == 1
    assert g.vcpu.get_vcpu_events_nmi() == NmiEvents(), "IRETQ unblocked NMIs"
    assert not g.vcpu.state.vmcs.read(VmcsField.VM_ENTRY_INTR_INFO) & (1 << 31), "the entry consumed it"


def test_an_nmi_wakes_the_vcpu_halted_with_if_clear():
    g = nmi_guest()
    assert g.vcpu.run(budget=100).exit_reason is KvmExitReason.HLT
    assert g.vcpu.nmi_pending is False
    g.vcpu.nmi()
    assert g.vcpu.nmi_pending
    run = g.vcpu.run(budget=2)  # the HLT retires, the NMI is delivered, its INC runs
    assert g.slot(0) == 1 and run.rip > CODE + HANDLER_OFFSET
    assert g.vcpu.get_vcpu_events_nmi().masked


def test_process_nmi_keeps_two_pending_unmasked_and_one_masked():
    g = nmi_guest()
    for _ in range(3):
        g.vcpu.nmi()
    assert g.vcpu.get_vcpu_events_nmi().pending == 2
    g.vcpu.set_vcpu_events_nmi(NmiEvents(masked=True))
    for _ in range(3):
        g.vcpu.nmi()
    assert g.vcpu.get_vcpu_events_nmi() == NmiEvents(pending=1, masked=True)


def test_a_masked_nmi_waits_for_the_nmi_window_and_two_pending_are_both_delivered():
    g = nmi_guest()
    g.vcpu.set_vcpu_events_nmi(NmiEvents(pending=1, masked=True))
    g.vcpu.run(budget=2)
    assert g.slot(0) == 0 and nmi_window_exiting(g), "blocked by NMI: KVM opened the NMI window"
    g.vcpu.set_vcpu_events_nmi(NmiEvents(pending=2))
    run = g.vcpu.run(budget=10_000)  # guest time: each exit costs 1 µs
    assert run.exit_reason is KvmExitReason.HLT
    assert g.slot(0) == 2, "one injected at once, the other after the handler's IRETQ (NMI window)"
    assert not nmi_window_exiting(g)


def test_kvm_set_vcpu_events_nmi_refuses_what_does_not_fit_its_fields():
    g = nmi_guest()
    for bad in (NmiEvents(pending=256), NmiEvents(pending=-1), NmiEvents(injected=2),
                NmiEvents(masked="yes"), NmiEvents(pending=1.5)):
        with pytest.raises(KvmInvalidArgument, match="nmi"):
            g.vcpu.set_vcpu_events_nmi(bad)
    with pytest.raises(KvmInvalidArgument):
        g.vcpu.set_vcpu_events_nmi({"pending": 1})
    g.vcpu.set_vcpu_events_nmi(NmiEvents(pending=200))
    assert g.vcpu.get_vcpu_events_nmi().pending == 2, "KVM takes any u8 and process_nmi clamps it"


def test_init_clears_the_nmi_state():
    g = nmi_guest()
    g.vcpu.set_vcpu_events_nmi(NmiEvents(pending=1, masked=True))
    g.vcpu.nmi()
    g.vcpu.kvm_vcpu_reset(init_event=True)
    assert g.vcpu.get_vcpu_events_nmi() == NmiEvents()
    assert not nmi_window_exiting(g)


def test_nmis_are_blocked_in_smm_and_taken_after_rsm():
    g = nmi_guest()
    g.vcpu.run(budget=1)
    g.vcpu.smi()
    g.vcpu.nmi()
    g.vcpu.run(budget=2)
    assert g.vcpu.get_vcpu_events_smi().smm
    assert g.vcpu.get_vcpu_events_nmi() == NmiEvents(pending=1, masked=True)
    assert g.slot(0) == 0
    g.vcpu.run(budget=10_000)
    assert not g.vcpu.get_vcpu_events_smi().smm and g.slot(0) == 1, "RSM unmasked NMIs: delivered"


def test_nmi_state_survives_save_and_restore():
    g = nmi_guest()
    g.vcpu.set_vcpu_events_nmi(NmiEvents(pending=1, masked=True))
    state = save_vcpu_state(g.vcpu)
    assert state["nmi"] == {"injected": False, "pending": 1, "masked": True}
    copy = fresh_copy(g)
    restore_vcpu_state(copy.vcpu, state)
    assert copy.vcpu.get_vcpu_events_nmi() == NmiEvents(pending=1, masked=True)
    bad = dict(state, nmi={"pending": 1})
    with pytest.raises(KvmInvalidArgument, match="nmi"):
        restore_vcpu_state(fresh_copy(g).vcpu, bad)


def test_the_cpus_vm_entry_refuses_an_nmi_that_cannot_be_injected():
    """VM-entry checks [SDM Vol. 3 §28.2.1.3, §28.3.1.5]: an NMI has vector 2 and is not injected
    while blocking by NMI is set (the CPU alone, without KVM's vmx_nmi_allowed in front)."""
    g = nmi_guest()
    cpu, vmcs = g.vcpu.cpu, g.vcpu.state.vmcs
    vmcs.write(VmcsField.VM_ENTRY_INTR_INFO, NMI_ENTRY_INTR_INFO & ~0xFF | 3)
    exit_ = cpu.run(10)
    assert exit_.reason is ExitReason.ENTRY_FAILED and "vector 3" in exit_.detail
    vmcs.write(VmcsField.VM_ENTRY_INTR_INFO, NMI_ENTRY_INTR_INFO)
    vmcs.write(VmcsField.GUEST_INTERRUPTIBILITY_INFO, GUEST_INTR_STATE_NMI)
    exit_ = cpu.run(10)
    assert exit_.reason is ExitReason.ENTRY_FAILED and "blocking by NMI" in exit_.detail
    assert g.slot(0) == 0
