"""SSP (and IBT tracker) changes on far transfers: control transfers that change CS or privilege
(interrupt and exception delivery, IRET, far CALL/RET, SYSCALL/SYSRET, SYSENTER/SYSEXIT).

[SDM Vol. 2 INT n/INTO/INT3/INT1 (event delivery), IRET, CALL far, RET far, SYSCALL, SYSRET,
SYSENTER, SYSEXIT pseudo-code; SDM Vol. 1 §18.2.4-§18.2.6.]

How the engine calls these (all of them return the new SSP, which they have also written to
``m.ssp``, or raise :class:`~cetvm.cpu.faults.GuestFault` with SSP, PL3_SSP and the trackers
unchanged):

============================  ==============================================================
transfer                      call
============================  ==============================================================
interrupt / exception         ``ssp_on_event(m, old_cpl, new_cpl, ist, gate_is_64bit, cs, lip)``
                              after the data-stack frame is pushed and after the CPL switch
                              (``m.cpl == new_cpl``; the interrupt SSP table is read with
                              ``m.mem_read`` as a supervisor read). ``cs``/``lip``: the
                              interrupted code's CS selector and CS.base + RIP of the return
                              point (the RIP pushed on the data stack).
IRET                          ``ssp_on_iret(m, old_cpl, new_cpl, cs, lip)``: ``cs``/``lip`` are
                              the CS selector and CS.base + RIP being returned to (from the
                              IRET frame). Does not read ``m.cpl``; call it after the data-stack
                              frame is read and checked and before committing RIP/CS/RSP.
far RET                       ``ssp_on_far_ret(m, old_cpl, new_cpl, cs, lip)`` — as IRET.
far CALL (incl. call gate)    ``ssp_on_far_call(m, old_cpl, new_cpl, cs, lip)``: ``cs``/``lip``
                              are the caller's CS selector and CS.base + return RIP.
far JMP                       ``ibt.ibt_arm_on_transfer(m, new_cpl)`` only (no shadow-stack
                              effect).
SYSCALL / SYSENTER            ``ssp_on_syscall(m, old_cpl)``.
SYSRET / SYSEXIT              ``ssp_on_sysret(m)``.
============================  ==============================================================

Every function also arms the IBT tracker where the SDM does (events, far CALL, SYSCALL); IRET,
far RET and SYSRET leave trackers alone.

``long_mode`` / ``target_long_mode`` keyword arguments mean "IA32_EFER.LMA AND CS.L" of the code
being entered (default ``m.long_mode``); ``ia32e`` means IA32_EFER.LMA (default ``m.long_mode``).

Commit order: the SDM writes IA32_PL3_SSP before switching stacks; here every register/MSR write
is done after the last check that can fault (token cmpxchg and frame stores are memory effects
that happen in SDM order), so a fault during delivery leaves the register state of the
interrupted context intact for the nested fault's delivery.
"""

from __future__ import annotations

from cetvm import CetvmError
from cetvm.arch import CpError, Msr, pl_ssp_msr
from cetvm.cpu.cet.ibt import ibt_arm_on_transfer
from cetvm.cpu.cet.machine import CetMachine
from cetvm.cpu.cet.policy import la_adjust, shadow_stack_enabled, ssp_valid_for_mode
from cetvm.cpu.cet.shadow_stack import (
    is_user_shadow_stack,
    pop_transfer_frame,
    push_transfer_frame,
    shstk_enter_supervisor,
    shstk_free_token,
)
from cetvm.cpu.faults import cp, gp
from cetvm.arch.regs import U64_MASK

#: Entries of the interrupt shadow-stack table (IST index 1-7 → ISST_ADDR + 8·IST).
ISST_ENTRY_SIZE = 8


def _check_cpls(old_cpl: int, new_cpl: int) -> None:
    if not (0 <= old_cpl <= 3 and 0 <= new_cpl <= 3):
        raise CetvmError(f"internal error: CPL out of range (old {old_cpl}, new {new_cpl})")


def _pl3_ssp_to_save(ssp: int, ia32e: bool) -> int:
    """Value saved to IA32_PL3_SSP when leaving CPL 3: LA_adjust(SSP) in IA-32e mode, else SSP."""
    return la_adjust(ssp) if ia32e else ssp


def interrupt_ssp_table_entry(m: CetMachine, ist: int) -> int:
    """The new SSP for an IST event: 8 bytes at IA32_INTERRUPT_SSP_TABLE_ADDR + 8·IST.

    Read with ``m.mem_read`` (a supervisor data read: the caller has switched to the new CPL).
    """
    base = m.cet_msr(Msr.IA32_INT_SSP_TAB)
    return m.mem_read((base + ISST_ENTRY_SIZE * ist) & U64_MASK, 8)


def ssp_on_event(
    m: CetMachine,
    old_cpl: int,
    new_cpl: int,
    ist: int,
    gate_is_64bit: bool,
    cs: int,
    lip: int,
    *,
    ia32e: bool | None = None,
) -> int:
    """Interrupt/exception delivery through an IDT gate: switch shadow stacks, push the frame.

    Inter-privilege (``new_cpl < old_cpl``) [SDM INT n INTER-PRIVILEGE-LEVEL-INTERRUPT]:
    (1) leaving CPL 3 with user shadow stacks on: IA32_PL3_SSP = LA_adjust(SSP);
    (2) if shadow stacks are on at ``new_cpl``: new SSP = interrupt SSP table[ist] for a 64-bit
        gate with ``ist`` ≠ 0, else IA32_PL<new_cpl>_SSP;
    (3) :func:`~cetvm.cpu.cet.shadow_stack.shstk_enter_supervisor` (#GP(0): alignment, 32-byte
        region, bits 63:32 outside 64-bit mode, token not free/not matching);
    (4) push the CS/LIP/old-SSP frame only if the interrupted code was supervisor (CPL 1/2);
    (5) arm the IBT tracker of ``new_cpl`` (ibt_arm_on_transfer).
    Same privilege [INTRA-PRIVILEGE-LEVEL-INTERRUPT]: with IST (64-bit gate) the new SSP comes from
    the interrupt SSP table and its token is checked as in (3), otherwise SSP is kept and no token
    is checked; the frame (prevSSP = SSP before the event) is always pushed; then (5).
    With shadow stacks off at ``new_cpl`` SSP is left unchanged.
    """
    _check_cpls(old_cpl, new_cpl)
    if m.cpl != new_cpl:
        raise CetvmError(f"internal error: ssp_on_event needs the CPL switched to {new_cpl} first (CPL is {m.cpl})")
    if ia32e is None:
        ia32e = m.long_mode
    old_ssp = m.ssp
    save_pl3 = old_cpl == 3 and new_cpl < 3 and shadow_stack_enabled(m, 3)
    new_ssp = old_ssp
    use_ist = gate_is_64bit and ist != 0
    if shadow_stack_enabled(m, new_cpl):
        if new_cpl < old_cpl:
            new_ssp = interrupt_ssp_table_entry(m, ist) if use_ist else m.cet_msr(pl_ssp_msr(new_cpl))
            shstk_enter_supervisor(m, new_ssp)
            if old_cpl != 3:
                new_ssp = push_transfer_frame(m, new_ssp, cs, lip, old_ssp, user=False)
        else:
            if use_ist:
                new_ssp = interrupt_ssp_table_entry(m, ist)
                shstk_enter_supervisor(m, new_ssp)
            new_ssp = push_transfer_frame(m, new_ssp, cs, lip, old_ssp, user=is_user_shadow_stack(new_cpl))
    if save_pl3:
        m.set_cet_msr(Msr.IA32_PL3_SSP, _pl3_ssp_to_save(old_ssp, ia32e))
    m.ssp = new_ssp
    ibt_arm_on_transfer(m, new_cpl)
    return new_ssp


def _return_to_outer(
    m: CetMachine, old_cpl: int, new_cpl: int, cs: int, lip: int, target_long_mode: bool
) -> int:
    """IRET / far RET to a less privileged level [SDM RETURN-TO-OUTER-PRIVILEGE-LEVEL].

    With shadow stacks on at ``old_cpl``: #CP(FAR_RET_IRET) if SSP is not 8-aligned; when
    returning to CPL 1/2 pop and verify the frame (prevSSP becomes the new SSP). With shadow
    stacks on at ``new_cpl``: returning to CPL 3 takes IA32_PL3_SSP; #GP(0) if the new SSP is
    not canonical (64-bit target) / has bits 63:32 set (other targets). Finally, past all
    faulting checks, free the supervisor token at the old SSP (after the frame pop) when shadow
    stacks were on at ``old_cpl``.
    """
    old_on = shadow_stack_enabled(m, old_cpl)
    new_on = shadow_stack_enabled(m, new_cpl)
    ssp = m.ssp
    temp_ssp = ssp
    if old_on:
        if ssp & 7:
            raise cp(CpError.FAR_RET_IRET)
        if new_cpl != 3:
            temp_ssp, ssp = pop_transfer_frame(m, ssp, cs, lip, user=False)
    temp_old_ssp = ssp
    new_ssp = ssp
    if new_on:
        if new_cpl == 3:
            temp_ssp = m.cet_msr(Msr.IA32_PL3_SSP)
        if not ssp_valid_for_mode(temp_ssp, target_long_mode):
            raise gp(0)
        new_ssp = temp_ssp
    if old_on:
        shstk_free_token(m, temp_old_ssp)
    m.ssp = new_ssp
    return new_ssp


def _pop_same_privilege_frame(
    m: CetMachine, cpl: int, cs: int, lip: int, target_long_mode: bool
) -> tuple[int, int]:
    """Same-privilege far RET / IRET: pop and verify the frame, validate prevSSP for the mode.

    Returns (prevSSP, SSP after the 24-byte frame). #CP(FAR_RET_IRET) from the frame checks,
    then #GP(0) if prevSSP is not canonical (64-bit) or has bits 63:32 set (other modes).
    """
    prev_ssp, after = pop_transfer_frame(m, m.ssp, cs, lip, user=is_user_shadow_stack(cpl))
    if not ssp_valid_for_mode(prev_ssp, target_long_mode):
        raise gp(0)
    return prev_ssp, after


def ssp_on_iret(
    m: CetMachine,
    old_cpl: int,
    new_cpl: int,
    cs: int,
    lip: int,
    *,
    target_long_mode: bool | None = None,
    ia32e: bool | None = None,
) -> int:
    """IRET: verify the shadow-stack frame, restore SSP, free the supervisor token.

    ``new_cpl > old_cpl``: :func:`_return_to_outer` (to CPL 3: SSP = IA32_PL3_SSP and the token
    at the old SSP is freed). ``new_cpl == old_cpl`` with shadow stacks on: pop and verify the
    frame (#CP(FAR_RET_IRET) on SSP misalignment, CS/LIP mismatch, prevSSP & 3 ≠ 0; #GP(0) on a
    bad prevSSP for the mode); in IA-32e mode, if prevSSP differs from the SSP after the frame
    (``tempSSP != SSP``: the event had switched stacks through IST) free the token at that SSP;
    SSP = prevSSP. Bochs frees the token unconditionally; we follow the SDM.
    A return to a more privileged level is not possible for IRET (the engine faults first).
    """
    _check_cpls(old_cpl, new_cpl)
    if target_long_mode is None:
        target_long_mode = m.long_mode
    if ia32e is None:
        ia32e = m.long_mode
    if new_cpl > old_cpl:
        return _return_to_outer(m, old_cpl, new_cpl, cs, lip, target_long_mode)
    if not shadow_stack_enabled(m, old_cpl):
        return m.ssp
    prev_ssp, after = _pop_same_privilege_frame(m, old_cpl, cs, lip, target_long_mode)
    if ia32e and prev_ssp != after:
        shstk_free_token(m, after)
    m.ssp = prev_ssp
    return prev_ssp


def ssp_on_far_ret(
    m: CetMachine,
    old_cpl: int,
    new_cpl: int,
    cs: int,
    lip: int,
    *,
    target_long_mode: bool | None = None,
) -> int:
    """Far RET (RETF / RETF imm16): as IRET, but a same-privilege return frees no token.

    [SDM RET far: RETURN-TO-SAME-PRIVILEGE-LEVEL pops the frame and sets SSP := prevSSP;
    RETURN-TO-OUTER-PRIVILEGE-LEVEL as :func:`_return_to_outer`.] ``cs``/``lip``: the CS
    selector and CS.base + RIP being returned to.
    """
    _check_cpls(old_cpl, new_cpl)
    if target_long_mode is None:
        target_long_mode = m.long_mode
    if new_cpl > old_cpl:
        return _return_to_outer(m, old_cpl, new_cpl, cs, lip, target_long_mode)
    if not shadow_stack_enabled(m, old_cpl):
        return m.ssp
    prev_ssp, _after = _pop_same_privilege_frame(m, old_cpl, cs, lip, target_long_mode)
    m.ssp = prev_ssp
    return prev_ssp


def ssp_on_far_call(
    m: CetMachine,
    old_cpl: int,
    new_cpl: int,
    cs: int,
    lip: int,
    *,
    ia32e: bool | None = None,
) -> int:
    """Far CALL (direct, indirect or through a call gate): push the frame, switch stacks.

    Same privilege: with shadow stacks on, push CS/LIP/SSP (with the 4-byte alignment pad) on the
    current shadow stack. Call gate to an inner level: as an event without IST — save PL3_SSP when
    leaving CPL 3, new SSP = IA32_PL<new_cpl>_SSP, token check with the 32-byte region rule,
    frame pushed only when the caller was supervisor [SDM CALL MORE-PRIVILEGE]. Then arm the IBT
    tracker of ``new_cpl``. Does not read ``m.cpl``.
    """
    _check_cpls(old_cpl, new_cpl)
    if ia32e is None:
        ia32e = m.long_mode
    old_ssp = m.ssp
    new_ssp = old_ssp
    save_pl3 = old_cpl == 3 and new_cpl < 3 and shadow_stack_enabled(m, 3)
    if shadow_stack_enabled(m, new_cpl):
        if new_cpl < old_cpl:
            new_ssp = m.cet_msr(pl_ssp_msr(new_cpl))
            shstk_enter_supervisor(m, new_ssp)
            if old_cpl != 3:
                new_ssp = push_transfer_frame(m, new_ssp, cs, lip, old_ssp, user=False)
        else:
            new_ssp = push_transfer_frame(m, old_ssp, cs, lip, old_ssp, user=is_user_shadow_stack(new_cpl))
    if save_pl3:
        m.set_cet_msr(Msr.IA32_PL3_SSP, _pl3_ssp_to_save(old_ssp, ia32e))
    m.ssp = new_ssp
    ibt_arm_on_transfer(m, new_cpl)
    return new_ssp


def ssp_on_syscall(m: CetMachine, old_cpl: int, *, ia32e: bool | None = None) -> int:
    """SYSCALL / SYSENTER [SDM SYSCALL, SYSENTER Operation].

    If shadow stacks are on at ``old_cpl`` (normally CPL 3): IA32_PL3_SSP = LA_adjust(SSP). Then
    at CPL 0, if S_CET.SH_STK_EN: SSP = 0 (the kernel establishes its stack with SETSSBSY). The
    supervisor IBT tracker goes to WAIT_FOR_ENDBRANCH (SUPPRESS cleared). Does not read ``m.cpl``.
    """
    _check_cpls(old_cpl, 0)
    if ia32e is None:
        ia32e = m.long_mode
    if shadow_stack_enabled(m, old_cpl):
        m.set_cet_msr(Msr.IA32_PL3_SSP, _pl3_ssp_to_save(m.ssp, ia32e))
    if shadow_stack_enabled(m, 0):
        m.ssp = 0
    ibt_arm_on_transfer(m, 0)
    return m.ssp


def ssp_on_sysret(m: CetMachine) -> int:
    """SYSRET / SYSEXIT: SSP = IA32_PL3_SSP if shadow stacks are on at CPL 3 [SDM SYSRET]."""
    if shadow_stack_enabled(m, 3):
        m.ssp = m.cet_msr(Msr.IA32_PL3_SSP)
    return m.ssp


#: SYSENTER and SYSEXIT have the same CET effects as SYSCALL and SYSRET.
ssp_on_sysenter = ssp_on_syscall
ssp_on_sysexit = ssp_on_sysret
