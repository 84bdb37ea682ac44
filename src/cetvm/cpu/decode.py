"""Instruction decoding for the engine (iced-x86): which instructions cetvm emulates in Python.

Instructions Unicorn 2.1.4 does not decode at all and that need no exit (SERIALIZE) are not
exits: the engine raises #UD at them and the #UD hooks emulate them
(:meth:`cetvm.cpu.vcpu.Vcpu`'s invalid-instruction stop, the native path's C hook).

Unicorn executes everything else. An instruction is *emulated* when Unicorn does not know it
(#UD), executes it as a NOP, executes it wrongly for CET, or when it must exit to the hypervisor
before it runs (VMX-like exits). The engine makes each such address a Unicorn "exit" at block
classification time, so Unicorn stops in front of it and Python runs it.
"""

from __future__ import annotations

from iced_x86 import Code, Decoder, Instruction, Mnemonic as M, Register

#: Instructions that stop the engine in front of them (traced mode).
EMULATED_MNEMONICS: frozenset[int] = frozenset({
    # exits to the hypervisor
    M.HLT, M.CPUID, M.IN, M.OUT, M.INSB, M.INSW, M.INSD, M.OUTSB, M.OUTSW, M.OUTSD,
    M.RDMSR, M.WRMSR, M.XSETBV, M.VMCALL, M.VMMCALL,
    # descriptor-table loads: the engine does not check base canonicality in 64-bit mode
    M.LGDT, M.LIDT, M.LLDT, M.LTR,
    # CR0 through the machine status word (the CR0 rules and the mode cache; SMSW reads the
    # CR0 read shadow)
    M.LMSW, M.SMSW,
    # TLB maintenance (flushes the walker's translation cache)
    M.INVLPG, M.INVPCID,
    # exits unconditionally in VMX non-root operation (the engine runs it as a NOP)
    M.INVD,
    # CET-affected control transfers and privilege changes
    M.IRET, M.IRETD, M.IRETQ, M.SYSCALL, M.SYSRETQ, M.SYSRET,
    # CET instructions Unicorn runs as NOPs or #UDs
    M.RDSSPD, M.RDSSPQ, M.INCSSPD, M.INCSSPQ, M.SAVEPREVSSP, M.RSTORSSP, M.SETSSBSY, M.CLRSSBSY,
    M.WRSSD, M.WRSSQ, M.WRUSSD, M.WRUSSQ,
    # random numbers from a deterministic generator (Unicorn's come from the host)
    M.RDRAND,
    # XSAVE variants Unicorn lacks
    M.XSAVES, M.XSAVES64, M.XRSTORS, M.XRSTORS64, M.XSAVEC, M.XSAVEC64,
    # VMX instructions of a guest hypervisor: they exit (cetvm.cpu.vmx_insn)
    M.VMXON, M.VMXOFF, M.VMCLEAR, M.VMPTRLD, M.VMPTRST, M.VMREAD, M.VMWRITE, M.VMLAUNCH, M.VMRESUME,
    M.INVEPT, M.INVVPID,
    # encodings that are no instruction but that the engine executes as one (MOVBE or LEA with
    # a register operand: it reads or computes a garbage address) — #UD
    M.INVALID,
})

#: MOV to a control register: CR0/CR4 need the CET rules, CR3 invalidates classifications.
MOV_TO_CR_CODES: frozenset[int] = frozenset({Code.MOV_CR_R64, Code.MOV_CR_R32})

#: MOV from a control register: CR0 and CR4 are emulated (the VMCS read shadows; CR4's
#: :data:`~cetvm.cpu.registers.ENGINE_FORCED_CR4` bits hold the guest's value beside the engine's).
MOV_FROM_CR_CODES: frozenset[int] = frozenset({Code.MOV_R64_CR, Code.MOV_R32_CR})

#: MOV to a segment register; only SS is emulated (the null-selector rule the engine lacks).
MOV_TO_SREG_CODES: frozenset[int] = frozenset({Code.MOV_SREG_RM16, Code.MOV_SREG_R32M16, Code.MOV_SREG_R64M16})

#: MOV to / from a debug register: DR7.GD's general-detect #DB (the engine has no such check).
MOV_DR_CODES: frozenset[int] = frozenset({Code.MOV_R64_DR, Code.MOV_R32_DR, Code.MOV_DR_R64, Code.MOV_DR_R32})

#: Far transfers whose shadow-stack frames we maintain.
FAR_TRANSFER_MNEMONICS: frozenset[int] = frozenset({M.RETF})

MAX_INSTRUCTION_LENGTH = 15


def needs_emulation(instr: Instruction) -> bool:
    """True if the engine must stop in front of ``instr`` and emulate it in Python."""
    return (instr.mnemonic in EMULATED_MNEMONICS or instr.code in MOV_TO_CR_CODES or is_mov_from_shadowed_cr(instr)
            or instr.code in MOV_DR_CODES
            or is_mov_to_ss(instr)
            or instr.mnemonic in FAR_TRANSFER_MNEMONICS or instr.is_call_far or instr.is_call_far_indirect
            or instr.is_jmp_far or instr.is_jmp_far_indirect)


def is_mov_to_ss(instr: Instruction) -> bool:
    return instr.code in MOV_TO_SREG_CODES and instr.op0_register == Register.SS


def is_mov_from_shadowed_cr(instr: Instruction) -> bool:
    """MOV from CR0 or CR4: the guest/host mask and read shadow decide what it reads."""
    return instr.code in MOV_FROM_CR_CODES and instr.op1_register in (Register.CR0, Register.CR4)


def decode_one(code: bytes, ip: int, bitness: int = 64) -> Instruction:
    """Decode the instruction at the start of ``code`` (``Mnemonic.INVALID`` if it is not one)."""
    return Decoder(bitness, code, ip=ip).decode()


def decode_block(code: bytes, ip: int, bitness: int = 64) -> list[Instruction]:
    """Decode a translation block's bytes (as Unicorn reports its start and size)."""
    return list(Decoder(bitness, code, ip=ip))
