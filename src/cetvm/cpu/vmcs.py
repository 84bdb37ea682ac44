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
  qualification of SDM Table 28-3 [SDM Vol. 3 §26.1.3];
- VM_ENTRY_CONTROLS.LOAD_CET_STATE: VM entry checks GUEST_S_CET, GUEST_SSP and
  GUEST_INTR_SSP_TABLE (:func:`guest_cet_state_fault`, SDM Vol. 3 §28.3.1.1) and loads them; a
  check that fails is a VM-entry failure: exit reason ENTRY_FAIL_GUEST_STATE with bit 31 set
  and nothing loaded [SDM Vol. 3 §28.8];
- at every VM exit the CPU saves S_CET, SSP and INTR_SSP_TABLE into the guest-state fields and
  reports the exit information (:meth:`Vmcs.record_exit`) [SDM Vol. 3 §29.2-29.3].

Decisions: cetvm's CPU runs no host code, so VM exit does not load the host-state area into the
registers (the hypervisor keeps the host's view; HOST_* are its fields to read); the other
guest state (GPRs, segments, CR0/CR3/CR4) lives in the CPU's registers, which the hypervisor
reads and writes through the vCPU's register interface (KVM's vmcs_writel(GUEST_RIP/CR4...)).
A fresh VMCS has every control 0 and an empty MSR bitmap: the CPU then exits on nothing but
what it always exits on (HLT, I/O, CPUID, XSETBV, VMCALL...), i.e. it behaves as without a
hypervisor's intercepts.
"""

from __future__ import annotations

from collections.abc import Container

from cetvm.arch.msr import cet_ctl_fault, ssp_fault, ssp_table_fault
from cetvm.arch.regs import U64_MASK
from cetvm.arch.vmx import (
    EPT_VIOLATION_READ, EPT_VIOLATION_WRITE, INTR_INFO_DELIVER_CODE, INTR_INFO_VALID, INTR_TYPE_HARD_EXCEPTION,
    INTR_TYPE_SOFT_EXCEPTION,
    VmcsField, VmEntryControls, vmcs_field_width,
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
