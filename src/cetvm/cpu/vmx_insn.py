"""VMX instructions executed by a guest: the VM exit the processor takes for them.

In VMX non-root operation every VMX instruction (VMXON, VMXOFF, VMCLEAR, VMPTRLD, VMPTRST,
VMREAD, VMWRITE, VMLAUNCH, VMRESUME, INVEPT, INVVPID) causes a VM exit [SDM Vol. 3 §26.1.2],
after the checks whose priority is above the exit: #UD outside protected mode and in
compatibility mode [SDM Vol. 2 ch. 31 "VMX Instruction Reference", each instruction's
Operation]. The rest (CR4.VMXE, CPL, VMX operation, operands) is the hypervisor's to check:
it emulates the instruction for its guest (KVM's handle_vmxon ... handle_invvpid).

The exit carries what a hypervisor needs to decode the operands without fetching the
instruction [SDM Vol. 3 §28.2.1, §28.2.5]: the exit qualification is the memory operand's
displacement, VMX_INSTRUCTION_INFO names scaling, address size, segment, base and index
registers, the register operand(s) and whether the operand is a register. Decision: a
RIP-relative operand is reported with an invalid base and the qualification holding its
effective address (RIP of the next instruction + displacement), so the hypervisor's
computation (displacement + base + index * scale) gives the right address.

Nothing completes at the next run: the hypervisor sets RIP, RFLAGS and whatever else the
instruction changes (KVM's nested_vmx_succeed / kvm_skip_emulated_instruction), or injects a
fault instead.
"""

from __future__ import annotations

from iced_x86 import Instruction, Mnemonic as M, OpKind, Register, RegisterExt

from cetvm.arch import Cr0
from cetvm.arch.msr import Efer, Msr
from cetvm.arch.vmx import ExitReason as VmxExitReason
from cetvm.arch.vmx import VmxInstructionInfo
from cetvm.cpu.exits import ExitReason, VmExit
from cetvm.cpu.faults import ud

#: Each VMX instruction's basic exit reason [SDM Vol. 3 App. C].
VMX_INSTRUCTION_REASONS: dict[int, int] = {
    M.VMXON: VmxExitReason.VMON, M.VMXOFF: VmxExitReason.VMOFF, M.VMCLEAR: VmxExitReason.VMCLEAR,
    M.VMPTRLD: VmxExitReason.VMPTRLD, M.VMPTRST: VmxExitReason.VMPTRST, M.VMREAD: VmxExitReason.VMREAD,
    M.VMWRITE: VmxExitReason.VMWRITE, M.VMLAUNCH: VmxExitReason.VMLAUNCH, M.VMRESUME: VmxExitReason.VMRESUME,
    M.INVEPT: VmxExitReason.INVEPT, M.INVVPID: VmxExitReason.INVVPID,
}

#: Segment numbering of VMX_INSTRUCTION_INFO bits 17:15 [SDM Vol. 3 Table 28-12].
_SEGMENTS = {Register.ES: 0, Register.CS: 1, Register.SS: 2, Register.DS: 3, Register.FS: 4, Register.GS: 5}
_SCALING = {1: 0, 2: 1, 4: 2, 8: 3}


def gpr_number(reg: int) -> int:
    """A general-purpose register's number in exit information (0 RAX ... 15 R15)."""
    return RegisterExt.full_register(reg) - Register.RAX


def _address_size(instr: Instruction) -> int:
    """0 = 16-bit, 1 = 32-bit, 2 = 64-bit addressing (the memory operand's base/index width)."""
    for reg in (instr.memory_base, instr.memory_index):
        if reg not in (Register.NONE, Register.RIP, Register.EIP):
            return {2: 0, 4: 1, 8: 2}[RegisterExt.size(reg)]
    return 2 if instr.memory_displ_size in (0, 8) and instr.code_size == 3 else 1 if instr.memory_displ_size == 4 else 2


def instruction_info(instr: Instruction) -> tuple[VmxInstructionInfo, int]:
    """(VMX_INSTRUCTION_INFO, exit qualification) for a VMX instruction (module docstring)."""
    mem_op = next((n for n in range(instr.op_count) if instr.op_kind(n) == OpKind.MEMORY), None)
    regs = [gpr_number(instr.op_register(n)) for n in range(instr.op_count)
            if instr.op_kind(n) == OpKind.REGISTER]
    mn = instr.mnemonic
    reg1 = reg2 = 0
    if mn == M.VMREAD:  # VMREAD r/m, r: destination first, field encoding in the second
        reg1, reg2 = (regs[0], regs[1]) if mem_op is None else (0, regs[0])
    elif mn == M.VMWRITE:  # VMWRITE r, r/m: field encoding first, source value second
        reg1, reg2 = (regs[1], regs[0]) if mem_op is None else (0, regs[0])
    elif mn in (M.INVEPT, M.INVVPID):
        reg2 = regs[0]
    if mem_op is None:
        return VmxInstructionInfo(reg1=reg1, reg_form=True, reg2=reg2), 0
    rip_relative = instr.is_ip_rel_memory_operand
    base = None if rip_relative or instr.memory_base == Register.NONE else gpr_number(instr.memory_base)
    index = None if instr.memory_index == Register.NONE else gpr_number(instr.memory_index)
    segment = _SEGMENTS.get(instr.memory_segment, 3)
    qualification = instr.ip_rel_memory_address if rip_relative else instr.memory_displacement
    info = VmxInstructionInfo(scaling=_SCALING.get(instr.memory_index_scale, 0), reg1=reg1,
                              address_size=_address_size(instr), segment=segment, index=index, base=base,
                              reg2=reg2)
    return info, qualification


def vmx_instruction(vcpu, instr: Instruction) -> VmExit:
    """A VMX instruction exits to the hypervisor after the #UD checks of higher priority: real
    mode (CR0.PE = 0), compatibility mode (EFER.LMA = 1 and CS.L = 0) [SDM Vol. 2 VMXON
    Operation: "IF (register operand) or (CR0.PE = 0) or ... or (IA32_EFER.LMA = 1 and CS.L =
    0) THEN #UD"]. The other forms' register-operand #UD cannot occur: those encodings decode
    as other instructions (RDRAND / RDSEED)."""
    if not vcpu.cr0 & Cr0.PE:
        raise ud()
    if vcpu.msr(Msr.IA32_EFER) & Efer.LMA and not vcpu.long_mode:
        raise ud()
    info, qualification = instruction_info(instr)
    return VmExit(ExitReason.VMX_INSTRUCTION, instr.ip, instr.len, qualification=qualification & 0xFFFF_FFFF_FFFF_FFFF,
                  vmx_reason=VMX_INSTRUCTION_REASONS[instr.mnemonic], instruction_info=info.encode())
