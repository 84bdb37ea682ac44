"""KVM's instruction emulator as far as CET is concerned [K emulate.c, x86.c handle_ud].

KVM emulates guest instructions in software in a few situations (MMIO, #UD of instructions it
knows, the force-emulation prefix of its self-tests). KVM does not model CET inside its
emulator; since 6.18 ("KVM: x86: Don't emulate instructions guarded by CET") it refuses to
emulate the instructions CET guards while CET is on, so emulation can neither raise a bogus #CP
nor let a guest subvert its shadow stack or IBT through the emulator.

- :func:`cet_guards` — the ``ShadowStack`` / ``IndirBrnTrk`` flags of KVM's opcode tables:
  shadow stacks guard near and far CALL, near and far RET, INT n, IRET, SYSCALL, SYSENTER and
  SYSEXIT; IBT guards indirect and far CALL/JMP, SYSCALL and SYSENTER. Decision (as KVM's
  tables): INT3 (CC) and INTO (CE) carry no flag; direct JMP and SYSRET neither.
- :func:`emulation_blocked_by_cet` — x86_decode_insn()'s check: with CR4.CET set, a
  ShadowStack instruction fails if SH_STK_EN is set in U_CET *or* S_CET, an IndirBrnTrk one
  if ENDBR_EN is set in either — whatever the CPL (KVM checks both MSRs on purpose).
- The force-emulation prefix (``ud2; .ascii "kvm"``, module parameter
  ``kvm.force_emulation_prefix``): handle_ud() skips the 5-byte prefix and emulates the next
  instruction with EMULTYPE_TRAP_UD_FORCED — a failure is #UD to the guest at the instruction
  after the prefix; any other emulation failure is KVM_EXIT_INTERNAL_ERROR with suberror
  EMULATION to userspace. Before an MMX instruction the emulator flushes pending x87 faults
  (#MF, :func:`mmx_with_x87_fault_pending`).
- SYSCALL at a #UD (its EmulateOnUD flag): Intel CPUs have no SYSCALL outside 64-bit mode, but
  KVM's em_syscall() runs it from compatibility mode for AMD and Hygon guests (IA32_CSTAR)
  (:func:`kvm_emulate_syscall_on_ud`).

How cetvm "emulates": the model keeps KVM's decisions (what it refuses, where the #UD lands);
an instruction KVM would emulate is executed by the vCPU for exactly one instruction, which has
the same architectural effect as KVM's emulator for every instruction it accepts.
"""

from __future__ import annotations

import enum

from iced_x86 import Instruction, Mnemonic as M, OpKind, Register

from cetvm import CetvmError, NotSupportedError
from cetvm.arch import Cr0, Cr4, Vector, u64
from cetvm.arch.msr import CetCtl, Efer, Msr
from cetvm.arch.regs import FSW_ES
from cetvm.cpu.emulate import syscall_transfer
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access

#: The force-emulation prefix KVM looks for at a #UD: UD2 followed by "kvm" [K x86.c
#: kvm_emulate_prefix / handle_ud; kvm-unit-tests KVM_FEP].
KVM_EMULATE_PREFIX = b"\x0f\x0bkvm"


class CetGuard(enum.IntFlag):
    """KVM's opcode-table flags for CET-guarded instructions."""

    NONE = 0
    SHADOW_STACK = 1 << 0
    INDIRECT_BRANCH = 1 << 1


_SHSTK_AND_IBT = CetGuard.SHADOW_STACK | CetGuard.INDIRECT_BRANCH
_GUARDS_BY_MNEMONIC: dict[int, CetGuard] = {
    M.RET: CetGuard.SHADOW_STACK,
    M.RETF: CetGuard.SHADOW_STACK,
    M.INT: CetGuard.SHADOW_STACK,
    M.IRET: CetGuard.SHADOW_STACK,
    M.IRETD: CetGuard.SHADOW_STACK,
    M.IRETQ: CetGuard.SHADOW_STACK,
    M.SYSEXIT: CetGuard.SHADOW_STACK,
    M.SYSEXITQ: CetGuard.SHADOW_STACK,
    M.SYSCALL: _SHSTK_AND_IBT,
    M.SYSENTER: _SHSTK_AND_IBT,
}


def cet_guards(instr: Instruction) -> CetGuard:
    """The ShadowStack / IndirBrnTrk flags KVM's opcode tables give ``instr``."""
    mnemonic = instr.mnemonic
    if mnemonic == M.CALL:
        if instr.is_call_near:
            return CetGuard.SHADOW_STACK
        return _SHSTK_AND_IBT  # near indirect (FF /2) and far (FF /3, 9A)
    if mnemonic == M.JMP:
        if instr.is_jmp_near_indirect or instr.is_jmp_far_indirect or instr.is_jmp_far:
            return CetGuard.INDIRECT_BRANCH
        return CetGuard.NONE
    return _GUARDS_BY_MNEMONIC.get(mnemonic, CetGuard.NONE)


def emulation_blocked_by_cet(guards: CetGuard, cr4: int, u_cet: int, s_cet: int) -> bool:
    """x86_decode_insn(): KVM refuses to emulate a CET-guarded instruction while CR4.CET is set
    and the feature guarding it is enabled in U_CET or S_CET (either one, whatever the CPL)."""
    if not cr4 & Cr4.CET:
        return False
    cet = u_cet | s_cet
    if guards & CetGuard.SHADOW_STACK and cet & CetCtl.SH_STK_EN:
        return True
    return bool(guards & CetGuard.INDIRECT_BRANCH and cet & CetCtl.ENDBR_EN)


def has_force_emulation_prefix(code: bytes) -> bool:
    """handle_ud(): the bytes at the #UD are KVM's force-emulation prefix."""
    return code[: len(KVM_EMULATE_PREFIX)] == KVM_EMULATE_PREFIX


def fetch_access(cpu) -> Access:
    """kvm_read_guest_virt() at the guest's privilege: a user access at CPL 3."""
    return Access.FETCH | (Access.USER if cpu.cpl == 3 else Access.READ)


def read_guest_code(cpu, rip: int, size: int) -> bytes:
    """Up to ``size`` instruction bytes at ``rip``; b"" when they cannot be fetched."""
    try:
        return cpu.read_virt(rip, size, fetch_access(cpu))
    except (GuestFault, CetvmError):
        return b""


_IRET = frozenset({M.IRET, M.IRETD, M.IRETQ})


def emulator_lacks(instr: Instruction, cr0: int) -> bool:
    """Instructions KVM's emulator cannot emulate whatever CET says: em_iret() handles only
    real mode (X86EMUL_UNHANDLEABLE otherwise). Decision: the only such case cetvm models."""
    return instr.mnemonic in _IRET and bool(cr0 & Cr0.PE)


def instruction_refused(cpu, rip: int, u_cet: int, s_cet: int) -> Instruction | None:
    """The instruction at ``rip`` if KVM's emulator would fail on it — CET-guarded while CET is
    on, or one it cannot emulate (:func:`emulator_lacks`) — else None (including when it cannot
    be fetched: the emulator's own fetch reports that as a fault)."""
    try:
        instr = cpu.fetch_instruction(rip)
    except (GuestFault, CetvmError):
        return None
    if emulation_blocked_by_cet(cet_guards(instr), cpu.cr4, u_cet, s_cet) or emulator_lacks(instr, cpu.cr0):
        return instr
    return None


def is_rsm(cpu, rip: int) -> bool:
    """The instruction at ``rip`` is RSM, which KVM's emulator handles at a #UD (em_rsm)."""
    try:
        return cpu.fetch_instruction(rip).mnemonic == M.RSM
    except (GuestFault, CetvmError):
        return False


def kvm_handle_ud(cpu, force_emulation_prefix: bool, u_cet: int, s_cet: int) -> bool | None:
    """handle_ud() for a #UD the CPU reported at ``cpu.rip``.

    Returns True when KVM emulates the instruction after a force-emulation prefix: RIP has
    been moved past the prefix and the caller lets the vCPU execute exactly that instruction.
    Returns False when the #UD was dealt with here: the prefix was present but the instruction
    is CET-guarded (EMULTYPE_TRAP_UD_FORCED failure → #UD injected at the instruction after the
    prefix), or one KVM's emulator cannot do. Returns None when this #UD is not KVM's business (no prefix, or the parameter is
    off): the caller delivers it as usual.
    """
    rip = cpu.rip
    if not force_emulation_prefix or not has_force_emulation_prefix(read_guest_code(cpu, rip, len(KVM_EMULATE_PREFIX))):
        return None
    cpu.set_reg("rip", u64(rip + len(KVM_EMULATE_PREFIX)))
    if instruction_refused(cpu, cpu.rip, u_cet, s_cet) is not None:
        cpu.inject_exception(Vector.UD)
        return False
    if mmx_with_x87_fault_pending(cpu, cpu.rip):
        cpu.inject_exception(Vector.MF)
        return False
    return True


def uses_mmx_register(instr: Instruction) -> bool:
    """``instr`` has an MMX register operand (KVM's opcode-table flag ``Mmx``)."""
    return any(instr.op_kind(i) == OpKind.REGISTER and Register.MM0 <= instr.op_register(i) <= Register.MM7
               for i in range(instr.op_count))


def mmx_with_x87_fault_pending(cpu, rip: int) -> bool:
    """x86_emulate_insn(): before an MMX instruction KVM's emulator runs FWAIT on the guest's x87
    state (flush_pending_x87_faults), so a pending unmasked x87 exception (FSW.ES) is #MF at
    the instruction, as the hardware raises it [SDM Vol. 1 §8.1.3.1, §9.5.1 "MMX instructions
    ... generate #MF if ... pending"] (kvm-unit-tests' emulator: "movq mmx generates #MF")."""
    try:
        instr = cpu.fetch_instruction(rip)
    except (GuestFault, CetvmError):
        return False
    return uses_mmx_register(instr) and bool(cpu.get_fpu().fsw & FSW_ES)


#: Guest CPUID vendors for which KVM's emulator runs SYSCALL outside 64-bit mode
#: (em_syscall_is_enabled(): AMD and Hygon; Intel and unknown vendors get Intel's #UD).
LEGACY_SYSCALL_VENDORS = frozenset({"AuthenticAMD", "HygonGenuine"})


def kvm_emulate_syscall_on_ud(cpu, vendor: str, u_cet: int, s_cet: int) -> bool | None:
    """handle_ud() → em_syscall() for a #UD at ``cpu.rip``: None when the instruction there is
    not SYSCALL (not this function's business); False when the emulator refuses it (#UD
    injected: CET guards it, the vendor has no SYSCALL outside 64-bit mode, EFER.SCE = 0);
    True when it ran: from compatibility mode to IA32_CSTAR, from 64-bit mode to IA32_LSTAR
    (:func:`cetvm.cpu.emulate.syscall_transfer`, with the single-step #DB if RFLAGS.TF is still
    set after FMASK: ctxt->tf → kvm_vcpu_do_singlestep). Legacy (non-IA-32e) protected mode is
    not supported."""
    rip = cpu.rip
    try:
        instr = cpu.fetch_instruction(rip)
    except (GuestFault, CetvmError):
        return None
    if instr.mnemonic != M.SYSCALL:
        return None
    efer = cpu.msr(Msr.IA32_EFER)
    if (emulation_blocked_by_cet(cet_guards(instr), cpu.cr4, u_cet, s_cet) or not cpu.cr0 & Cr0.PE
            or (not cpu.long_mode and vendor not in LEGACY_SYSCALL_VENDORS) or not efer & Efer.SCE):
        cpu.inject_exception(Vector.UD)
        return False
    if not efer & Efer.LMA:
        raise NotSupportedError("KVM's emulation of SYSCALL outside IA-32e mode (legacy mode) is not supported")
    syscall_transfer(cpu, instr.next_ip, cpu.msr(Msr.IA32_LSTAR if cpu.long_mode else Msr.IA32_CSTAR))
    return True
