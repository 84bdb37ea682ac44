"""Shadow-stack primitives: near CALL/RET, far-transfer frames, supervisor tokens.

[SDM Vol. 1 ch. 18.2; SDM Vol. 2 CALL, RET, INT n, IRET pseudo-code.]

Conventions shared by every function here:

- Shadow-stack memory is accessed only through ``m.ss_read``/``m.ss_write``/``m.ss_cmpxchg``,
  which apply the shadow-stack paging rule and raise #PF with PfErr.SS. ``user`` is True for an
  access made on behalf of CPL 3 (a user shadow stack), False for a supervisor shadow stack.
- Functions that may fault after a partial computation never write ``m.ssp`` before their last
  check: a fault leaves SSP as it was (faults are restartable, SDM Vol. 3 §6.5).
- The near CALL/RET primitives run at every block start of the Python CET path: they inline
  :func:`~cetvm.cpu.cet.policy.shadow_stack_enabled`, :func:`entry_width` and
  :func:`is_user_shadow_stack` (same rules, plain-int constants; see :mod:`cetvm.cpu.cet.policy`).
- Frame helpers take and return SSP values instead of writing ``m.ssp`` so that the event/transfer
  functions in :mod:`cetvm.cpu.cet.far_transfers` can commit SSP once, after every check.
"""

from __future__ import annotations

from cetvm.arch import CpError, shadow_stack_entry_width
from cetvm.cpu.cet.machine import CetMachine
from cetvm.cpu.cet.policy import S_CET, SH_STK_EN, U_CET
from cetvm.cpu.faults import cp, gp
from cetvm.arch.regs import U64_MASK

_U32 = 0xFFFF_FFFF

#: Size of the far-transfer / event frame on the shadow stack: CS, LIP, previous SSP.
TRANSFER_FRAME_SIZE = 24
#: Token plus frame must lie in one naturally aligned region of this size.
TOKEN_FRAME_REGION = 32


def entry_width(m: CetMachine) -> int:
    """Near CALL/RET shadow-stack entry width: 8 bytes in 64-bit mode, 4 otherwise."""
    return shadow_stack_entry_width(m.long_mode)


def is_user_shadow_stack(cpl: int) -> bool:
    """Shadow-stack accesses made at CPL 3 are user accesses; at CPL 0-2 supervisor accesses."""
    return cpl == 3


def call_pushes_shadow_stack(displacement_zero: bool) -> bool:
    """Whether a near CALL pushes its return address on the shadow stack.

    SDM CALL: "IF ShadowStackEnabled(CPL) AND DEST != 0" — a CALL rel16/rel32 whose displacement
    is 0 (the "call next instruction" idiom used to read RIP in 32-bit code) pushes nothing, so
    the matching POP does not unbalance the shadow stack. Every other near CALL (any non-zero
    displacement, any indirect CALL) pushes [SDM Vol. 2 CALL].
    """
    return not displacement_zero


def shstk_push_near(m: CetMachine, ret_addr: int) -> None:
    """Near CALL: SSP -= w; [SSP] = return address (w = 8 in 64-bit mode, else 4).

    Does nothing when shadow stacks are off at the current CPL. On a #PF from the store SSP is
    unchanged [SDM CALL: ShadowStackPush8B(RIP) / ShadowStackPush4B(EIP)].
    """
    cpl = m.cpl
    if not (m.cr4_cet and m.cet_msr(U_CET if cpl == 3 else S_CET) & SH_STK_EN):  # shadow_stack_enabled
        return
    if m.long_mode:
        width, mask = 8, U64_MASK
    else:
        width, mask = 4, _U32
    new_ssp = (m.ssp - width) & U64_MASK
    m.ss_write(new_ssp, ret_addr & mask, width, user=cpl == 3)
    m.ssp = new_ssp


def shstk_pop_near_and_check(m: CetMachine, data_stack_ret: int) -> None:
    """Near RET / RET imm16: pop w bytes from the shadow stack and compare with the return address.

    ``data_stack_ret`` is the return address the RET took from the data stack (the new RIP/EIP).
    Mismatch → #CP(NEAR_RET) as a fault: SSP is unchanged (and the caller keeps RIP at the RET and
    RSP as before it) [SDM RET: "IF tempRIP != tempSsEIP THEN #CP(NEAR_RET)"]. Does nothing when
    shadow stacks are off at the current CPL.
    """
    cpl = m.cpl
    if not (m.cr4_cet and m.cet_msr(U_CET if cpl == 3 else S_CET) & SH_STK_EN):  # shadow_stack_enabled
        return
    if m.long_mode:
        width, mask = 8, U64_MASK
    else:
        width, mask = 4, _U32
    ssp = m.ssp
    if m.ss_read(ssp, width, user=cpl == 3) != data_stack_ret & mask:
        raise cp(CpError.NEAR_RET)
    m.ssp = (ssp + width) & U64_MASK


def push_transfer_frame(m: CetMachine, ssp: int, cs: int, lip: int, prev_ssp: int, *, user: bool) -> int:
    """Push the far-transfer/event frame below ``ssp`` and return the new SSP.

    If ``ssp`` is 4 mod 8 (possible outside 64-bit mode) a 4-byte 0 is stored at ssp-4 and SSP
    is aligned down to 8; then 8-byte pushes of CS (zero-padded), LIP and ``prev_ssp``, so the
    frame reads prevSSP at [SSP], LIP at [SSP+8], CS at [SSP+16] [SDM CALL far / INT n
    "Align to next 8 byte boundary"]. The SDM stores the 4-byte 0 at ssp-4
    unconditionally; when ssp is 8-aligned those bytes are the high half of the CS slot, which
    the CS push overwrites with zero padding, so storing only when ssp & 4 is equivalent.
    """
    if ssp & 4:
        m.ss_write((ssp - 4) & U64_MASK, 0, 4, user=user)
    ssp &= ~7 & U64_MASK
    m.ss_write(ssp - 8, cs & 0xFFFF, 8, user=user)
    m.ss_write(ssp - 16, lip & U64_MASK, 8, user=user)
    m.ss_write(ssp - 24, prev_ssp & U64_MASK, 8, user=user)
    return ssp - TRANSFER_FRAME_SIZE


def pop_transfer_frame(m: CetMachine, ssp: int, cs: int, lip: int, *, user: bool) -> tuple[int, int]:
    """Pop and verify the far RET / IRET frame at ``ssp``; return (prevSSP, ssp + 24).

    #CP(FAR_RET_IRET) if ``ssp`` is not 8-aligned, if the saved CS (a 64-bit compare, so bits above
    15 must be 0) differs from ``cs``, if the saved LIP differs from ``lip`` (CS.base + return
    RIP), or if prevSSP is not 4-aligned [SDM RET far / IRET: tempSsCS, tempSsLIP, tempSSP].
    Does not write ``m.ssp``.
    """
    if ssp & 7:
        raise cp(CpError.FAR_RET_IRET)
    saved_cs = m.ss_read(ssp + 16, 8, user=user)
    saved_lip = m.ss_read(ssp + 8, 8, user=user)
    prev_ssp = m.ss_read(ssp, 8, user=user)
    if saved_cs != cs & 0xFFFF:
        raise cp(CpError.FAR_RET_IRET)
    if saved_lip != lip & U64_MASK:
        raise cp(CpError.FAR_RET_IRET)
    if prev_ssp & 3:
        raise cp(CpError.FAR_RET_IRET)
    return prev_ssp, (ssp + TRANSFER_FRAME_SIZE) & U64_MASK


def token_and_frame_share_region(ssp: int) -> bool:
    """The supervisor token at ``ssp`` and the 24-byte frame below it lie in one aligned 32 bytes.

    SDM INT n / CALL through a call gate: "IF (SSP & ~0x1F) != ((SSP - 24) & ~0x1F) THEN #GP(0)".
    Bochs 2.7 omits this check; we follow the SDM. For an 8-aligned SSP it holds
    only when SSP mod 32 = 24.
    """
    return (ssp & ~0x1F) == ((ssp - TRANSFER_FRAME_SIZE) & ~0x1F)


def shstk_enter_supervisor(m: CetMachine, new_ssp: int, *, long_mode: bool | None = None) -> None:
    """Validate the supervisor token at ``new_ssp`` and mark it busy (inner-privilege transfer).

    In SDM order, each failure → #GP(0):
    1. ``new_ssp`` not 8-aligned;
    2. token and frame not in one naturally aligned 32-byte region (:func:`token_and_frame_share_region`);
    3. outside 64-bit mode (``long_mode`` False, default ``m.long_mode``) and new_ssp[63:32] ≠ 0;
    4. the locked cmpxchg of the token from ``new_ssp`` (free) to ``new_ssp | 1`` (busy) fails —
       a busy token or one naming another address (the SDM pseudo-code of
       the event delivery says #GP(0), decided so).
    The token access is a supervisor shadow-stack access (so a user page → #PF with SS).
    Does not write ``m.ssp``.
    """
    if long_mode is None:
        long_mode = m.long_mode
    new_ssp &= U64_MASK
    if new_ssp & 7:
        raise gp(0)
    if not token_and_frame_share_region(new_ssp):
        raise gp(0)
    if not long_mode and new_ssp >> 32:
        raise gp(0)
    swapped, _old = m.ss_cmpxchg(new_ssp, new_ssp, new_ssp | 1, user=False)
    if not swapped:
        raise gp(0)


def shstk_free_token(m: CetMachine, ssp: int) -> bool:
    """Clear the busy bit of the supervisor token at ``ssp``: cmpxchg ``ssp|1`` → ``ssp``.

    Used by IRET / far RET when leaving a supervisor shadow stack; a token that is not busy or
    does not name ``ssp`` is left alone without a fault [SDM IRET: "shadow_stack_lock_cmpxchg8b(
    tempOldSSP, new_token_value, expected_token_value)" with no check of the result]. Returns
    whether the token was freed. The access is a supervisor shadow-stack access.
    """
    ssp &= U64_MASK
    swapped, _old = m.ss_cmpxchg(ssp, ssp | 1, ssp, user=False)
    return swapped
