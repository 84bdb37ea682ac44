"""The VMCS the CPU obeys (cetvm.cpu.vmcs): CR4 guest/host mask exits, VM-entry checks of the
guest CET state, exit information, the execution controls it acts on (HLT exiting, MSR bitmaps,
CR3-load exiting, enable XSAVES) — with the guests/cpu/exits.S code on a bare vCPU (the
hypervisor's part is played by the test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from harness import L, Machine, Options  # noqa: E402

from cetvm.arch import Cr4, Msr, Vector, VmcsField  # noqa: E402
from cetvm.arch.regs import RFLAGS_IF  # noqa: E402
from cetvm.arch.vmx import ExitReason as VmxExitReason  # noqa: E402
from cetvm.arch.vmx import (  # noqa: E402
    VMX_EXIT_REASONS_FAILED_VMENTRY, CpuBasedControls, SecondaryControls, VmEntryControls,
)
from cetvm.cpu.exits import ExitReason  # noqa: E402

#: Exit qualification of "MOV to CR4 from RCX": CR 4, access type 0, GPR 1 [SDM Table 28-3].
MOV_RCX_TO_CR4 = 4 | 0 << 4 | 1 << 8


def start(case: str) -> Machine:
    """The exits guest at ``case``, with CR4.CET clear and no CET enables (case_cr4 sets it)."""
    m = Machine("exits", Options(s_cet=0, cr4_cet=False))
    m.vcpu.rip = m.sym(case)
    return m


def test_cr4_write_runs_in_the_guest_when_the_mask_does_not_own_the_bit():
    m = start("case_cr4")
    assert not m.vcpu.cr4 & Cr4.CET
    assert m.vcpu.run().reason is ExitReason.HLT
    assert m.vcpu.cr4 & Cr4.CET and m.results.guest[0] == 1
    assert m.vcpu.vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.HLT


def test_cr4_write_exits_when_the_guest_host_mask_owns_the_bit():
    m = start("case_cr4")
    vmcs = m.vcpu.vmcs
    vmcs.write(VmcsField.CR4_GUEST_HOST_MASK, Cr4.CET)
    vmcs.write(VmcsField.CR4_READ_SHADOW, 0)
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.CR_ACCESS and exit_.rip == m.sym("cr4_write")
    assert not m.vcpu.cr4 & Cr4.CET and m.results.guest[0] == 0
    assert vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.CR_ACCESS
    assert vmcs.read(VmcsField.EXIT_QUALIFICATION) == exit_.qualification == MOV_RCX_TO_CR4
    assert vmcs.read(VmcsField.VM_EXIT_INSTRUCTION_LEN) == 3  # 0f 22 e1
    # the hypervisor refuses the value (kvm_set_cr4 → #GP): delivered at the MOV, CR4 unchanged
    m.vcpu.inject_exception(Vector.GP, 0)
    m.vcpu.run()
    assert (m.results.count, m.results.vector, m.results.rip) == (1, Vector.GP, m.sym("cr4_write"))
    assert not m.vcpu.cr4 & Cr4.CET


def test_cr4_write_the_hypervisor_accepts_retires_the_mov():
    m = start("case_cr4")
    m.vcpu.vmcs.write(VmcsField.CR4_GUEST_HOST_MASK, Cr4.CET)
    exit_ = m.vcpu.run()
    m.vcpu.write_cr(4, m.vcpu.reg("rcx"))
    assert m.vcpu.run().reason is ExitReason.HLT  # the completion moved RIP past the MOV
    assert m.vcpu.cr4 & Cr4.CET and m.results.guest[0] == 1 and m.results.count == 0
    assert exit_.reason is ExitReason.CR_ACCESS


def _with_cet_entry(m: Machine, ssp: int, s_cet: int = 0, isst: int = 0) -> None:
    vmcs = m.vcpu.vmcs
    vmcs.write(VmcsField.VM_ENTRY_CONTROLS, VmEntryControls.LOAD_CET_STATE)
    vmcs.write(VmcsField.GUEST_SSP, ssp)
    vmcs.write(VmcsField.GUEST_S_CET, s_cet)
    vmcs.write(VmcsField.GUEST_INTR_SSP_TABLE, isst)


@pytest.mark.parametrize("ssp, s_cet, isst, what", [
    (0x0000_8000_0000_0000, 0, 0, "GUEST_SSP 0x800000000000 is not canonical"),
    (0x7000_0000_1002, 0, 0, "GUEST_SSP 0x700000001002 is not 4-byte aligned"),
    (0x7000_0000_1000, 1 << 6, 0, "GUEST_S_CET 0x40 sets reserved bits 9:6"),
    (0x7000_0000_1000, 0, 0xFFFF_0000_0000_0000, "GUEST_INTR_SSP_TABLE 0xffff000000000000 is not canonical"),
])
def test_vm_entry_fails_on_invalid_guest_cet_state(ssp, s_cet, isst, what):
    m = start("case_cr4")
    before = (m.vcpu.rip, m.vcpu.ssp, m.vcpu.instructions_retired)
    _with_cet_entry(m, ssp, s_cet, isst)
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.ENTRY_FAILED and what in exit_.detail
    reason = m.vcpu.vmcs.read(VmcsField.VM_EXIT_REASON)
    assert reason == VMX_EXIT_REASONS_FAILED_VMENTRY | VmxExitReason.ENTRY_FAIL_GUEST_STATE
    assert (m.vcpu.rip, m.vcpu.ssp, m.vcpu.instructions_retired) == before  # nothing loaded or run
    assert m.results.guest[0] == 0


def test_vm_entry_loads_valid_guest_cet_state_and_exit_saves_it():
    m = start("case_cr4")
    _with_cet_entry(m, 0x7000_0000_1000, s_cet=0, isst=0x7000_0000_2000)
    assert m.vcpu.run().reason is ExitReason.HLT
    assert m.vcpu.ssp == 0x7000_0000_1000
    assert m.vcpu.vmcs.read(VmcsField.GUEST_SSP) == 0x7000_0000_1000
    assert m.vcpu.vmcs.read(VmcsField.GUEST_INTR_SSP_TABLE) == 0x7000_0000_2000


def test_exit_information_of_io_exception_and_mmio_exits():
    m = start("case_io")  # out %al, %dx with DX = 0x3F8
    vmcs = m.vcpu.vmcs
    assert m.vcpu.run().reason is ExitReason.IO
    assert vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.IO_INSTRUCTION
    assert vmcs.read(VmcsField.EXIT_QUALIFICATION) == 0x3F8 << 16  # 1 byte, OUT, DX-encoded
    assert vmcs.read(VmcsField.VM_EXIT_INSTRUCTION_LEN) == 1

    m = start("case_ud")
    m.vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, 1 << Vector.UD)
    assert m.vcpu.run().reason is ExitReason.EXCEPTION
    assert m.vcpu.vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.EXCEPTION_NMI
    assert m.vcpu.vmcs.read(VmcsField.VM_EXIT_INTR_INFO) == Vector.UD | 3 << 8 | 1 << 31  # hardware exception, no code

    m = start("case_mmio")  # mov 0x10(%rdi), %eax with RDI = MMIO_PAGE
    assert m.vcpu.run().reason is ExitReason.MMIO
    assert m.vcpu.vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.EPT_VIOLATION
    assert m.vcpu.vmcs.read(VmcsField.EXIT_QUALIFICATION) == 1  # a read
    assert m.vcpu.vmcs.read(VmcsField.GUEST_PHYSICAL_ADDRESS) == L["MMIO_PAGE"] + 0x10


# ----------------------------------------------------------------------- execution controls
def _clear_control(m: Machine, field: VmcsField, control: int) -> None:
    m.vcpu.vmcs.write(field, m.vcpu.vmcs.read(field) & ~control)


def test_hlt_exits_with_hlt_exiting():
    m = start("case_hlt")
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.HLT and exit_.rip == m.sym("hlt_site")
    assert not m.vcpu.halted and m.results.guest[0] == 0


def test_hlt_without_hlt_exiting_halts_in_the_guest_until_an_interrupt():
    """SDM Vol. 3 §26.1.3 / §26.7: the HLT retires in the guest, the CPU waits in the HLT
    activity state (the run ends with nothing to wake it), and an interrupt the guest can take
    wakes it with the return address after the HLT."""
    m = start("case_hlt")
    _clear_control(m, VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.HLT_EXITING)
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.BUDGET and m.vcpu.halted
    assert m.vcpu.rip == m.sym("hlt_after") and m.results.guest[0] == 0
    assert m.vcpu.run().reason is ExitReason.BUDGET and m.vcpu.rip == m.sym("hlt_after")  # still halted
    m.vcpu.inject_interrupt(0x30)
    m.vcpu.run()  # delivered; the handler records it and halts (again in the guest)
    r = m.results
    assert (r.count, r.vector, r.rip) == (1, 0x30, m.sym("hlt_after"))
    assert m.vcpu.halted and r.guest[0] == 0


def test_every_msr_access_exits_without_msr_bitmaps():
    """SDM Vol. 3 §26.1.3: with "use MSR bitmaps" 0 every RDMSR/WRMSR exits — IA32_S_CET too,
    which the CPU handles itself with the control (test_cpu_exits)."""
    m = start("case_msr")
    _clear_control(m, VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.USE_MSR_BITMAPS)
    seen = []
    for _ in range(4):
        exit_ = m.vcpu.run()
        assert exit_.reason in (ExitReason.RDMSR, ExitReason.WRMSR)
        seen.append((exit_.reason, exit_.msr.index))
        m.vcpu.set_exit_result(data=0x5A)
    assert seen == [(ExitReason.RDMSR, 0x4B564D00), (ExitReason.WRMSR, 0x4B564D01),
                    (ExitReason.RDMSR, Msr.IA32_S_CET), (ExitReason.RDMSR, 0x9999)]
    assert m.vcpu.run().reason is ExitReason.HLT
    assert m.results.guest[1] == 0x5A and m.results.count == 0  # the hypervisor's value; no #GP


@pytest.mark.parametrize("exiting", [False, True])
def test_cr3_load_exits_only_with_cr3_load_exiting(exiting):
    m = start("case_cr3")
    if exiting:
        m.vcpu.vmcs.write(VmcsField.CPU_BASED_VM_EXEC_CONTROL,
                          m.vcpu.vmcs.read(VmcsField.CPU_BASED_VM_EXEC_CONTROL) | CpuBasedControls.CR3_LOAD_EXITING)
    exit_ = m.vcpu.run()
    if not exiting:
        assert exit_.reason is ExitReason.HLT and m.results.guest[0] == 1
        return
    assert exit_.reason is ExitReason.CR_ACCESS and exit_.rip == m.sym("cr3_write")
    assert exit_.qualification == 3  # CR3, MOV to CR, from RAX [SDM Table 28-3]
    assert m.vcpu.vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.CR_ACCESS
    m.vcpu.write_cr(3, m.vcpu.reg("rax"))  # the hypervisor loads it; the completion retires the MOV
    assert m.vcpu.run().reason is ExitReason.HLT and m.results.guest[0] == 1


@pytest.mark.parametrize("field, control", [
    (VmcsField.SECONDARY_VM_EXEC_CONTROL, SecondaryControls.ENABLE_XSAVES),
    (VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS),
])
def test_xsaves_is_ud_unless_the_vmcs_enables_it(field, control):
    """SDM Vol. 3 §26.3: XSAVES is #UD in the guest when "enable XSAVES/XRSTORS" is 0 or the
    secondary controls are not activated (the CPU and CR4.OSXSAVE support it)."""
    m = Machine("xsaves")
    _clear_control(m, field, control)
    m.run_case("case_roundtrip")
    assert (m.results.count, m.results.vector) == (1, Vector.UD)


def _set_control(m: Machine, field: VmcsField, control: int) -> None:
    m.vcpu.vmcs.write(field, m.vcpu.vmcs.read(field) | control)


def test_interrupt_window_exit_at_vm_entry_when_the_guest_can_take_an_interrupt():
    """SDM Vol. 3 §26.7.5: with "interrupt-window exiting" and IF = 1 (no shadow) the VM entry
    exits before the first instruction, and again while the window stays open; the exit that
    retired STI; NOP; HLT leaves the window open for the next entry."""
    m = start("case_window")
    m.vcpu.set_reg("rflags", 0x2 | RFLAGS_IF)
    _set_control(m, VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.INTERRUPT_WINDOW_EXITING)
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.INTERRUPT_WINDOW and exit_.rip == m.sym("case_window")
    assert m.vcpu.instructions_retired == 0
    assert m.vcpu.vmcs.read(VmcsField.VM_EXIT_REASON) == VmxExitReason.INTERRUPT_WINDOW
    assert m.vcpu.run().reason is ExitReason.INTERRUPT_WINDOW and m.vcpu.instructions_retired == 0
    _clear_control(m, VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.INTERRUPT_WINDOW_EXITING)
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.HLT and exit_.rip == m.sym("window_site")
    _set_control(m, VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.INTERRUPT_WINDOW_EXITING)
    exit_ = m.vcpu.run()  # completes the HLT, then the entry finds the window open
    assert exit_.reason is ExitReason.INTERRUPT_WINDOW and exit_.rip == m.sym("window_site") + 1


def test_no_interrupt_window_exit_while_interrupts_are_blocked():
    """IF = 0 at VM entry (the harness starts the guest with RFLAGS = 2): no window exit; the
    guest runs (its STI is seen only at the next entry) to its HLT exit."""
    m = start("case_window")
    _set_control(m, VmcsField.CPU_BASED_VM_EXEC_CONTROL, CpuBasedControls.INTERRUPT_WINDOW_EXITING)
    exit_ = m.vcpu.run()
    assert exit_.reason is ExitReason.HLT and exit_.rip == m.sym("window_site")
