"""Nested VMX: L1's VMX instructions, emulated by KVM [K nested.c handle_vmxon ... handle_invvpid].

Every VMX instruction L1 executes exits (:mod:`cetvm.cpu.vmx_insn`); :func:`handle_vmx_instruction`
emulates it as KVM does, with the checks and results of SDM Vol. 3 ch. 31:

- VMXON: #UD unless CR4.VMXE; #GP(0) for CR0/CR4 outside the VMX fixed bits (KVM checks these
  itself, hardware cannot see L1's values; "KVM: nVMX: Inject #GP, not #UD, if "generic" VMXON
  CR0/CR4 check fails"); #GP(0) at CPL > 0; VMfailValid(15) in VMX
  operation; #GP(0) unless IA32_FEATURE_CONTROL is locked with VMXON outside SMX enabled; the
  region must be page aligned within MAXPHYADDR and start with the vmcs12 revision, else
  VMfailInvalid.
- Other instructions outside VMX operation: #UD; at CPL > 0: #GP(0) (nested_vmx_check_permission).
- VMCLEAR / VMPTRLD: address checks (VMfailValid 2/9), the VMXON pointer (3/10), the revision
  (11); VMPTRST stores the current-VMCS pointer; VMREAD/VMWRITE: VMfailInvalid without a
  current VMCS, 12 for a field that does not exist, 13 for a read-only field unless
  IA32_VMX_MISC[29] (which KVM reports, so L1 may write them).
- VMLAUNCH / VMRESUME: :mod:`cetvm.kvm.nested_entry`, which also dispatches the exits
  (:func:`cetvm.kvm.nested_entry.handle_vmx_instruction`).
- INVEPT / INVVPID: #UD (KVM reports neither EPT nor VPID to L1 here).
- Success clears CF, PF, AF, ZF, SF, OF; VMfailInvalid sets CF; VMfailValid sets ZF and stores
  the error number in VM_INSTRUCTION_ERROR of the current vmcs12 [SDM Vol. 3 §31.2].

The vmcs12 is cached while current and written back to L1's memory when it stops being current
(VMCLEAR, VMPTRLD of another, VMXOFF): nested_release_vmcs12 (:mod:`cetvm.kvm.vmcs12`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cetvm.arch import Cr4, Vector, is_canonical
from cetvm.arch.msr import FeatureControl, Msr
from cetvm.arch.regs import RFLAGS_AF, RFLAGS_CF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF, RFLAGS_ZF
from cetvm.arch.vmx import VmcsField, VmxInsnError, VmxInstructionInfo, vmcs_field_readonly
from cetvm.cpu.exits import VmExit
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access
from cetvm.cpu.state import GPR_NAMES
from cetvm.cpu.vmcs import Vmcs
from cetvm.kvm.msr import KvmMsrState, guest_maxphyaddr, nested_vmx_msrs_for
from cetvm.kvm.nested_caps import (
    CR0_FIXED0, CR0_FIXED1, CR4_FIXED0, VMCS12_REVISION, NestedVmxMsrs, vmcs12_cet_fields_exist,
)
from cetvm.kvm.vcpu import VcpuArch
from cetvm.kvm.vmcs12 import LAUNCH_STATE_OFFSET, REVISION_MASK, SHADOW_VMCS_BIT, Vmcs12, field_access, vmcs12_fields

INVALID_GPA = 0xFFFF_FFFF_FFFF_FFFF
PAGE_SIZE = 0x1000
#: VMXON needs IA32_FEATURE_CONTROL locked with VMXON outside SMX enabled (VMXON_NEEDED_FEATURES).
VMXON_NEEDED_FEATURES = int(FeatureControl.LOCKED | FeatureControl.VMXON_OUTSIDE_SMX)
VMX_ARITH_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF


class NestedVcpu(Protocol):
    """What nested VMX needs of a vCPU: the CPU, KVM's vcpu->arch and MSR state, and its
    nested state."""

    cpu: object
    state: VcpuArch
    msrs: KvmMsrState
    nested: "NestedVmx"

    def kvm_msr_with_filter(self, index: int, data: int | None = None) -> tuple[bool, int]:
        """A RDMSR (``data`` None) / WRMSR KVM makes for the guest (kvm_get/set_msr_with_filter)."""
        ...


@dataclass
class PreVmenterCet:
    """vmx->nested.pre_vmenter_{s_cet,ssp,ssp_tbl}: L1's CET state at VM entry, carried into
    L2 when L1 does not use VM_ENTRY_LOAD_CET_STATE."""

    s_cet: int = 0
    ssp: int = 0
    ssp_tbl: int = 0


@dataclass
class NestedVmx:
    """vmx->nested: VMX operation, the current vmcs12 and whether L2 runs (guest mode)."""

    msrs: NestedVmxMsrs
    fields: frozenset[int]
    vmxon: bool = False
    vmxon_ptr: int = INVALID_GPA
    current_vmptr: int = INVALID_GPA
    cached_vmcs12: Vmcs12 | None = None
    guest_mode: bool = False
    vmcs02: Vmcs | None = None
    #: L1's VMCS while L2 runs (KVM's vmcs01; ``state.vmcs`` is then vmcs02)
    vmcs01: Vmcs | None = None
    #: an external interrupt that caused a VM exit to L1 (no acknowledge-on-exit): still pending,
    #: delivered to L1 when its window opens, or another exit if L1 re-enters L2 first
    irq_for_l1: int | None = None
    #: a VMX abort happened (nested_vmx_abort → KVM_REQ_TRIPLE_FAULT): the vCPU shuts down
    vmx_abort: int | None = None
    pre_vmenter: PreVmenterCet = field(default_factory=PreVmenterCet)

    @classmethod
    def create(cls, state: VcpuArch) -> "NestedVmx":
        return cls(nested_vmx_msrs_for(state), vmcs12_fields(vmcs12_cet_fields_exist(state.caps)))

    def after_set_cpuid(self, state: VcpuArch) -> None:
        """vmx_vcpu_after_set_cpuid → nested_vmx_cr_fixed1_bits_update and
        nested_vmx_entry_exit_ctls_update."""
        self.msrs = nested_vmx_msrs_for(state)

    @property
    def vmcs12(self) -> Vmcs12:
        """get_vmcs12(): the current vmcs12 (callers check that there is one)."""
        if self.cached_vmcs12 is None:
            raise LookupError("no current VMCS")
        return self.cached_vmcs12


# ----------------------------------------------------------------------------- guest values
def nested_vmx_allowed(state: VcpuArch) -> bool:
    """nested_vmx_allowed(): kvm_intel nested=1 and the guest CPUID shows VMX."""
    return state.caps.host.nested_vmx and state.cpuid.guest_cpuid_has("vmx")


def fixed_bits_valid(value: int, fixed0: int, fixed1: int) -> bool:
    """fixed_bits_valid(): every fixed-0 bit set, no bit outside fixed-1 set [SDM App. A.7/A.8]."""
    return value & fixed0 == fixed0 and not value & ~fixed1


def nested_cr0_valid(value: int) -> bool:
    return fixed_bits_valid(value, CR0_FIXED0, CR0_FIXED1)


def nested_cr4_valid(msrs: NestedVmxMsrs, value: int) -> bool:
    return fixed_bits_valid(value, CR4_FIXED0, msrs.cr4_fixed1)


def page_address_valid(state: VcpuArch, gpa: int) -> bool:
    """page_address_valid(): 4 KiB aligned and below MAXPHYADDR."""
    return not gpa & (PAGE_SIZE - 1) and not gpa >> guest_maxphyaddr(state)


def gpr(cpu, number: int, long_mode: bool) -> int:
    value = cpu.reg(GPR_NAMES[number])
    return value if long_mode else value & 0xFFFF_FFFF


def set_gpr(cpu, number: int, value: int, long_mode: bool) -> None:
    cpu.set_reg(GPR_NAMES[number], value if long_mode else value & 0xFFFF_FFFF)


_SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")


def get_vmx_mem_address(cpu, qualification: int, info: VmxInstructionInfo) -> int:
    """get_vmx_mem_address(): the linear address of a VMX instruction's memory operand from the
    exit qualification (displacement) and VMX_INSTRUCTION_INFO [SDM Vol. 3 §28.2.5]. In 64-bit
    mode only FS/GS add a base and a non-canonical address is #GP(0) (#SS(0) through SS)."""
    off = qualification
    if info.base is not None:
        off += gpr(cpu, info.base, True)
    if info.index is not None:
        off += gpr(cpu, info.index, True) << info.scaling
    off &= (0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF)[min(info.address_size, 2)]
    segment = _SEGMENT_NAMES[info.segment] if info.segment < len(_SEGMENT_NAMES) else "ds"
    if cpu.long_mode:
        if segment in ("fs", "gs"):
            off = (off + cpu.segment(segment).base) & 0xFFFF_FFFF_FFFF_FFFF
        if not is_canonical(off):
            raise GuestFault(Vector.SS if segment == "ss" else Vector.GP, 0)
        return off
    return (off + cpu.segment(segment).base) & 0xFFFF_FFFF


def read_operand(cpu, exit_: VmExit, size: int) -> int:
    """The memory operand's value (kvm_read_guest_virt; a fault is raised for injection)."""
    addr = get_vmx_mem_address(cpu, exit_.qualification, VmxInstructionInfo.decode(exit_.instruction_info))
    return int.from_bytes(cpu.read_virt(addr, size, Access.USER if cpu.cpl == 3 else Access.READ), "little")


def write_operand(cpu, exit_: VmExit, value: int, size: int) -> None:
    addr = get_vmx_mem_address(cpu, exit_.qualification, VmxInstructionInfo.decode(exit_.instruction_info))
    cpu.write_virt(addr, value.to_bytes(size, "little"), Access.USER if cpu.cpl == 3 else Access.WRITE)


# ----------------------------------------------------------------------------- results
def skip_emulated_instruction(cpu, exit_: VmExit) -> None:
    """kvm_skip_emulated_instruction(): RIP past the instruction, which retires."""
    cpu.set_reg("rip", exit_.rip + exit_.instruction_length)
    cpu.retire_emulated()


def _set_arith_flags(cpu, flags: int) -> None:
    cpu.set_reg("rflags", (cpu.reg("rflags") & ~VMX_ARITH_FLAGS) | flags)


def nested_vmx_succeed(cpu, exit_: VmExit) -> None:
    _set_arith_flags(cpu, 0)
    skip_emulated_instruction(cpu, exit_)


def nested_vmx_fail_invalid(cpu, exit_: VmExit) -> None:
    _set_arith_flags(cpu, RFLAGS_CF)
    skip_emulated_instruction(cpu, exit_)


def nested_vmx_fail(vcpu: NestedVcpu, exit_: VmExit, error: VmxInsnError) -> None:
    """nested_vmx_fail(): VMfailValid(error) with a current VMCS, VMfailInvalid without."""
    nested = vcpu.nested
    if nested.cached_vmcs12 is None:
        nested_vmx_fail_invalid(vcpu.cpu, exit_)
        return
    nested.vmcs12.write(VmcsField.VM_INSTRUCTION_ERROR, int(error))
    _set_arith_flags(vcpu.cpu, RFLAGS_ZF)
    skip_emulated_instruction(vcpu.cpu, exit_)


# ----------------------------------------------------------------------------- vmcs12 in memory
def nested_release_vmcs12(vcpu: NestedVcpu) -> None:
    """nested_release_vmcs12(): write the cached vmcs12 back to L1's memory; no current VMCS."""
    nested = vcpu.nested
    if nested.cached_vmcs12 is not None and nested.current_vmptr != INVALID_GPA:
        vcpu.cpu.write_phys(nested.current_vmptr, nested.cached_vmcs12.to_bytes())
    nested.cached_vmcs12 = None
    nested.current_vmptr = INVALID_GPA


def free_nested(vcpu: NestedVcpu) -> None:
    """free_nested() (VMXOFF, vCPU reset): leave VMX operation."""
    nested_release_vmcs12(vcpu)
    nested = vcpu.nested
    nested.vmxon = False
    nested.vmxon_ptr = INVALID_GPA
    nested.irq_for_l1 = None


def _read_guest(cpu, gpa: int, size: int) -> bytes | None:
    """kvm_read_guest(): None when the range is not RAM."""
    if not cpu.is_ram(gpa, size):
        return None
    return cpu.read_phys(gpa, size)


# ----------------------------------------------------------------------------- handlers
def nested_vmx_check_permission(vcpu: NestedVcpu) -> bool:
    """nested_vmx_check_permission(): #UD outside VMX operation, #GP(0) at CPL > 0."""
    if not vcpu.nested.vmxon:
        vcpu.cpu.inject_exception(Vector.UD)
        return False
    if vcpu.cpu.cpl:
        vcpu.cpu.inject_exception(Vector.GP, 0)
        return False
    return True


def _vmptr_operand(vcpu: NestedVcpu, exit_: VmExit) -> int | None:
    """nested_vmx_get_vmptr(): the 64-bit physical address operand (a fault is injected)."""
    try:
        return read_operand(vcpu.cpu, exit_, 8)
    except GuestFault as fault:
        vcpu.cpu.inject_exception(fault.vector, fault.error_code, fault.cr2)
        return None


def handle_vmxon(vcpu: NestedVcpu, exit_: VmExit) -> None:
    cpu, nested = vcpu.cpu, vcpu.nested
    if not nested_vmx_allowed(vcpu.state) or not cpu.cr4 & Cr4.VMXE:
        cpu.inject_exception(Vector.UD)
        return
    if not nested_cr0_valid(cpu.cr0) or not nested_cr4_valid(nested.msrs, cpu.cr4):
        cpu.inject_exception(Vector.GP, 0)
        return
    if cpu.cpl:
        cpu.inject_exception(Vector.GP, 0)
        return
    if nested.vmxon:
        nested_vmx_fail(vcpu, exit_, VmxInsnError.VMXON_IN_VMX_ROOT_OPERATION)
        return
    if vcpu.msrs.software.get(int(Msr.IA32_FEATURE_CONTROL), 0) & VMXON_NEEDED_FEATURES != VMXON_NEEDED_FEATURES:
        cpu.inject_exception(Vector.GP, 0)
        return
    vmptr = _vmptr_operand(vcpu, exit_)
    if vmptr is None:
        return
    header = _read_guest(cpu, vmptr, 4) if page_address_valid(vcpu.state, vmptr) else None
    if header is None or int.from_bytes(header, "little") != VMCS12_REVISION:
        nested_vmx_fail_invalid(cpu, exit_)
        return
    nested.vmxon_ptr = vmptr
    nested.vmxon = True
    nested_vmx_succeed(cpu, exit_)


def handle_vmxoff(vcpu: NestedVcpu, exit_: VmExit) -> None:
    if not nested_vmx_check_permission(vcpu):
        return
    free_nested(vcpu)
    nested_vmx_succeed(vcpu.cpu, exit_)


def _checked_vmptr(vcpu: NestedVcpu, exit_: VmExit, invalid: VmxInsnError, vmxon: VmxInsnError) -> int | None:
    """The VMCS pointer operand of VMCLEAR/VMPTRLD after the permission checks, page_address_valid
    (VMfailValid ``invalid``) and "not the VMXON region" (VMfailValid ``vmxon``); None when the
    instruction already ended (fault injected or VMfail)."""
    if not nested_vmx_check_permission(vcpu):
        return None
    vmptr = _vmptr_operand(vcpu, exit_)
    if vmptr is None:
        return None
    if not page_address_valid(vcpu.state, vmptr):
        nested_vmx_fail(vcpu, exit_, invalid)
        return None
    if vmptr == vcpu.nested.vmxon_ptr:
        nested_vmx_fail(vcpu, exit_, vmxon)
        return None
    return vmptr


def handle_vmclear(vcpu: NestedVcpu, exit_: VmExit) -> None:
    vmptr = _checked_vmptr(vcpu, exit_, VmxInsnError.VMCLEAR_INVALID_ADDRESS, VmxInsnError.VMCLEAR_VMXON_POINTER)
    if vmptr is None:
        return
    nested = vcpu.nested
    if vmptr == nested.current_vmptr:
        nested_release_vmcs12(vcpu)
    if vcpu.cpu.is_ram(vmptr + LAUNCH_STATE_OFFSET, 4):  # kvm_vcpu_write_guest(launch_state = 0)
        vcpu.cpu.write_phys(vmptr + LAUNCH_STATE_OFFSET, bytes(4))
    nested_vmx_succeed(vcpu.cpu, exit_)


def handle_vmptrld(vcpu: NestedVcpu, exit_: VmExit) -> None:
    vmptr = _checked_vmptr(vcpu, exit_, VmxInsnError.VMPTRLD_INVALID_ADDRESS, VmxInsnError.VMPTRLD_VMXON_POINTER)
    if vmptr is None:
        return
    nested, cpu = vcpu.nested, vcpu.cpu
    if nested.current_vmptr != vmptr:
        region = _read_guest(cpu, vmptr, PAGE_SIZE)
        if region is None:  # kvm_vcpu_map() fails: KVM reports an invalid address
            nested_vmx_fail(vcpu, exit_, VmxInsnError.VMPTRLD_INVALID_ADDRESS)
            return
        new = Vmcs12.from_bytes(region)
        if new.revision_id & REVISION_MASK != VMCS12_REVISION or new.revision_id & SHADOW_VMCS_BIT:
            nested_vmx_fail(vcpu, exit_, VmxInsnError.VMPTRLD_INCORRECT_VMCS_REVISION_ID)
            return
        nested_release_vmcs12(vcpu)
        nested.cached_vmcs12 = new
        nested.current_vmptr = vmptr
    nested_vmx_succeed(cpu, exit_)


def handle_vmptrst(vcpu: NestedVcpu, exit_: VmExit) -> None:
    if not nested_vmx_check_permission(vcpu):
        return
    try:
        write_operand(vcpu.cpu, exit_, vcpu.nested.current_vmptr, 8)
    except GuestFault as fault:
        vcpu.cpu.inject_exception(fault.vector, fault.error_code, fault.cr2)
        return
    nested_vmx_succeed(vcpu.cpu, exit_)


def _operand_size(cpu) -> int:
    """VMREAD/VMWRITE operate on 64 bits in 64-bit mode, 32 bits otherwise."""
    return 8 if cpu.long_mode else 4


def handle_vmread(vcpu: NestedVcpu, exit_: VmExit) -> None:
    if not nested_vmx_check_permission(vcpu):
        return
    cpu, nested = vcpu.cpu, vcpu.nested
    info = VmxInstructionInfo.decode(exit_.instruction_info)
    if nested.cached_vmcs12 is None:
        nested_vmx_fail_invalid(cpu, exit_)
        return
    access = field_access(gpr(cpu, info.reg2, cpu.long_mode), nested.fields)
    if access is None:
        nested_vmx_fail(vcpu, exit_, VmxInsnError.UNSUPPORTED_VMCS_COMPONENT)
        return
    value = nested.vmcs12.read_access(*access)
    if info.reg_form:
        set_gpr(cpu, info.reg1, value, cpu.long_mode)
    else:
        size = _operand_size(cpu)
        try:
            write_operand(cpu, exit_, value & ((1 << 8 * size) - 1), size)
        except GuestFault as fault:
            cpu.inject_exception(fault.vector, fault.error_code, fault.cr2)
            return
    nested_vmx_succeed(cpu, exit_)


#: The AR-byte fields: KVM drops their reserved bits on VMWRITE (value &= 0x1f0ff).
_AR_FIELDS = range(VmcsField.GUEST_ES_AR_BYTES, VmcsField.GUEST_TR_AR_BYTES + 1)
VMX_AR_BYTES_MASK = 0x1F0FF


def handle_vmwrite(vcpu: NestedVcpu, exit_: VmExit) -> None:
    if not nested_vmx_check_permission(vcpu):
        return
    cpu, nested = vcpu.cpu, vcpu.nested
    info = VmxInstructionInfo.decode(exit_.instruction_info)
    if info.reg_form:
        value = gpr(cpu, info.reg1, cpu.long_mode)
    else:
        try:
            value = read_operand(cpu, exit_, _operand_size(cpu))
        except GuestFault as fault:
            cpu.inject_exception(fault.vector, fault.error_code, fault.cr2)
            return
    if nested.cached_vmcs12 is None:
        nested_vmx_fail_invalid(cpu, exit_)
        return
    access = field_access(gpr(cpu, info.reg2, cpu.long_mode), nested.fields)
    if access is None:
        nested_vmx_fail(vcpu, exit_, VmxInsnError.UNSUPPORTED_VMCS_COMPONENT)
        return
    encoding, high = access
    if vmcs_field_readonly(encoding) and not nested.msrs.misc & (1 << 29):
        nested_vmx_fail(vcpu, exit_, VmxInsnError.VMWRITE_READ_ONLY_VMCS_COMPONENT)
        return
    if encoding in _AR_FIELDS:
        value &= VMX_AR_BYTES_MASK
    nested.vmcs12.write_access(encoding, high, value)
    nested_vmx_succeed(cpu, exit_)


def handle_invept_invvpid(vcpu: NestedVcpu, exit_: VmExit) -> None:
    """handle_invept / handle_invvpid: #UD when L1's VMX capabilities lack EPT / VPID (as
    here); otherwise the permission checks first."""
    vcpu.cpu.inject_exception(Vector.UD)
