"""Python emulation of the instructions the engine stops in front of (see :mod:`cetvm.cpu.decode`).

Each handler gets the vCPU and the decoded instruction (RIP at the instruction), raises
GuestFault for an architectural fault (nothing changed), and either completes the instruction
(advancing RIP) and returns None, or returns a VmExit whose completion runs at the next
``Vcpu.run``. Control transfers Unicorn executes correctly except for CET (IRETQ, SYSRET, far
RET/CALL/JMP) get their CET effects here and are then executed once by the engine
(``Vcpu.step_in_engine``); SYSCALL (a NOP in Unicorn without a hook) is emulated completely.
"""

from __future__ import annotations

from typing import Callable

from iced_x86 import Code, CodeSize, Instruction, Mnemonic as M, OpKind, Register, UsedMemory

from cetvm import NotSupportedError
from cetvm.arch import Cr0, Cr4, Msr, Vector, is_canonical
from cetvm.arch.apic import tpr_below_threshold
from cetvm.arch.msr import CET_CTL_MSRS, CET_MSR_SET, CET_SHSTK_BITS, Efer, cet_msr_value_fault
from cetvm.arch.regs import (
    CR8_TPR, DR7_ENABLE_BITS, DR7_GD,
    RFLAGS_AF, RFLAGS_CF, RFLAGS_IF, RFLAGS_IOPL, RFLAGS_OF, RFLAGS_PF, RFLAGS_RF, RFLAGS_SF, RFLAGS_TF, RFLAGS_VIF,
    RFLAGS_VIP, RFLAGS_VM, RFLAGS_ZF,
)
from cetvm.arch.vmx import (
    CR_ACCESS_TYPE_MOV_TO_CR, CpuBasedControls, VmcsField, cr_access_qualification, io_qualification,
)
from cetvm.cpu.cet import far_transfers
from cetvm.cpu.cet import instructions as cet_insn
from cetvm.cpu.cet.ibt import ibt_arm_on_transfer
from cetvm.cpu.decode import MOV_DR_CODES, is_mov_from_shadowed_cr, is_mov_to_ss
from cetvm.cpu.engine_features import ENGINE_MSRS
from cetvm.cpu.exits import Direction, ExitReason, IoExit, MmioStepHooks, MsrExit, VmExit
from cetvm.cpu import string_ops, xsave
from cetvm.cpu.events import read_descriptor, real_mode_stack
from cetvm.cpu.faults import GuestFault, NoRamAccess, gp, ud
from cetvm.cpu.paging import Access
from cetvm.cpu.state import SegAttr, Segment
from cetvm.cpu.vmx_insn import VMX_INSTRUCTION_REASONS, vmx_instruction
from cetvm.arch.regs import U64_MASK as _U64




def can_emulate(instr: Instruction) -> bool:
    return (instr.mnemonic in _HANDLERS or _is_mov_to_cr(instr) or is_mov_from_shadowed_cr(instr)
            or instr.code in MOV_DR_CODES or is_mov_to_ss(instr) or _is_far_transfer(instr))


def emulate(vcpu, instr: Instruction) -> VmExit | None:
    handler = _HANDLERS.get(instr.mnemonic)
    if handler is None:
        if _is_mov_to_cr(instr):
            handler = mov_to_cr
        elif is_mov_from_shadowed_cr(instr):
            handler = mov_from_cr
        elif instr.code in MOV_DR_CODES:
            handler = mov_dr
        elif _is_far_transfer(instr):
            handler = far_transfer
        elif is_mov_to_ss(instr):
            handler = mov_to_ss
        else:
            raise NotSupportedError(f"no emulation for {instr} at {instr.ip:#x}")
    return handler(vcpu, instr)


def _is_mov_to_cr(instr: Instruction) -> bool:
    return instr.mnemonic == M.MOV and instr.op0_kind == OpKind.REGISTER and Register.CR0 <= instr.op0_register <= Register.CR15


def _is_far_transfer(instr: Instruction) -> bool:
    return instr.mnemonic == M.RETF or instr.is_call_far or instr.is_call_far_indirect or instr.is_jmp_far or instr.is_jmp_far_indirect


#: DR6: B0-B3 (trap bits 3:0), BS (14); bits 31:16 and 11:4 read as 1 [SDM Vol. 3 §18.2.3].
DR6_TRAP_BITS = 0xF
DR6_BS = 1 << 14
DR6_BD = 1 << 13
DR6_FIXED_1 = 0xFFFF_0FF0


def _advance(vcpu, instr: Instruction) -> None:
    """Retire an emulated instruction: RIP past it, and with RFLAGS.TF the single-step trap the
    CPU would take after it (#DB with DR6.BS, RIP at the next instruction) — KVM's
    kvm_skip_emulated_instruction → kvm_vcpu_do_singlestep (kvm-unit-tests' debug:
    "Single-step #DB on emulated instructions", CPUID and IN in its sequence). RFLAGS.RF is
    cleared, as after every instruction that completes [SDM Vol. 3 §18.3.1.1] (KVM's emulator:
    ctxt->eflags &= ~X86_EFLAGS_RF): an RF set for this instruction (a fault handler's IRETQ,
    :func:`suppress_instruction_breakpoint`) must not shield the next one too."""
    vcpu.rip = instr.next_ip
    vcpu.retire_emulated()
    rflags = vcpu.reg("rflags")
    if rflags & RFLAGS_RF:
        vcpu.set_reg("rflags", rflags & ~RFLAGS_RF)
    if rflags & RFLAGS_TF:
        single_step_trap(vcpu)


def single_step_trap(vcpu) -> None:
    """The single-step #DB after an instruction that retired with RFLAGS.TF set: DR6.BS, RIP
    at the next instruction [SDM Vol. 3 §18.3.1.4]."""
    vcpu.set_reg("dr6", (vcpu.reg("dr6") & ~DR6_TRAP_BITS) | DR6_FIXED_1 | DR6_BS)
    vcpu.raise_fault(GuestFault(Vector.DB))


def _completion_advance(vcpu, instr: Instruction) -> Callable[[], None]:
    def complete() -> None:
        _advance(vcpu, instr)
    return complete


def _privilege(vcpu) -> Access:
    """The privilege of a data access the instruction makes: user at CPL 3."""
    return Access.USER if vcpu.cpl == 3 else Access.READ


def _require_cpl0(vcpu) -> None:
    if vcpu.cpl != 0:
        raise gp(0)


# ----------------------------------------------------------------------------- registers/operands
_REG64 = {}
_GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
#: A GPR's number in instruction encodings and exit information (0 RAX ... 15 R15).
_GPR_NUMBER = {name: i for i, name in enumerate(_GPR_NAMES)}
for _i, _name in enumerate(_GPR_NAMES):
    _REG64[Register.RAX + _i] = (_name, 8)
    _REG64[Register.EAX + _i] = (_name, 4)
    _REG64[Register.AX + _i] = (_name, 2)
    _REG64[(Register.AL + _i) if _i < 4 else (Register.SPL + _i - 4) if _i < 8 else (Register.R8L + _i - 8)] = (_name, 1)


def read_register(vcpu, reg: int) -> int:
    name, size = _REG64[reg]
    return vcpu.reg(name) & ((1 << (8 * size)) - 1)


def write_register(vcpu, reg: int, value: int) -> None:
    """Write a GPR with x86 semantics: 32-bit writes zero-extend, 8/16-bit writes merge."""
    name, size = _REG64[reg]
    if size >= 4:
        vcpu.set_reg(name, value & ((1 << (8 * size)) - 1))
    else:
        mask = (1 << (8 * size)) - 1
        vcpu.set_reg(name, (vcpu.reg(name) & ~mask) | (value & mask))


def _base_index_displacement(vcpu, base: int, index: int, scale: int, displacement: int) -> int:
    """base + index * scale + displacement from the current registers (Register.NONE: absent)."""
    addr = displacement
    if base != Register.NONE:
        addr += read_register(vcpu, base)
    if index != Register.NONE:
        addr += read_register(vcpu, index) * scale
    return addr


def _segment_base(vcpu, segment: int) -> int:
    """The base a segment override adds in 64-bit mode: FS's and GS's MSRs, 0 for the others."""
    if segment in (Register.FS, Register.GS):
        return vcpu.msr(Msr.IA32_FS_BASE if segment == Register.FS else Msr.IA32_GS_BASE)
    return 0


def address_mask(vcpu) -> int:
    """The linear-address width of the current mode: 64 bits in 64-bit mode, else 32."""
    return _U64 if vcpu.long_mode else 0xFFFF_FFFF


def effective_address(vcpu, instr: Instruction) -> int:
    """Linear address of the memory operand (FS/GS bases applied; other bases are 0 in 64-bit mode)."""
    if instr.is_ip_rel_memory_operand:
        addr = instr.ip_rel_memory_address
    else:
        addr = _base_index_displacement(vcpu, instr.memory_base, instr.memory_index, instr.memory_index_scale,
                                        instr.memory_displacement)
    addr += _segment_base(vcpu, instr.memory_segment)
    addr &= address_mask(vcpu)
    if vcpu.long_mode and not is_canonical(addr):
        raise GuestFault(Vector.SS, 0) if instr.memory_base in (Register.RSP, Register.RBP) else gp(0)
    return addr


#: The bit-test instructions whose register bit offset can reach past their memory operand.
BIT_TEST_MNEMONICS = frozenset({M.BT, M.BTS, M.BTR, M.BTC})


def is_bit_string_access(instr: Instruction) -> bool:
    """BT/BTS/BTR/BTC m, r: a register bit offset into a bit string in memory."""
    return (instr.mnemonic in BIT_TEST_MNEMONICS and instr.op0_kind == OpKind.MEMORY
            and instr.op1_kind == OpKind.REGISTER)


def bit_string_address(vcpu, instr: Instruction) -> int:
    """Linear address of the operand BT/BTS/BTR/BTC m, r accesses: the register is a signed bit
    offset into a bit string that starts at the memory operand, so the operand read is the one
    of operand size that holds the bit — EA + size * (offset DIV (8 * size)), DIV rounding
    down [SDM Vol. 2A BT "Operation", Table 3-2 note; KVM's fetch_bit_operand()]."""
    size = _REG64[instr.op1_register][1]
    offset = read_register(vcpu, instr.op1_register)
    if offset >> (8 * size - 1):
        offset -= 1 << (8 * size)
    return (effective_address(vcpu, instr) + size * (offset // (8 * size))) & address_mask(vcpu)


def used_memory_address(vcpu, instr: Instruction, used: UsedMemory) -> int:
    """Linear address in 64-bit mode of one memory access of ``instr`` as iced-x86 lists it
    (explicit operands and implicit ones: the string instructions' [RSI]/[RDI], the stack), from
    the current registers (FS/GS bases applied, the other bases are 0; a 32-bit address size
    wraps at 4 GiB)."""
    if used.base in (Register.RIP, Register.EIP):
        addr = instr.ip_rel_memory_address
    else:
        addr = _base_index_displacement(vcpu, used.base, used.index, used.scale, used.displacement_i64)
    addr += _segment_base(vcpu, used.segment)
    return addr & (_U64 if used.address_size == CodeSize.CODE64 else 0xFFFF_FFFF)


def store_value(vcpu, instr: Instruction, size: int) -> int:
    """The value a store instruction writes (its register or immediate source operand)."""
    for n in range(instr.op_count):
        kind = instr.op_kind(n)
        if kind == OpKind.REGISTER and n > 0:
            return read_register(vcpu, instr.op_register(n)) & ((1 << (8 * size)) - 1)
        if kind in (OpKind.IMMEDIATE8, OpKind.IMMEDIATE16, OpKind.IMMEDIATE32, OpKind.IMMEDIATE8TO32,
                    OpKind.IMMEDIATE8TO64, OpKind.IMMEDIATE32TO64, OpKind.IMMEDIATE64, OpKind.IMMEDIATE8TO16):
            return instr.immediate(n) & ((1 << (8 * size)) - 1)
    raise NotSupportedError(f"cannot tell the value {instr} at {instr.ip:#x} stores to MMIO")


# ----------------------------------------------------------------------------- exits
def hlt(vcpu, instr: Instruction) -> VmExit | None:
    """HLT [SDM Vol. 2 HLT; Vol. 3 §26.1.3]: exits with "HLT exiting"; without it the HLT retires
    and the CPU enters the HLT activity state (:meth:`cetvm.cpu.vcpu.Vcpu.halt`)."""
    _require_cpl0(vcpu)
    if not vcpu.vmcs.cpu_based(CpuBasedControls.HLT_EXITING):
        _advance(vcpu, instr)
        vcpu.halt()
        return None
    vcpu.add_completion(_completion_advance(vcpu, instr))
    return VmExit(ExitReason.HLT, instr.ip, instr.len)


def cpuid(vcpu, instr: Instruction) -> VmExit:
    """CPUID exits unconditionally (VMX); the hypervisor writes RAX/RBX/RCX/RDX."""
    vcpu.add_completion(_completion_advance(vcpu, instr))
    return VmExit(ExitReason.CPUID, instr.ip, instr.len)


def invd(vcpu, instr: Instruction) -> VmExit:
    """INVD [SDM Vol. 2A INVD]: #GP(0) above CPL 0, else a VM exit, unconditionally in VMX
    non-root operation [SDM Vol. 3 §26.1.2]; the hypervisor completes it (KVM: handle_invd
    emulates it as a NOP)."""
    _require_cpl0(vcpu)
    vcpu.add_completion(_completion_advance(vcpu, instr))
    return VmExit(ExitReason.INVD, instr.ip, instr.len)


def vmcall(vcpu, instr: Instruction) -> VmExit:
    """VMCALL exits (VMX). VMMCALL (AMD's) is #UD on Intel hardware; KVM intercepts the #UD and
    its emulator takes it as a hypercall too (em_hypercall; kvm_fix_hypercall may patch the
    bytes to VMCALL, which cetvm does not: both forms exit the same way, the guest may not
    rely on the patch)."""
    vcpu.add_completion(_completion_advance(vcpu, instr))
    return VmExit(ExitReason.VMCALL, instr.ip, instr.len)


def xsetbv(vcpu, instr: Instruction) -> VmExit:
    """XSETBV exits unconditionally (VMX); the hypervisor checks and sets ``vcpu.xcr0``."""
    if not vcpu.cr4 & Cr4.OSXSAVE:
        raise ud()
    _require_cpl0(vcpu)
    value = (vcpu.reg("rdx") & 0xFFFF_FFFF) << 32 | (vcpu.reg("rax") & 0xFFFF_FFFF)
    vcpu.add_completion(_completion_advance(vcpu, instr))
    return VmExit(ExitReason.XSETBV, instr.ip, instr.len, xcr_index=vcpu.reg("rcx") & 0xFFFF_FFFF, xcr_value=value)


def port_io(vcpu, instr: Instruction) -> VmExit:
    """IN/OUT (imm8 or DX port). I/O permission (IOPL / TSS bitmap) is not checked: decision,
    cetvm guests do port I/O at CPL 0."""
    if instr.mnemonic == M.IN:
        data_reg, port_op = instr.op0_register, 1
    else:
        data_reg, port_op = instr.op1_register, 0
    if instr.op_kind(port_op) == OpKind.REGISTER:
        port = vcpu.reg("rdx") & 0xFFFF
    else:
        port = instr.immediate8
    size = _REG64[data_reg][1]
    if instr.mnemonic == M.IN:
        io = IoExit(port, size, Direction.IN)

        def complete_in() -> None:
            write_register(vcpu, data_reg, io.data)
            _advance(vcpu, instr)
        vcpu.add_completion(complete_in)
    else:
        io = IoExit(port, size, Direction.OUT, read_register(vcpu, data_reg))
        vcpu.add_completion(_completion_advance(vcpu, instr))
    qualification = io_qualification(size, io.direction is Direction.IN, port,
                                      immediate=instr.op_kind(port_op) != OpKind.REGISTER)
    return VmExit(ExitReason.IO, instr.ip, instr.len, io=io, qualification=qualification)


def string_io(vcpu, instr: Instruction) -> VmExit | None:
    """INS/OUTS, REP or not: :func:`cetvm.cpu.string_ops.port_string_iteration`."""
    return string_ops.port_string_iteration(vcpu, instr)


# ----------------------------------------------------------------------------- MSRs
def cet_msr_write_fault(vcpu, index: int, value: int) -> bool:
    """WRMSR #GP(0) of a CET MSR value: the architectural check of :func:`cetvm.arch.msr.
    cet_msr_value_fault` plus, for U_CET/S_CET, the bits CPUID makes reserved (1:0 without
    SHSTK; 5:2 and 63:10 without IBT) [SDM Vol. 4 Table 2-2]."""
    if index in CET_CTL_MSRS and vcpu is not None:
        if not vcpu.guest_shstk and value & CET_SHSTK_BITS:
            return True
        if not vcpu.guest_ibt and value & ~int(CET_SHSTK_BITS):
            return True
    return cet_msr_value_fault(index, value) is not None


def cet_msr_exists(vcpu, index: int) -> bool:
    """U_CET/S_CET exist with SHSTK or IBT; PLn_SSP and the SSP table only with SHSTK."""
    if index in (Msr.IA32_U_CET, Msr.IA32_S_CET):
        return vcpu.guest_shstk or vcpu.guest_ibt
    return vcpu.guest_shstk


def _model_has_xsaves(vcpu) -> bool:
    return bool(vcpu.model.get(0xD, 1)[0] & (1 << 3))


def rdmsr(vcpu, instr: Instruction) -> VmExit | None:
    _require_cpl0(vcpu)
    index = vcpu.reg("rcx") & 0xFFFF_FFFF
    if vcpu.vmcs.msr_access_exits(index):
        msr = MsrExit(index)

        def complete() -> None:
            if msr.error:
                vcpu.inject_exception(Vector.GP, 0)
                return
            vcpu.set_reg("rax", msr.data & 0xFFFF_FFFF)
            vcpu.set_reg("rdx", (msr.data >> 32) & 0xFFFF_FFFF)
            _advance(vcpu, instr)
        vcpu.add_completion(complete)
        return VmExit(ExitReason.RDMSR, instr.ip, instr.len, msr=msr)
    if index in CET_MSR_SET:
        if not cet_msr_exists(vcpu, index):
            raise gp(0)
        value = vcpu.msr(index)
    elif index == Msr.IA32_XSS:
        if not _model_has_xsaves(vcpu):
            raise gp(0)
        value = vcpu.xss
    elif index in ENGINE_MSRS:
        value = vcpu.msr(index)
    else:
        raise gp(0)
    vcpu.set_reg("rax", value & 0xFFFF_FFFF)
    vcpu.set_reg("rdx", (value >> 32) & 0xFFFF_FFFF)
    _advance(vcpu, instr)
    return None


def wrmsr(vcpu, instr: Instruction) -> VmExit | None:
    _require_cpl0(vcpu)
    index = vcpu.reg("rcx") & 0xFFFF_FFFF
    value = (vcpu.reg("rdx") & 0xFFFF_FFFF) << 32 | (vcpu.reg("rax") & 0xFFFF_FFFF)
    if vcpu.vmcs.msr_access_exits(index):
        msr = MsrExit(index, value)

        def complete() -> None:
            if msr.error:
                vcpu.inject_exception(Vector.GP, 0)
                return
            _advance(vcpu, instr)
        vcpu.add_completion(complete)
        return VmExit(ExitReason.WRMSR, instr.ip, instr.len, msr=msr)
    if index in CET_MSR_SET:
        if not cet_msr_exists(vcpu, index) or cet_msr_write_fault(vcpu, index, value):
            raise gp(0)
        vcpu.set_msr(index, value)
    elif index == Msr.IA32_XSS:
        if not _model_has_xsaves(vcpu) or value & ~vcpu.model.xss_mask:
            raise gp(0)
        vcpu.xss = value
    elif index in ENGINE_MSRS:
        if index == Msr.IA32_EFER and value & Efer.LMA != vcpu.msr(Msr.IA32_EFER) & Efer.LMA:
            value = (value & ~Efer.LMA) | (vcpu.msr(Msr.IA32_EFER) & Efer.LMA)  # LMA is read-only
        if index in (Msr.IA32_LSTAR, Msr.IA32_CSTAR, Msr.IA32_FS_BASE, Msr.IA32_GS_BASE, Msr.IA32_KERNEL_GS_BASE) \
                and not is_canonical(value):
            raise gp(0)
        vcpu.set_msr(index, value)
    else:
        raise gp(0)
    _advance(vcpu, instr)
    return None


# ----------------------------------------------------------------------------- control registers
def mov_to_cr(vcpu, instr: Instruction) -> VmExit | None:
    """MOV to CR0/CR3/CR4/CR8 with the CET rules [SDM Vol. 3 §2.5]:
    CR4.CET is reserved (#GP) unless the guest has SHSTK or IBT; setting CR4.CET with CR0.WP=0
    and clearing CR0.WP with CR4.CET=1 → #GP(0). A write changing a bit the VMCS's CR0/CR4
    guest/host mask gives the hypervisor exits first (:func:`cr_write_exit`). CR8 is kept as
    with a TPR shadow: a value below the VMCS's TPR threshold retires and then exits (TPR below
    threshold, trap-like). CR0 bits 63:32,
    or clearing CR0.PG in 64-bit mode → #GP(0) (found by the hostile-guest fuzz: the engine
    lost its mappings). Other reserved-bit checks are Unicorn's business and are not
    replicated (decision)."""
    _require_cpl0(vcpu)
    n = instr.op0_register - Register.CR0
    value = read_register(vcpu, instr.op1_register)
    if n in (0, 4):
        exit_ = cr_write_exit(vcpu, instr, n, value)
        if exit_ is not None:
            return exit_
        value = cr_write_keeping_host_bits(vcpu, n, value)
    elif n == 3 and vcpu.vmcs.cpu_based(CpuBasedControls.CR3_LOAD_EXITING):
        return _cr_access_exit(vcpu, instr, n)
    if n == 4:
        if value & Cr4.CET and not (vcpu.guest_shstk or vcpu.guest_ibt):
            raise gp(0)
        if value & Cr4.CET and not vcpu.cr0 & Cr0.WP:
            raise gp(0)
    elif n == 0:
        check_cr0_write(vcpu, value)
    elif n == 8 and value & ~CR8_TPR:
        raise gp(0)
    elif n not in (2, 3, 8):
        raise ud()
    vcpu.write_cr(n, value)
    _advance(vcpu, instr)
    if n == 8 and tpr_below_threshold(value, vcpu.vmcs.read(VmcsField.TPR_THRESHOLD)):
        return VmExit(ExitReason.TPR_BELOW_THRESHOLD, vcpu.rip)
    return None


#: (guest/host mask, read shadow) of CR0 and CR4.
_CR_MASK_FIELDS = {0: (VmcsField.CR0_GUEST_HOST_MASK, VmcsField.CR0_READ_SHADOW),
                   4: (VmcsField.CR4_GUEST_HOST_MASK, VmcsField.CR4_READ_SHADOW)}


def cr_write_exit(vcpu, instr: Instruction, n: int, value: int) -> VmExit | None:
    """MOV to CR0/CR4 exits when it would set a bit of the CR's guest/host mask to a value
    other than the read shadow's [SDM Vol. 3 §26.1.3], with the exit qualification of SDM
    Table 28-3. RIP stays at the instruction; the hypervisor writes the register and the
    completion retires the instruction, or it injects a fault instead."""
    mask_field, shadow_field = _CR_MASK_FIELDS[n]
    vmcs = vcpu.vmcs
    if not (value ^ vmcs.read(shadow_field)) & vmcs.read(mask_field):
        return None
    return _cr_access_exit(vcpu, instr, n)


def cr_write_keeping_host_bits(vcpu, n: int, value: int) -> int:
    """A MOV to CR0/CR4 that does not exit leaves the bits of the guest/host mask as they are
    [SDM Vol. 3 §26.3 "MOV to CR0"/"MOV to CR4"]: the value written there is the read shadow's."""
    mask = vcpu.vmcs.read(_CR_MASK_FIELDS[n][0])
    current = vcpu.cr0 if n == 0 else vcpu.cr4
    return (value & ~mask) | (current & mask)


def cr_read_shadowed(vcpu, n: int, value: int) -> int:
    """MOV from CR0/CR4 returns the read shadow's bits where the guest/host mask is set [SDM Vol. 3
    §26.3 "MOV from CR0"/"MOV from CR4"]."""
    mask_field, shadow_field = _CR_MASK_FIELDS[n]
    mask = vcpu.vmcs.read(mask_field)
    return (value & ~mask) | (vcpu.vmcs.read(shadow_field) & mask)


def _cr_access_exit(vcpu, instr: Instruction, n: int) -> VmExit:
    """The CR_ACCESS exit of MOV to CR``n`` (SDM Table 28-3 qualification)."""
    gpr = _GPR_NUMBER[_REG64[instr.op1_register][0]]
    vcpu.add_completion(_completion_advance(vcpu, instr))
    return VmExit(ExitReason.CR_ACCESS, instr.ip, instr.len,
                  qualification=cr_access_qualification(n, CR_ACCESS_TYPE_MOV_TO_CR, gpr))


def mov_from_cr(vcpu, instr: Instruction) -> None:
    """MOV r, CR0 / CR4 [SDM Vol. 2 MOV—Move to/from Control Registers: #GP(0) at CPL > 0]: the
    guest's CR0 or CR4 (see :data:`cetvm.cpu.registers.ENGINE_FORCED_CR4`), with the read
    shadow's bits where the VMCS's guest/host mask is set (:func:`cr_read_shadowed`;
    kvm-unit-tests' vmx "Read shadowing CR0"). (MOV from CR8 runs in the engine:
    :attr:`cetvm.cpu.registers.Registers.cr8`.)"""
    _require_cpl0(vcpu)
    n = 0 if instr.op1_register == Register.CR0 else 4
    write_register(vcpu, instr.op0_register, cr_read_shadowed(vcpu, n, vcpu.cr0 if n == 0 else vcpu.cr4))
    _advance(vcpu, instr)


def smsw(vcpu, instr: Instruction) -> VmExit | None:
    """SMSW [SDM Vol. 2B SMSW]: #GP(0) at CPL > 0 with CR4.UMIP; CR0 with the read shadow's bits
    where the CR0 guest/host mask is set [SDM Vol. 3 §26.3] — into a 16-bit register its low
    word (the rest kept), a 32- or 64-bit register all of it, memory its low word (kvm-unit-tests'
    realmode "smsw": after a MOV to CR0 setting CD, which KVM keeps clear in the real CR0).
    Decision: a store to memory without RAM (MMIO) is the engine's, through the MMIO exit path,
    and writes the engine's CR0 without the shadow."""
    if vcpu.cpl > 0 and vcpu.cr4 & Cr4.UMIP:
        raise gp(0)
    value = cr_read_shadowed(vcpu, 0, vcpu.cr0)
    if instr.op0_kind == OpKind.REGISTER:
        write_register(vcpu, instr.op0_register, value)  # a 16-bit register keeps its upper bits
    else:
        try:
            vcpu.write_virt(effective_address(vcpu, instr), (value & 0xFFFF).to_bytes(2, "little"),
                            Access.WRITE | (Access.USER if vcpu.cpl == 3 else Access.READ))
        except NoRamAccess:
            return vcpu.execute_with_mmio_operand(instr)
    _advance(vcpu, instr)
    return None


#: DR4 and DR5: aliases of DR6 and DR7 unless CR4.DE is set (then MOV to or from them is #UD).
_DR_ALIASES = (Register.DR4, Register.DR5)


def mov_dr(vcpu, instr: Instruction) -> None:
    """MOV to / from DR0-DR7 [SDM Vol. 2B MOV—Move to/from Debug Registers]: #GP(0) at CPL > 0;
    #UD for DR4/DR5 with CR4.DE; while DR7.GD is set, the general-detect #DB — a fault (RIP at
    the MOV) with DR6.BD set and DR6's B0-B3 clear, and DR7.GD cleared so the handler may use the
    debug registers [SDM Vol. 3 §18.2.4, §18.3.1.5; KVM's handle_dr: kvm_queue_exception_p(DB,
    DR6_BD)] — the check Unicorn 2.1.4 lacks (kvm-unit-tests' debug "Single-step #DB w/ MOVSS
    blocking and DR7.GD=1"). Otherwise the engine moves the register (its breakpoints follow)."""
    _require_cpl0(vcpu)
    dr = instr.op0_register if instr.code in (Code.MOV_DR_R64, Code.MOV_DR_R32) else instr.op1_register
    if dr in _DR_ALIASES and vcpu.cr4 & Cr4.DE:
        raise ud()
    dr7 = vcpu.reg("dr7")
    if dr7 & DR7_GD:
        vcpu.set_reg("dr6", (vcpu.reg("dr6") & ~DR6_TRAP_BITS) | DR6_FIXED_1 | DR6_BD)
        vcpu.set_reg("dr7", dr7 & ~DR7_GD)
        raise GuestFault(Vector.DB)
    _step_in_engine(vcpu, instr, branches=False)


def check_cr0_write(vcpu, value: int) -> None:
    """#GP(0) for a CR0 value MOV to CR0 / LMSW may not load: WP cleared with CR4.CET set, PG
    without PE, bits 63:32, PG cleared in 64-bit mode [SDM Vol. 2 MOV—CR]."""
    if not value & Cr0.WP and vcpu.cr4 & Cr4.CET:
        raise gp(0)
    if value & Cr0.PG and not value & Cr0.PE:
        raise gp(0)
    if value >> 32 or (vcpu.long_mode and not value & Cr0.PG):
        raise gp(0)


#: The CR0 bits LMSW loads: PE, MP, EM, TS (the machine status word's low four bits).
_MSW_BITS = 0xF


def lmsw(vcpu, instr: Instruction) -> None:
    """LMSW r/m16: CR0[3:0] = source[3:0], except that PE can be set but not cleared [SDM Vol. 2
    LMSW]; CPL 0 only. Emulated so that the CR0 rules and cetvm's mode cache apply."""
    _require_cpl0(vcpu)
    if instr.op0_kind == OpKind.REGISTER:
        source = read_register(vcpu, instr.op0_register)
    else:
        source = int.from_bytes(vcpu.read_virt(effective_address(vcpu, instr), 2, _privilege(vcpu)), "little")
    cr0 = vcpu.cr0
    value = (cr0 & ~_MSW_BITS) | (source & _MSW_BITS) | (cr0 & Cr0.PE)
    check_cr0_write(vcpu, value)
    vcpu.write_cr(0, value)
    _advance(vcpu, instr)


# ----------------------------------------------------------------------------- CET instructions
def _operand_size(instr: Instruction) -> int:
    return 8 if instr.mnemonic in (M.RDSSPQ, M.INCSSPQ, M.WRSSQ, M.WRUSSQ) else 4


def _apply_flags(vcpu, result: cet_insn.FlagsResult) -> None:
    rflags = vcpu.reg("rflags")
    if result.clear_others:
        rflags &= ~(RFLAGS_ZF | RFLAGS_PF | RFLAGS_AF | RFLAGS_OF | RFLAGS_SF)
    rflags = (rflags | RFLAGS_CF) if result.cf else (rflags & ~RFLAGS_CF)
    vcpu.set_reg("rflags", rflags)


def cet_instruction(vcpu, instr: Instruction) -> None:
    """RDSSP, INCSSP, RSTORSSP, SAVEPREVSSP, SETSSBSY, CLRSSBSY, WRSS, WRUSS (CET semantics in
    :mod:`cetvm.cpu.cet.instructions`). #UD when the model lacks SHSTK."""
    if not vcpu.guest_shstk:
        if instr.mnemonic in (M.RDSSPD, M.RDSSPQ):
            _advance(vcpu, instr)  # NOP space on CPUs without CET
            return
        raise ud()
    if instr.has_lock_prefix:
        raise ud()
    mn = instr.mnemonic
    size = _operand_size(instr)
    if mn in (M.RDSSPD, M.RDSSPQ):
        value = cet_insn.rdssp(vcpu.cet_machine, size)
        if value is not None:
            write_register(vcpu, instr.op0_register, value)
    elif mn in (M.INCSSPD, M.INCSSPQ):
        cet_insn.incssp(vcpu.cet_machine, read_register(vcpu, instr.op0_register), size)
    elif mn == M.RSTORSSP:
        _apply_flags(vcpu, cet_insn.rstorssp(vcpu.cet_machine, effective_address(vcpu, instr)))
    elif mn == M.SAVEPREVSSP:
        cet_insn.saveprevssp(vcpu.cet_machine, bool(vcpu.reg("rflags") & RFLAGS_CF))
    elif mn == M.SETSSBSY:
        cet_insn.setssbsy(vcpu.cet_machine)
    elif mn == M.CLRSSBSY:
        _apply_flags(vcpu, cet_insn.clrssbsy(vcpu.cet_machine, effective_address(vcpu, instr)))
    elif mn in (M.WRSSD, M.WRSSQ):
        cet_insn.wrss(vcpu.cet_machine, effective_address(vcpu, instr), read_register(vcpu, instr.op1_register), size)
    elif mn in (M.WRUSSD, M.WRUSSQ):
        cet_insn.wruss(vcpu.cet_machine, effective_address(vcpu, instr), read_register(vcpu, instr.op1_register), size)
    _advance(vcpu, instr)


# ----------------------------------------------------------------------------- control transfers
def _pop_u64(vcpu, rsp: int, n: int) -> list[int]:
    raw = vcpu.read_virt(rsp, 8 * n, _privilege(vcpu))
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(n)]


#: RFLAGS bits IRETQ may load: CF PF AF ZF SF TF IF DF OF IOPL NT RF AC ID (+ bit 1 fixed).
RFLAGS_IRET_MASK = 0x25_7FD5
#: RFLAGS bits SYSRET loads from R11 [SDM SYSRET: RFLAGS := (R11 & 3C7FD7H) OR 2].
RFLAGS_SYSRET_MASK = 0x3C_7FD7


def _code_descriptor(vcpu, selector: int, cpl: int):
    """CS for a return to privilege ``cpl``: present, code, DPL = RPL = ``cpl`` (non-conforming)."""
    if selector & ~3 == 0:
        raise gp(0)
    desc = read_descriptor(vcpu, selector)
    if not desc.attributes & SegAttr.CODE or not desc.attributes & SegAttr.S or desc.dpl != cpl:
        raise gp(selector & ~3)
    if not desc.present:
        raise GuestFault(Vector.NP, selector & ~3)
    return desc


def _stack_descriptor(vcpu, selector: int, cpl: int, target_long: bool):
    """SS for a return to ``cpl``: a writable data segment with RPL = DPL = ``cpl``; a null SS
    is allowed for a 64-bit return to CPL 0-2 [SDM IRET 64-bit mode]."""
    if selector & ~3 == 0:
        if not target_long or _null_ss_refused(selector, cpl):
            raise gp(0)
        return Segment(selector, 0, 0, cpl << 13)
    desc = read_descriptor(vcpu, selector)
    if (selector & 3 != cpl or desc.dpl != cpl or desc.attributes & SegAttr.CODE
            or not desc.attributes & SegAttr.WRITABLE_READABLE or not desc.attributes & SegAttr.S):
        raise gp(selector & ~3)
    if not desc.present:
        raise GuestFault(Vector.SS, selector & ~3)
    return desc


def iret(vcpu, instr: Instruction) -> None:
    """IRETQ in 64-bit mode, emulated completely [SDM IRET "IA-32e mode"].

    Pops RIP, CS, RFLAGS, RSP, SS; a return to a less privileged level (CS.RPL > CPL) or the
    same one; never to a more privileged one (#GP). CS/SS are checked against the GDT; RFLAGS
    follows the CPL/IOPL rules (IOPL only at CPL 0, IF only when CPL <= IOPL). With CET the
    shadow-stack frame is checked and SSP restored (``ssp_on_iret``) before anything is
    committed. Not executed by the engine because Unicorn's TB-cache removal after a single step
    would translate the IRETQ's address at the new CPL (a phantom #PF that corrupts CR2 and
    QEMU's old_exception). IRET unblocks NMIs first, so also when it then faults [SDM Vol. 3
    §6.7.1; §28.2.3 "NMI unblocking due to IRET"]. Decisions: DS/ES/FS/GS are not nulled on a
    return to CPL 3; 16/32-bit IRET outside real-address mode (:func:`iret_real`) raise
    NotSupportedError.
    """
    if not vcpu.cr0 & Cr0.PE:
        iret_real(vcpu, instr)
        return
    if instr.mnemonic != M.IRETQ:
        raise NotSupportedError(f"{instr} (16/32-bit IRET in protected mode) is not implemented; use IRETQ")
    vcpu.end_nmi_blocking()
    old_cpl = vcpu.cpl
    rsp = vcpu.reg("rsp")
    new_rip, new_cs, new_rflags, new_rsp, new_ss = _pop_u64(vcpu, rsp, 5)
    new_cs &= 0xFFFF
    new_ss &= 0xFFFF
    new_cpl = new_cs & 3
    if new_cpl < old_cpl:
        raise gp(new_cs & ~3)
    cs_desc = _code_descriptor(vcpu, new_cs, new_cpl)
    ss_desc = _stack_descriptor(vcpu, new_ss, new_cpl, cs_desc.long)
    if cs_desc.long and not is_canonical(new_rip):
        raise gp(0)
    if vcpu.cet_active:
        far_transfers.ssp_on_iret(vcpu.cet_machine, old_cpl, new_cpl, new_cs, (cs_desc.base + new_rip) & _U64,
                               target_long_mode=cs_desc.long)
    rflags = vcpu.reg("rflags")
    writable = RFLAGS_IRET_MASK
    if old_cpl > 0:
        writable &= ~RFLAGS_IOPL
    if old_cpl > (rflags & RFLAGS_IOPL) >> 12:
        writable &= ~RFLAGS_IF
    vcpu.set_reg("rflags", (rflags & ~writable) | (new_rflags & writable) | 2)
    vcpu.set_reg("rsp", new_rsp)
    vcpu.rip = new_rip
    vcpu.load_segments(cs=Segment(new_cs, cs_desc.base, cs_desc.limit, cs_desc.attributes),
                       ss=Segment(new_ss, ss_desc.base, ss_desc.limit, ss_desc.attributes))
    vcpu.retire_emulated()


def iret_real(vcpu, instr: Instruction) -> None:
    """IRET / IRETD in real-address mode [SDM Vol. 2A IRET "REAL-ADDRESS-MODE"]: IP, CS and FLAGS
    popped as words (IRET: FLAGS[15:0] replaced) or doublewords (IRETD: #GP(0) for an EIP beyond
    the CS limit; EFLAGS = popped AND 257FD5H OR (EFLAGS AND 1A0000H)) from SS:SP; CS.base =
    selector << 4. NMIs are unblocked, as by every IRET."""
    vcpu.end_nmi_blocking()
    size = 4 if instr.mnemonic == M.IRETD else 2
    ss, mask = real_mode_stack(vcpu)
    rsp = vcpu.reg("rsp")
    sp = rsp & mask
    frame = vcpu.read_virt((ss.base + sp) & 0xFFFF_FFFF, 3 * size, Access.READ)
    new_ip, new_cs, new_flags = (int.from_bytes(frame[i:i + size], "little") for i in range(0, 3 * size, size))
    cs = vcpu.segment("cs")
    rflags = vcpu.reg("rflags")
    if size == 4:
        if new_ip > cs.limit:
            raise gp(0)
        rflags = (new_flags & RFLAGS_IRET_MASK) | (rflags & (RFLAGS_VM | RFLAGS_VIF | RFLAGS_VIP))
    else:
        rflags = (rflags & ~0xFFFF) | new_flags
    vcpu.set_reg("rflags", rflags | 2)
    vcpu.set_reg("rsp", (rsp & ~mask) | ((sp + 3 * size) & mask))
    vcpu.rip = new_ip
    vcpu.load_segments(cs=Segment(new_cs & 0xFFFF, (new_cs & 0xFFFF) << 4, cs.limit, cs.attributes))
    vcpu.retire_emulated()


def sysret(vcpu, instr: Instruction) -> None:
    """SYSRET [SDM SYSRET], emulated completely (see :func:`iret` for why not in the engine).

    #UD unless EFER.SCE; #GP(0) unless CPL 0; #GP(0) if RCX is not canonical (64-bit form).
    CS = STAR[63:48] + 16 (64-bit form) or STAR[63:48] (32-bit form), RPL 3; SS = STAR[63:48]
    + 8, RPL 3; RIP = RCX; RFLAGS = (R11 & 3C7FD7H) | 2. Then SSP = PL3_SSP with user shadow
    stacks (``ssp_on_sysret``).
    """
    if not vcpu.msr(Msr.IA32_EFER) & Efer.SCE:
        raise ud()
    _require_cpl0(vcpu)
    long_form = instr.code == Code.SYSRETQ
    rcx = vcpu.reg("rcx")
    if long_form and not is_canonical(rcx):
        raise gp(0)
    base = (vcpu.msr(Msr.IA32_STAR) >> 48) & 0xFFFC
    cs = Segment.code64(base + 16 | 3, dpl=3) if long_form else Segment.code32(base | 3, dpl=3)
    vcpu.set_reg("rflags", (vcpu.reg("r11") & RFLAGS_SYSRET_MASK) | 2)
    vcpu.rip = rcx if long_form else rcx & 0xFFFF_FFFF
    vcpu.load_segments(cs=cs, ss=Segment.data(base + 8 | 3, dpl=3))
    far_transfers.ssp_on_sysret(vcpu.cet_machine)
    vcpu.retire_emulated()
    if vcpu.reg("rflags") & RFLAGS_TF:  # the TF SYSRET ends with traps at once (see syscall_transfer)
        single_step_trap(vcpu)


def syscall(vcpu, instr: Instruction) -> None:
    """SYSCALL [SDM SYSCALL]: #UD unless EFER.SCE in 64-bit mode (Intel: SYSCALL outside
    64-bit mode is #UD), then :func:`syscall_transfer` to IA32_LSTAR."""
    if not vcpu.long_mode or not vcpu.msr(Msr.IA32_EFER) & Efer.SCE:
        raise ud()
    syscall_transfer(vcpu, instr.next_ip, vcpu.msr(Msr.IA32_LSTAR))


def syscall_transfer(vcpu, return_rip: int, target: int) -> None:
    """SYSCALL's transfer in IA-32e mode [SDM SYSCALL "Operation"]: RCX = ``return_rip``, R11 =
    RFLAGS, RFLAGS &= ~FMASK (and RF), CS/SS = flat 64-bit code / data at STAR[47:32] (+ 8),
    RIP = ``target`` (IA32_LSTAR; KVM's emulation of SYSCALL from compatibility mode for AMD
    guests uses IA32_CSTAR); then the CET effects (``ssp_on_syscall``); retires. If RFLAGS.TF
    is still set (FMASK keeps it), the single-step trap follows at the target: SYSCALL and
    SYSRET trap on the TF they end with (kvm-unit-tests' syscall "syscall TF handling";
    KVM's em_syscall: ctxt->tf from the masked flags)."""
    old_cpl = vcpu.cpl
    star = vcpu.msr(Msr.IA32_STAR)
    selector = (star >> 32) & 0xFFFC
    rflags = vcpu.reg("rflags")
    vcpu.set_reg("rcx", return_rip)
    vcpu.set_reg("r11", rflags)
    vcpu.set_reg("rflags", (rflags & ~vcpu.msr(Msr.IA32_FMASK) & ~RFLAGS_RF) | 2)
    vcpu.load_segments(cs=Segment.code64(selector, 0), ss=Segment.data(selector + 8, 0))
    vcpu.rip = target
    far_transfers.ssp_on_syscall(vcpu.cet_machine, old_cpl)
    vcpu.retire_emulated()
    if vcpu.reg("rflags") & RFLAGS_TF:
        single_step_trap(vcpu)


def far_transfer(vcpu, instr: Instruction) -> VmExit | None:
    """Far RET / CALL / JMP: shadow-stack frame (``ssp_on_far_ret``/``ssp_on_far_call``) or IBT
    arm, around Unicorn's own execution of the transfer. Call gates are not supported
    (decision: treated as same-privilege transfers). Without CET, a far pointer on a device page
    (kvm-unit-tests' emulator: LJMP through MMIO, RETF from an MMIO stack) is read through MMIO
    exits like any operand; with CET on, KVM's emulator refuses such an instruction."""
    if not vcpu.cet_active:
        if _far_pointer_in_mmio(vcpu, instr):
            return vcpu.execute_with_mmio_operand(instr)
        _step_in_engine(vcpu, instr)
        return None
    old_cpl = vcpu.cpl
    if instr.mnemonic == M.RETF:
        size = 8 if instr.code in (Code.RETFQ, Code.RETFQ_IMM16) else 4
        raw = vcpu.read_virt(vcpu.reg("rsp"), 2 * size, _privilege(vcpu))
        new_rip = int.from_bytes(raw[:size], "little")
        new_cs = int.from_bytes(raw[size:], "little") & 0xFFFF
        target = read_descriptor(vcpu, new_cs)
        far_transfers.ssp_on_far_ret(vcpu.cet_machine, old_cpl, max(old_cpl, new_cs & 3), new_cs,
                                  (target.base + new_rip) & _U64, target_long_mode=target.long)
        _step_in_engine(vcpu, instr)
    elif instr.is_call_far or instr.is_call_far_indirect:
        cs = vcpu.segment("cs")
        far_transfers.ssp_on_far_call(vcpu.cet_machine, old_cpl, old_cpl, cs.selector, (cs.base + instr.next_ip) & _U64)
        _step_in_engine(vcpu, instr)
    else:
        _step_in_engine(vcpu, instr)
        ibt_arm_on_transfer(vcpu.cet_machine, vcpu.cpl)


def mov_to_ss(vcpu, instr: Instruction) -> VmExit | None:
    """MOV SS, r/m16 [SDM Vol. 2B MOV "IF SS is loaded"]: in 64-bit mode a null selector is
    allowed only at CPL 0-2 with RPL = CPL, else #GP(0) — the RPL check the engine (QEMU's
    load_seg) does not make; a GDT selector must name a present writable data segment with
    RPL = DPL = CPL, else #GP(selector) or #SS(selector) (not present) — checked here because
    the engine's #GP carries no error code (:func:`_stack_descriptor`, IRET's rules). LDT
    selectors and the load itself are the engine's; the interrupt shadow a loaded SS begins is
    set again after the engine's single step (which leaves it clear)."""
    def check(raw: bytes) -> None:
        selector = int.from_bytes(raw[:2], "little")
        if not vcpu.cr0 & Cr0.PE or vcpu.reg("rflags") & RFLAGS_VM:
            return  # real-address and virtual-8086 mode: a segment value, no descriptor
        if selector & ~3 == 0:
            if vcpu.long_mode and _null_ss_refused(selector, vcpu.cpl):
                raise gp(0)
        elif not selector & _SELECTOR_TI:
            _stack_descriptor(vcpu, selector, vcpu.cpl, vcpu.long_mode)

    def after() -> None:  # loaded: the MOV SS interrupt shadow [SDM Vol. 3A 6.8.3]
        if not vcpu.pending_events.has_event:
            vcpu.pending_events.begin_interrupt_shadow()
            suppress_instruction_breakpoint(vcpu)

    if instr.op1_kind == OpKind.REGISTER:
        check(read_register(vcpu, instr.op1_register).to_bytes(8, "little"))
    else:
        try:
            check(vcpu.read_virt(effective_address(vcpu, instr), 2, _privilege(vcpu)))
        except NoRamAccess:
            return vcpu.execute_with_mmio_operand(instr, MmioStepHooks(check, after))
    _step_in_engine(vcpu, instr, branches=False)
    after()
    return None


def suppress_instruction_breakpoint(vcpu) -> None:
    """MOV SS blocking on Intel: the instruction after a MOV SS takes no instruction breakpoint
    (kvm-unit-tests' emulator: "#DB suppressed after MOV SS"; SDM Vol. 3 §6.8.3 and §18.3.1.1:
    debug exceptions are inhibited for that instruction). With a breakpoint enabled in DR7 this
    sets RFLAGS.RF, the flag that suppresses instruction breakpoints for one instruction: the
    engine translates that single instruction (the shadow makes it a block of its own) without
    its breakpoint check and clears RF after it [SDM Vol. 3 §18.3.1.1 "RF"]."""
    if vcpu.reg("dr7") & DR7_ENABLE_BITS:
        vcpu.set_reg("rflags", vcpu.reg("rflags") | RFLAGS_RF)


#: A selector's table indicator: 1 = LDT.
_SELECTOR_TI = 4


def _null_ss_refused(selector: int, cpl: int) -> bool:
    """64-bit mode: a null SS selector is legal only below CPL 3 and with RPL = CPL (MOV SS and
    IRET's return to 64-bit mode)."""
    return selector & ~3 == 0 and (cpl == 3 or selector & 3 != cpl)


def _far_pointer_in_mmio(vcpu, instr: Instruction) -> bool:
    """The far pointer the transfer reads (RETF: on the stack; CALL/JMP m16:xx: the operand)
    is not RAM. Unmapped addresses are left to the engine, which raises the #PF."""
    if instr.mnemonic == M.RETF:
        linear = vcpu.reg("rsp") & address_mask(vcpu)
    elif instr.is_call_far_indirect or instr.is_jmp_far_indirect:
        linear = effective_address(vcpu, instr)
    else:
        return False
    try:
        return not vcpu.is_ram(vcpu.translate(linear, _privilege(vcpu)), 1)
    except GuestFault:
        return False


def _step_in_engine(vcpu, instr: Instruction, *, branches: bool = True) -> None:
    """Let Unicorn execute ``instr`` alone (see :meth:`Vcpu.step_in_engine`); an instruction that
    does not branch stops cheaply at its successor."""
    vcpu.step_in_engine(instr.ip, None if branches else instr.next_ip)
    vcpu.refresh_mode()


def invalidate_tlb(vcpu, instr: Instruction) -> None:
    """INVLPG / INVPCID: Unicorn invalidates its TLB; we flush our walker's cache and forget the
    block classifications the invalidated translations covered, then the engine runs it (and
    raises its faults). INVLPG is done here when the engine's page flush is at hand
    (:attr:`Vcpu.engine_cpu`): it faults only with LOCK (#UD) or at CPL > 0 (#GP(0)), and with a
    non-canonical address it is a NOP [SDM Vol. 2A INVLPG: "in 64-bit mode ... the instruction is
    executed as a NOP"; kvm-unit-tests lam], so it needs no step through the engine."""
    if instr.mnemonic == M.INVLPG and vcpu.engine_cpu is not None:
        if instr.has_lock_prefix:
            raise ud()
        _require_cpl0(vcpu)
        try:
            linear = effective_address(vcpu, instr)
        except GuestFault:  # non-canonical (a LAM-tagged pointer too): a NOP in 64-bit mode, no fault
            _advance(vcpu, instr)
            return
        vcpu.flush_tlb()
        vcpu.forget_blocks_at(linear)
        vcpu.engine_cpu.flush_tlb_page(linear)
        _advance(vcpu, instr)
        return
    vcpu.flush_tlb()
    _forget_blocks_of(vcpu, instr)
    _step_in_engine(vcpu, instr, branches=False)


#: INVPCID types [SDM Vol. 2A INVPCID]: 0 individual address, 1 single context, 2 all contexts
#: including global translations, 3 all contexts except global translations.
INVPCID_INDIVIDUAL_ADDRESS, INVPCID_ALL_INCLUDING_GLOBAL = 0, 2


def _forget_blocks_of(vcpu, instr: Instruction) -> None:
    """The blocks whose translations INVLPG / INVPCID invalidates: one address's (INVLPG, INVPCID
    type 0), every non-global one (types 1 and 3: blocks carry no PCID) or all (type 2). An
    operand cetvm cannot read (the instruction will fault) forgets everything."""
    try:
        if instr.mnemonic == M.INVLPG:
            vcpu.forget_blocks_at(effective_address(vcpu, instr))
            return
        kind = read_register(vcpu, instr.op0_register)
        if kind == INVPCID_INDIVIDUAL_ADDRESS:
            descriptor = vcpu.read_virt(effective_address(vcpu, instr), 16)
            vcpu.forget_blocks_at(int.from_bytes(descriptor[8:], "little"))
        else:
            vcpu.forget_blocks(global_too=kind == INVPCID_ALL_INCLUDING_GLOBAL)
    except GuestFault:
        vcpu.forget_blocks(global_too=True)


def descriptor_table_load(vcpu, instr: Instruction) -> VmExit | None:
    """LGDT/LIDT/LLDT/LTR: the 64-bit-mode canonical checks the engine lacks, then the engine
    runs the instruction [SDM Vol. 2 LGDT/LIDT: #GP(0) "if the memory address is in a
    non-canonical form" of the loaded base in 64-bit mode; LLDT/LTR: #GP(selector) if the
    16-byte system descriptor's base is non-canonical]. Everything else (CPL, limits, types,
    busy TSS, present bits) is the engine's, which executes these itself. An operand in MMIO
    (kvm-unit-tests' emulator: LTR from pc-testdev memory) is completed as any MMIO operand
    (:meth:`cetvm.cpu.vcpu.Vcpu.execute_with_mmio_operand`), without the canonical checks."""
    try:
        _check_descriptor_table_load(vcpu, instr)
    except NoRamAccess:
        return vcpu.execute_with_mmio_operand(instr)
    _step_in_engine(vcpu, instr, branches=False)
    return None


def _check_descriptor_table_load(vcpu, instr: Instruction) -> None:
    if vcpu.long_mode and vcpu.cpl == 0:
        if instr.mnemonic in (M.LGDT, M.LIDT):
            raw = vcpu.read_virt(effective_address(vcpu, instr), 10, _privilege(vcpu))
            if not is_canonical(int.from_bytes(raw[2:10], "little")):
                raise gp(0)
        else:
            op = instr.op0_kind
            selector = (read_register(vcpu, instr.op0_register) if op == OpKind.REGISTER else
                        int.from_bytes(vcpu.read_virt(effective_address(vcpu, instr), 2,
                                                      _privilege(vcpu)), "little")) & 0xFFFF
            gdt = vcpu.get_sregs().gdt
            index = selector & ~7
            if selector & ~3 and not selector & 4 and index + 15 <= gdt.limit:
                raw = vcpu.read_virt(gdt.base + index, 16)
                low, high, upper = (int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little"),
                                    int.from_bytes(raw[8:12], "little"))
                base = (low >> 16) | (high & 0xFF) << 16 | (high & 0xFF00_0000) | upper << 32
                present = high >> 15 & 1
                if present and not is_canonical(base):
                    raise gp(selector & ~3)


#: splitmix64's constants [Steele, Lea, Flood: "Fast splittable pseudorandom number generators"].
_SPLITMIX_GAMMA = 0x9E37_79B9_7F4A_7C15
_SPLITMIX_M1, _SPLITMIX_M2 = 0xBF58_476D_1CE4_E5B9, 0x94D0_49BB_1331_11EB
RDRAND_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF


def deterministic_random(instructions: int, rip: int) -> int:
    """The 64 bits RDRAND returns (a decision): splitmix64 of the vCPU's retired-instruction
    count and RIP. Hardware returns true random numbers and Unicorn the host's, so a Linux boot
    (KASLR, the CRNG's first seed) would differ from run to run; with this every run, and every
    snapshot's continuation, is the same instruction for instruction. Not for guests that need
    secrets."""
    z = (instructions * _SPLITMIX_GAMMA + rip) & _U64
    z = ((z ^ (z >> 30)) * _SPLITMIX_M1) & _U64
    z = ((z ^ (z >> 27)) * _SPLITMIX_M2) & _U64
    return z ^ (z >> 31)


def rdrand(vcpu, instr: Instruction) -> None:
    """RDRAND r16/r32/r64 [SDM Vol. 2 RDRAND]: a random value and CF = 1 (always available);
    OF, SF, ZF, AF and PF cleared. The value: :func:`deterministic_random`."""
    write_register(vcpu, instr.op0_register, deterministic_random(vcpu.instructions_retired, instr.ip))
    vcpu.set_reg("rflags", (vcpu.reg("rflags") & ~RDRAND_FLAGS) | RFLAGS_CF)
    _advance(vcpu, instr)


def serialize(vcpu, instr: Instruction) -> None:
    """SERIALIZE [SDM Vol. 2B SERIALIZE]: every earlier instruction completes before the next is
    fetched; no register, flag or memory changes. cetvm's CPU retires instructions in order, so
    retiring it is all there is. Unicorn 2.1.4 does not decode it (#UD), hence emulated. Shown in
    CPUID.(7,0):EDX[14] when the host has it (KVM passes it through, kvm_set_cpu_caps); Linux's
    sync_core() then serializes with it instead of an IRETQ to itself — text patching calls
    sync_core() on every CPU tens of thousands of times during boot. #UD when the host model
    lacks it (KVM does not intercept it: the hardware decides). The native path retires it in
    its #UD hook without leaving the engine (cetfast.c "SERIALIZE"); this is the reference."""
    if not vcpu.model.has("serialize"):
        raise ud()
    _advance(vcpu, instr)


def xsave_family(vcpu, instr: Instruction) -> None:
    """XSAVEC / XSAVES / XRSTORS: :mod:`cetvm.cpu.xsave` checks and executes, here it retires."""
    xsave.check_usable(vcpu, instr)
    xsave.execute(vcpu, instr, effective_address(vcpu, instr))
    _advance(vcpu, instr)


def icebp(vcpu, instr: Instruction) -> None:
    """INT1 / ICEBP (F1) [SDM Vol. 2A INT n/INTO/INT3/INT1]: a trap-like #DB, RIP past the
    instruction, delivered as a hardware exception (no gate DPL check, EXT set, no RF in the
    pushed RFLAGS) that changes no DR6 bit — and, as the event of its instruction, takes the
    place of the single-step trap RFLAGS.TF would add. Unicorn 2.1.4 decodes it as #UD
    (kvm-unit-tests' debug: "Single-Step + ICEBP #DB w/ MOVSS blocking" looped on the #UD)."""
    vcpu.rip = instr.next_ip
    vcpu.retire_emulated()
    vcpu.raise_fault(GuestFault(Vector.DB))


def undefined_opcode(vcpu, instr: Instruction) -> None:
    """An encoding that is no instruction is #UD [SDM Vol. 2 App. A; e.g. MOVBE "#UD If ...
    the ModR/M byte's mod field is 11B" — Unicorn 2.1.4 executes MOVBE r, r as a load from a
    garbage address]."""
    raise ud()


_HANDLERS: dict[int, Callable] = {
    M.INVALID: undefined_opcode, M.INT1: icebp,
    M.HLT: hlt, M.CPUID: cpuid, M.INVD: invd, M.VMCALL: vmcall, M.VMMCALL: vmcall, M.XSETBV: xsetbv,
    M.IN: port_io, M.OUT: port_io,
    M.INSB: string_io, M.INSW: string_io, M.INSD: string_io, M.OUTSB: string_io, M.OUTSW: string_io, M.OUTSD: string_io,
    M.RDMSR: rdmsr, M.WRMSR: wrmsr,
    M.IRET: iret, M.IRETD: iret, M.IRETQ: iret, M.SYSRETQ: sysret, M.SYSRET: sysret, M.SYSCALL: syscall,
    M.RDSSPD: cet_instruction, M.RDSSPQ: cet_instruction, M.INCSSPD: cet_instruction, M.INCSSPQ: cet_instruction,
    M.SAVEPREVSSP: cet_instruction, M.RSTORSSP: cet_instruction, M.SETSSBSY: cet_instruction,
    M.CLRSSBSY: cet_instruction, M.WRSSD: cet_instruction, M.WRSSQ: cet_instruction,
    M.WRUSSD: cet_instruction, M.WRUSSQ: cet_instruction,
    M.INVLPG: invalidate_tlb, M.INVPCID: invalidate_tlb,
    M.LGDT: descriptor_table_load, M.LIDT: descriptor_table_load, M.LLDT: descriptor_table_load,
    M.LTR: descriptor_table_load, M.LMSW: lmsw, M.SMSW: smsw,
    M.XSAVES: xsave_family, M.XSAVES64: xsave_family, M.XRSTORS: xsave_family, M.XRSTORS64: xsave_family,
    M.RDRAND: rdrand, M.SERIALIZE: serialize,
    M.XSAVEC: xsave_family, M.XSAVEC64: xsave_family,
    **{mnemonic: vmx_instruction for mnemonic in VMX_INSTRUCTION_REASONS},
}
