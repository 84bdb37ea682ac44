"""The VMCS the CPU obeys: controls a hypervisor programs, guest and host state, exit information
[SDM Vol. 3 ch. 25-28].

One :class:`Vmcs` object is the *current VMCS* of a vCPU (:meth:`cetvm.cpu.vcpu.Vcpu.vmptrld`);
the hypervisor reads and writes its fields by encoding (:class:`cetvm.arch.vmx.VmcsField`), as
KVM's vmcs_read*/vmcs_write* do with VMREAD/VMWRITE. What the CPU takes from it:

- EXCEPTION_BITMAP: an exception (vector < 32, not a software interrupt or an injected event)
  whose bit is set exits before delivery [SDM Vol. 3 §26.2]; INT3 and INTO (software
  exceptions) exit too, with RIP at the instruction;
- the MSR bitmap (``MSR_BITMAP`` points at it; here :attr:`Vmcs.msr_bitmap`, the set of MSR
  indices whose RDMSR/WRMSR exit) [SDM Vol. 3 §26.1.3, §25.6.9];
- CR4_GUEST_HOST_MASK / CR4_READ_SHADOW (and the CR0 pair): a MOV to CR4 that would change a
  host-owned bit (set in the mask) away from the read shadow exits with CR_ACCESS and the exit
  qualification of SDM Table 28-3 [SDM Vol. 3 §26.1.3]; one that does not exit leaves the
  host-owned bits as they are, and MOV from CR4 reads them from the shadow [SDM Vol. 3 §26.3]
  (MOV from CR0 runs in the engine: no CR0 read shadow);
- VM_ENTRY_CONTROLS.LOAD_CET_STATE: VM entry checks GUEST_S_CET, GUEST_SSP and
  GUEST_INTR_SSP_TABLE (:func:`guest_cet_state_fault`, SDM Vol. 3 §28.3.1.1) and loads them; a
  check that fails is a VM-entry failure: exit reason ENTRY_FAIL_GUEST_STATE with bit 31 set
  and nothing loaded [SDM Vol. 3 §28.8];
- at every VM exit the CPU saves S_CET, SSP and INTR_SSP_TABLE into the guest-state fields and
  reports the exit information (:meth:`Vmcs.record_exit`) [SDM Vol. 3 §29.2-29.3].

The execution controls the CPU acts on [SDM Vol. 3 §26.1-26.3, §26.7 (HLT activity state)]:

- CPU_BASED_VM_EXEC_CONTROL.HLT_EXITING: HLT exits (reason HLT); with it clear HLT retires in
  the guest and the CPU enters the HLT activity state (:attr:`cetvm.cpu.vcpu.Vcpu.halted`): an
  interrupt the guest can take (IF = 1) or an injected event wakes it; nothing else can reach
  it inside a run, so a run of a halted CPU with nothing to deliver ends at once, as when its
  time slice ends (ExitReason.BUDGET, RIP after the HLT);
- USE_MSR_BITMAPS: RDMSR/WRMSR exit per the MSR bitmap; with it clear every RDMSR/WRMSR exits;
- INTERRUPT_WINDOW_EXITING: an INTERRUPT_WINDOW exit when IF = 1 and no STI / MOV SS shadow
  blocks an interrupt [SDM Vol. 3 §26.7.5] — checked at VM entry (after the completion of the
  last exit and any event delivered on entry; after the budget, as the VMX-preemption timer; it
  wakes a halted CPU) and where the window opens inside the run: at the block start the block
  hook stops in front of (cetvm.cpu.interrupts "Recognition points") and after an emulated
  IRETQ/SYSRET that sets IF — not at other engine stops (decision: Unicorn's STI shadow flag is
  not reliable at every engine stop, measured with the smp guest's ``sti; hlt``; at a block
  start it is exact);
- NMI_WINDOW_EXITING: an NMI_WINDOW exit when neither blocking by NMI nor an STI / MOV SS
  shadow blocks an NMI [SDM Vol. 3 §26.7.6] — checked at VM entry (before the interrupt
  window), after every emulated instruction and engine run (an IRETQ unblocks NMIs: the native
  IRETQ leaves itself to Python while they are blocked) and where the watched shadow ends;
- VM_ENTRY_INTR_INFO with type NMI (2), vector 2: VM entry delivers the NMI through IDT vector 2
  before any guest instruction, whatever RFLAGS.IF says, and sets blocking by NMI; the entry
  fails when blocking by NMI or MOV SS is set in GUEST_INTERRUPTIBILITY_INFO [SDM Vol. 3
  §28.3.1.5, §28.6]; the entry clears the valid bit. Other interruption types are not taken
  from the field (the hypervisor injects exceptions and external interrupts through the vCPU's
  ``inject_exception`` / ``inject_interrupt``);
- GUEST_INTERRUPTIBILITY_INFO: VM entry loads blocking by NMI from bit 3, VM exit saves it with
  the shadow of the last instruction (bit 0 STI with RFLAGS.IF set, else bit 1 MOV SS); the
  shadow bits are not loaded (the engine keeps its own shadow flag, which nothing but the
  guest changes);
- CR3_LOAD_EXITING: MOV to CR3 exits (CR_ACCESS, qualification of SDM Table 28-3);
- secondary controls (in force only with ACTIVATE_SECONDARY_CONTROLS): ENABLE_XSAVES clear →
  XSAVES/XRSTORS are #UD [SDM Vol. 3 §26.3 "XSAVES"].

Not modeled (the control is held, written and read, but the CPU does not act on it), because
cetvm's CPU has no mechanism for it:

- EXTERNAL_INTERRUPT_EXITING / NMI_EXITING (pin-based): no host interrupt or NMI arrives while
  a run executes; the interrupts a guest gets are the hypervisor's injections;
- UNCONDITIONAL_IO_EXITING / USE_IO_BITMAPS: the CPU has no I/O ports of its own, so every
  IN/OUT/INS/OUTS exits (as with unconditional I/O exiting) whatever the controls say;
- MONITOR_TRAP_FLAG, PREEMPTION_TIMER: the CPU has no per-instruction stop and no timer (its instruction budget plays the preemption timer's part);
- RDTSC_EXITING, ENABLE_RDTSCP, CR3_STORE_EXITING, CR8 exiting, INVLPG/MWAIT/PAUSE/RDPMC/MOV-DR
  exiting: RDTSC/RDTSCP, MOV from CR3/CR8, PAUSE, RDPMC and MOV DR run inside the engine
  without an exit point (the TSC is the offset-scaled counter of :mod:`cetvm.cpu.tsc`);
- CPUID, XSETBV and VMCALL exit unconditionally, as on VMX hardware.

Decisions: cetvm's CPU runs no host code, so VM exit does not load the host-state area into the
registers (the hypervisor keeps the host's view; HOST_* are its fields to read); the other
guest state (GPRs, segments, CR0/CR3/CR4) lives in the CPU's registers, which the hypervisor
reads and writes through the vCPU's register interface (KVM's vmcs_writel(GUEST_RIP/CR4...)).
A fresh VMCS has every control 0 and an empty MSR bitmap, as after VMCLEAR; a vCPU without a
hypervisor runs from :func:`standalone_vmcs` (HLT and every I/O exit, MSRs per an empty bitmap,
XSAVES enabled), i.e. it behaves as without a hypervisor's intercepts.
"""

from __future__ import annotations

from collections.abc import Container

from cetvm.arch.msr import cet_ctl_fault, ssp_fault, ssp_table_fault
from cetvm.arch.regs import U64_MASK
from cetvm.arch.vmx import (
    EPT_VIOLATION_READ, EPT_VIOLATION_WRITE, INTR_INFO_DELIVER_CODE, INTR_INFO_VALID, INTR_TYPE_HARD_EXCEPTION,
    INTR_TYPE_SOFT_EXCEPTION, CpuBasedControls, SecondaryControls, VmcsField, VmEntryControls, vmcs_field_width,
)
from cetvm.cpu.exits import BASIC_EXIT_REASONS, Direction, ExitReason, VmExit


#: Each field's value mask (its width), by encoding.
_FIELD_MASKS: dict[int, int] = {int(f): ((1 << vmcs_field_width(f)) - 1) & U64_MASK for f in VmcsField}


class Vmcs:
    """A VMCS region: fields by encoding (unwritten fields read as 0, as after VMCLEAR) and the
    MSR bitmap the MSR_BITMAP field points at. VMREAD/VMWRITE run at every VM entry and exit,
    so fields are keyed by their plain encodings (an IntEnum member hashes as its value)."""

    def __init__(self) -> None:
        self._fields: dict[int, int] = {}
        self._msr_bitmap: Container[int] = frozenset()

    def read(self, field: VmcsField) -> int:
        """VMREAD (vmcs_readl() and friends); ValueError for an encoding cetvm does not know."""
        if field not in _FIELD_MASKS:
            VmcsField(field)  # raises ValueError naming the encoding
        return self._fields.get(field, 0)

    def write(self, field: VmcsField, value: int) -> None:
        """VMWRITE (vmcs_writel() and friends): the value truncated to the field's width."""
        mask = _FIELD_MASKS.get(field)
        if mask is None:
            VmcsField(field)  # raises ValueError naming the encoding
            return
        self._fields[field] = value & mask

    @property
    def msr_bitmap(self) -> Container[int]:
        """The MSR indices whose RDMSR/WRMSR exit (the page MSR_BITMAP points at)."""
        return self._msr_bitmap

    def set_msr_bitmap(self, bitmap: Container[int]) -> None:
        """Point MSR_BITMAP at ``bitmap`` (vmcs_write64(MSR_BITMAP, __pa(msr_bitmap)))."""
        self._msr_bitmap = bitmap

    def record_exit(self, exit_: VmExit) -> None:
        """The exit-information fields of a VM exit [SDM Vol. 3 §29.2]: VM_EXIT_REASON,
        EXIT_QUALIFICATION, VM_EXIT_INSTRUCTION_LEN; for an exception VM_EXIT_INTR_INFO and its
        error code (the qualification of a #PF is its linear address); for an MMIO access (an
        EPT violation) the access kind and GUEST_PHYSICAL_ADDRESS. cetvm's own stops without an
        architectural reason leave the fields as they were."""
        reason = exit_.vmx_reason if exit_.vmx_reason is not None else BASIC_EXIT_REASONS.get(exit_.reason)
        if reason is None:
            return
        if exit_.reason is ExitReason.VMX_INSTRUCTION:
            self.write(VmcsField.VMX_INSTRUCTION_INFO, exit_.instruction_info)
        qualification = exit_.qualification
        exc, mmio = exit_.exception, exit_.mmio
        if exc is not None:
            kind = INTR_TYPE_SOFT_EXCEPTION if exc.software else INTR_TYPE_HARD_EXCEPTION
            info = (exc.vector & 0xFF) | kind << 8 | INTR_INFO_VALID
            if exc.error_code is not None:
                info |= INTR_INFO_DELIVER_CODE
                self.write(VmcsField.VM_EXIT_INTR_ERROR_CODE, exc.error_code)
            self.write(VmcsField.VM_EXIT_INTR_INFO, info)
            if exc.cr2 is not None:
                qualification = exc.cr2
        elif mmio is not None:
            qualification = EPT_VIOLATION_READ if mmio.direction is Direction.IN else EPT_VIOLATION_WRITE
            self.write(VmcsField.GUEST_PHYSICAL_ADDRESS, mmio.address)
        self.write(VmcsField.VM_EXIT_REASON, reason)
        self.write(VmcsField.EXIT_QUALIFICATION, qualification)
        self.write(VmcsField.VM_EXIT_INSTRUCTION_LEN, exit_.instruction_length)

    def entry_loads_cet(self) -> bool:
        return bool(self.read(VmcsField.VM_ENTRY_CONTROLS) & VmEntryControls.LOAD_CET_STATE)

    def cpu_based(self, control: CpuBasedControls) -> bool:
        """A primary processor-based VM-execution control is 1."""
        return bool(self._fields.get(VmcsField.CPU_BASED_VM_EXEC_CONTROL, 0) & control)

    def secondary(self, control: SecondaryControls) -> bool:
        """A secondary processor-based control is in force: it is 1 and the primary control
        "activate secondary controls" is 1 (else every secondary control acts as 0) [SDM Vol. 3
        §25.6.2]."""
        return (self.cpu_based(CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS)
                and bool(self._fields.get(VmcsField.SECONDARY_VM_EXEC_CONTROL, 0) & control))

    def msr_access_exits(self, index: int) -> bool:
        """RDMSR/WRMSR of MSR ``index`` exits: every one without "use MSR bitmaps", else those in
        the bitmap [SDM Vol. 3 §26.1.3]."""
        return not self.cpu_based(CpuBasedControls.USE_MSR_BITMAPS) or index in self._msr_bitmap


#: The controls of a vCPU run without a hypervisor (tests, benchmarks, `cetvm bench`): the exits
#: cetvm's CPU always had — HLT and I/O exit, MSRs exit per the (empty) bitmap — and XSAVES enabled.
STANDALONE_CPU_BASED = (CpuBasedControls.HLT_EXITING | CpuBasedControls.UNCONDITIONAL_IO_EXITING
                        | CpuBasedControls.USE_MSR_BITMAPS | CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS)
STANDALONE_SECONDARY = SecondaryControls.ENABLE_XSAVES | SecondaryControls.ENABLE_RDTSCP


def standalone_vmcs() -> Vmcs:
    """A VMCS with :data:`STANDALONE_CPU_BASED` and :data:`STANDALONE_SECONDARY` programmed."""
    vmcs = Vmcs()
    vmcs.write(VmcsField.CPU_BASED_VM_EXEC_CONTROL, STANDALONE_CPU_BASED)
    vmcs.write(VmcsField.SECONDARY_VM_EXEC_CONTROL, STANDALONE_SECONDARY)
    return vmcs


def guest_cet_state_fault(s_cet: int, ssp: int, intr_ssp_table: int, va_bits: int = 48) -> str | None:
    """The VM-entry checks of the guest CET state when VM_ENTRY_CONTROLS.LOAD_CET_STATE is 1
    [SDM Vol. 3 §28.3.1.1]: GUEST_S_CET without reserved bits and canonical, GUEST_SSP
    canonical with bits 1:0 clear, GUEST_INTR_SSP_TABLE canonical. None when entry may go on."""
    return (cet_ctl_fault("GUEST_S_CET", s_cet, va_bits) or ssp_fault("GUEST_SSP", ssp, va_bits)
            or ssp_table_fault("GUEST_INTR_SSP_TABLE", intr_ssp_table, va_bits))


#: The software exceptions the exception bitmap applies to: INT3 (#BP) and INTO (#OF) [SDM Vol. 3
#: §26.2 "Exceptions"]; INT n never exits through the bitmap.
SOFTWARE_EXCEPTION_VECTORS = frozenset({3, 4})


def software_exception_exits(event, vmcs: Vmcs) -> bool:
    """An INT3 / INTO the engine raised whose exception-bitmap bit is set (``event``: the CPU's
    pending event, with the address of the instruction that raised it)."""
    return (event.software and event.vector in SOFTWARE_EXCEPTION_VECTORS and event.instruction_rip is not None
            and bool(vmcs.read(VmcsField.EXCEPTION_BITMAP) >> event.vector & 1))
