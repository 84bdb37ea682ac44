"""The per-block CET state machine: apply the previous block's terminator at each block start.

[SDM CALL/RET/JMP.]

The engine runs guest code in translation blocks. At the start of every block it calls
:func:`on_block_start` with the terminator of the block that just ended (classified once per
translated block by :func:`classify_terminator` and cached), the new block's address, RSP and the
first bytes of the new block. The decision is a table lookup on the terminator kind:

====================== ================================ ===================================
terminator             shadow stack (if on at CPL)      IBT (if on at CPL)
====================== ================================ ===================================
FALLTHROUGH (NONE)     —                                check target if tracker is WAIT
CALL_DIRECT            push insn_addr + insn_len        check target if tracker is WAIT
CALL_DIRECT_DISP0      — (SDM: DEST = 0 pushes nothing) check target if tracker is WAIT
CALL_INDIRECT          push insn_addr + insn_len        arm, then check target
CALL_INDIRECT_NOTRACK  push insn_addr + insn_len        arm unless NO_TRACK_EN, check target
JMP_INDIRECT           —                                arm, then check target
JMP_INDIRECT_NOTRACK   —                                arm unless NO_TRACK_EN, check target
RET, RET_IMM           pop and compare with block_addr  check target if tracker is WAIT
OTHER_EMULATED         — (the emulation did it)         check target if tracker is WAIT
====================== ================================ ===================================

"Check target if WAIT" at every block start also enforces ENDBRANCH after transfers the engine
emulates (events, far CALL/JMP, SYSCALL) which arm the tracker in the MSR: their target is the
next block start.

Faults (:class:`BlockDecision` with action FAULT) tell the engine where the guest must see them:

- shadow-stack push/pop failure (#CP(NEAR_RET) on a RET mismatch, #PF on a shadow-stack access):
  the CALL/RET did not happen — RIP = the terminator's address, RSP = the RSP before it
  (CALL: rsp + w; RET / RET imm16: rsp - w - imm16), SSP unchanged;
- #CP(ENDBRANCH): the branch happened — RIP = the target (``block_addr``), RSP unchanged.

Decision recorded here: the data-stack return address of a RET is ``block_addr`` itself — the
RET has just loaded RIP from the data stack and the new block starts there (CS.base is 0 in
64-bit mode and in the flat 32-bit segments cetvm runs; ``block_addr`` is RIP/EIP). No memory is
read for it.

Everything is kept to integer compares and calls so this maps 1:1 onto the native C fast path.
Known limitation: ENDBR instructions that are not at a block start are NOPs to Unicorn, so
they do not clear SUPPRESS (an ENDBR at a block start does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import iced_x86

from cetvm.cpu.cet.ibt import ibt_arm_on_indirect, ibt_check_target
from cetvm.cpu.cet.machine import CetMachine
from cetvm.cpu.cet.shadow_stack import entry_width, shstk_pop_near_and_check, shstk_push_near
from cetvm.cpu.faults import GuestFault
from cetvm.arch.regs import U64_MASK



class Terminator(enum.IntEnum):
    """How a translation block ended (values are stable: the native fast path uses them)."""

    FALLTHROUGH = 0
    NONE = 0  # alias: no terminator / block split / direct jump / conditional branch
    CALL_DIRECT = 1
    CALL_DIRECT_DISP0 = 2
    CALL_INDIRECT = 3
    CALL_INDIRECT_NOTRACK = 4
    JMP_INDIRECT = 5
    JMP_INDIRECT_NOTRACK = 6
    RET = 7
    RET_IMM = 8
    OTHER_EMULATED = 9


@dataclass(frozen=True, slots=True)
class TerminatorInfo:
    """The last instruction of a block: kind, address (RIP), length, RET imm16 (else 0)."""

    kind: Terminator
    insn_addr: int
    insn_len: int
    imm16: int = 0


class BlockAction(enum.IntEnum):
    CONTINUE = 0
    FAULT = 1


@dataclass(frozen=True, slots=True)
class BlockDecision:
    """What the engine does at this block start.

    CONTINUE: run the block. FAULT: do not run it; set RIP = ``rip`` and, if ``rsp`` is not
    None, RSP = ``rsp``; then deliver ``fault``. ``rsp_adjust`` is the same RSP roll-back as a
    change to the RSP at the block start (+w for a CALL, -(w + imm16) for a RET, 0 when RSP
    stays): an engine that passed ``rsp=None`` (did not read RSP, see :func:`on_block_start`)
    sets RSP = RSP + ``rsp_adjust`` instead. ``rolled_back``: the fault is the terminator's own
    (RIP back at it): the terminator did not retire, although its block ran.
    """

    action: BlockAction
    fault: GuestFault | None = None
    rip: int | None = None
    rsp: int | None = None
    rsp_adjust: int = 0
    rolled_back: bool = False


CONTINUE = BlockDecision(BlockAction.CONTINUE)

# Kind sets as plain ints: membership of an IntEnum member hashes as its int value.
_PUSHES = frozenset(int(k) for k in (Terminator.CALL_DIRECT, Terminator.CALL_INDIRECT, Terminator.CALL_INDIRECT_NOTRACK))
_POPS = frozenset(int(k) for k in (Terminator.RET, Terminator.RET_IMM))
_ARMS_TRACKED = frozenset(int(k) for k in (Terminator.CALL_INDIRECT, Terminator.JMP_INDIRECT))
_ARMS_NOTRACK = frozenset(int(k) for k in (Terminator.CALL_INDIRECT_NOTRACK, Terminator.JMP_INDIRECT_NOTRACK))


def _rolled_back(fault: GuestFault, rip: int, rsp: int | None, adjust: int) -> BlockDecision:
    """A terminator that did not happen: RIP back at it, RSP = ``rsp`` + ``adjust``."""
    return BlockDecision(BlockAction.FAULT, fault, rip, None if rsp is None else (rsp + adjust) & U64_MASK, adjust,
                         rolled_back=True)


def apply_terminator(m: CetMachine, prev: TerminatorInfo | None, target: int, rsp: int | None) -> BlockDecision:
    """The terminator's own CET effect: shadow-stack push/pop-and-compare and IBT arming.

    ``target``: where the terminator went (RIP now); ``rsp``: RSP now or None (see
    :class:`BlockDecision` ``rsp_adjust``). Use this alone when the
    target faults before its block starts (e.g. a #PF on fetching the target of a CALL or RET):
    the terminator completed, so apply it, then deliver the fetch fault (unless this returns a
    FAULT, which replaces it). The tracker stays armed in the MSR and the target is checked when
    the guest comes back to it. Returns the shared :data:`CONTINUE` unless there is a fault.
    """
    if prev is None:
        return CONTINUE
    kind = prev.kind
    if kind in _PUSHES:
        try:
            shstk_push_near(m, prev.insn_addr + prev.insn_len)
        except GuestFault as fault:
            return _rolled_back(fault, prev.insn_addr, rsp, entry_width(m))
    elif kind in _POPS:
        try:
            shstk_pop_near_and_check(m, target)
        except GuestFault as fault:
            return _rolled_back(fault, prev.insn_addr, rsp, -entry_width(m) - prev.imm16)
        return CONTINUE
    if kind in _ARMS_TRACKED:
        ibt_arm_on_indirect(m, notrack_prefix=False)
    elif kind in _ARMS_NOTRACK:
        ibt_arm_on_indirect(m, notrack_prefix=True)
    return CONTINUE


def check_block_target(m: CetMachine, block_addr: int, first_bytes: bytes) -> BlockDecision:
    """ENDBRANCH enforcement at a block start (ibt_check_target); #CP(3) has RIP = ``block_addr``.

    Returns the shared :data:`CONTINUE` unless there is a fault.
    """
    try:
        ibt_check_target(m, block_addr, first_bytes)
    except GuestFault as fault:
        return BlockDecision(BlockAction.FAULT, fault, block_addr, None)
    return CONTINUE


def on_block_start(
    m: CetMachine, prev: TerminatorInfo | None, block_addr: int, rsp: int | None, first_bytes: bytes
) -> BlockDecision:
    """Apply ``prev`` (None = nothing to apply) and check the new block (see the module table).

    ``block_addr``: RIP of the new block; ``rsp``: RSP now (after the terminator ran), or None
    when the engine has not read it — RSP is only needed to roll a faulting CALL/RET back, and
    the decision's ``rsp_adjust`` gives that roll-back relative to the live RSP (the Python hook
    saves a register read per block this way); ``first_bytes``: at least the first 4 bytes of
    the new block (fewer if the block is shorter). Equivalent to :func:`apply_terminator` then,
    if that continues, :func:`check_block_target` (inlined: this runs at every block start).
    """
    if prev is not None:
        decision = apply_terminator(m, prev, block_addr, rsp)
        if decision is not CONTINUE:
            return decision
    try:
        ibt_check_target(m, block_addr, first_bytes)
    except GuestFault as fault:
        return BlockDecision(BlockAction.FAULT, fault, block_addr, None)
    return CONTINUE


_M = iced_x86.Mnemonic
_EMULATED_MNEMONICS = frozenset({
    _M.RETF, _M.IRET, _M.IRETD, _M.IRETQ, _M.SYSCALL, _M.SYSRET, _M.SYSRETQ, _M.SYSENTER,
    _M.SYSEXIT, _M.SYSEXITQ, _M.INT, _M.INT1, _M.INT3, _M.INTO,
})


def _has_notrack_prefix(insn: iced_x86.Instruction) -> bool:
    """NOTRACK = a 3E (DS) prefix as the last segment prefix on a near indirect CALL/JMP.

    iced reports the effective segment prefix even in 64-bit mode (where DS overrides are
    otherwise ignored), and prints such branches as "notrack".
    """
    return insn.segment_prefix == iced_x86.Register.DS


def classify_terminator(insn: iced_x86.Instruction) -> TerminatorInfo:
    """Classify a block's last instruction by mnemonic (iced's flow control calls SYSCALL a CALL
    and IRETQ/SYSRET a RETURN, so it is not used).

    CALL rel with target = next RIP → CALL_DIRECT_DISP0; other direct near CALL → CALL_DIRECT;
    near indirect CALL/JMP → *_INDIRECT or *_INDIRECT_NOTRACK; near RET → RET, RET imm16 →
    RET_IMM (imm16 set); far CALL/JMP/RET, IRET, SYSCALL/SYSRET, SYSENTER/SYSEXIT, INT n/INT1/
    INT3/INTO → OTHER_EMULATED (the engine emulates them); anything else → FALLTHROUGH.
    """
    mnemonic = insn.mnemonic
    kind = Terminator.FALLTHROUGH
    imm16 = 0
    if mnemonic == _M.CALL:
        if insn.is_call_near:
            disp0 = insn.near_branch_target == insn.next_ip
            kind = Terminator.CALL_DIRECT_DISP0 if disp0 else Terminator.CALL_DIRECT
        elif insn.is_call_near_indirect:
            kind = Terminator.CALL_INDIRECT_NOTRACK if _has_notrack_prefix(insn) else Terminator.CALL_INDIRECT
        else:
            kind = Terminator.OTHER_EMULATED
    elif mnemonic == _M.JMP:
        if insn.is_jmp_near_indirect:
            kind = Terminator.JMP_INDIRECT_NOTRACK if _has_notrack_prefix(insn) else Terminator.JMP_INDIRECT
        elif insn.is_jmp_far or insn.is_jmp_far_indirect:
            kind = Terminator.OTHER_EMULATED
    elif mnemonic == _M.RET:
        if insn.op_count == 1:
            kind = Terminator.RET_IMM
            imm16 = insn.immediate16
        else:
            kind = Terminator.RET
    elif mnemonic in _EMULATED_MNEMONICS:
        kind = Terminator.OTHER_EMULATED
    return TerminatorInfo(kind, insn.ip, insn.len, imm16)
