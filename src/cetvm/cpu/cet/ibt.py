"""Indirect branch tracking: the ENDBRANCH state machine [SDM Vol. 1 §18.3].

The tracker has no private copy: TRACKER (bit 11, WAIT_FOR_ENDBRANCH) and SUPPRESS (bit 10) live
in IA32_U_CET (CPL 3) and IA32_S_CET (CPL 0-2), exactly where XSAVES, a VMCS or a migration sees
them. Each function reads and writes those MSR bits through ``m.cet_msr``/``m.set_cet_msr``.
"""

from __future__ import annotations

from cetvm.arch import ENDBR32, ENDBR64, CpError
from cetvm.cpu.cet.machine import CetMachine
from cetvm.cpu.cet.policy import (
    ENDBR_EN, LEG_IW_EN, NO_TRACK_EN, S_CET, SUPPRESS, SUPPRESS_DIS, TRACKER, U_CET, cet_ctl_index, ibt_enabled,
    ibt_enabled_and_not_suppressed,
)
from cetvm.cpu.faults import cp

#: Bits 63:12 of U_CET/S_CET: EB_LEG_BITMAP_BASE (the legacy code-page bitmap, 4 KiB aligned).
LEG_BITMAP_BASE_MASK = 0xFFFF_FFFF_FFFF_F000
#: The legacy bitmap indexes bits 47:12 of the target linear address.
_LIP_BITMAP_MASK = (1 << 48) - 1
_TRACKER_OR_SUPPRESS = TRACKER | SUPPRESS


def _update_ctl(m: CetMachine, cpl: int, set_bits: int, clear_bits: int) -> None:
    msr = cet_ctl_index(cpl)
    value = m.cet_msr(msr)
    new = (value & ~clear_bits) | set_bits
    if new != value:
        m.set_cet_msr(msr, new)


def tracker_waiting(m: CetMachine, cpl: int) -> bool:
    """True if IBT is enabled at ``cpl`` and its tracker is WAIT_FOR_ENDBRANCH."""
    return ibt_enabled(m, cpl) and m.cet_msr(cet_ctl_index(cpl)) & TRACKER != 0


def ibt_arm_on_indirect(m: CetMachine, notrack_prefix: bool) -> None:
    """Near indirect CALL/JMP at the current CPL: move the tracker to WAIT_FOR_ENDBRANCH.

    SDM JMP/CALL: "IF EndbranchEnabledAndNotSuppressed(CPL) ... IF instruction is not prefixed
    with 3EH or NO_TRACK_EN = 0 THEN TRACKER = WAIT_FOR_ENDBRANCH". So nothing happens when
    ENDBR_EN = 0 or SUPPRESS = 1, and a NOTRACK (3E) branch is exempt only when NO_TRACK_EN = 1.
    """
    cpl = m.cpl
    if not ibt_enabled_and_not_suppressed(m, cpl):
        return
    if notrack_prefix and m.cet_msr(cet_ctl_index(cpl)) & NO_TRACK_EN:
        return
    _update_ctl(m, cpl, TRACKER, 0)


def ibt_arm_on_transfer(m: CetMachine, target_cpl: int) -> None:
    """Far CALL/JMP, interrupts/exceptions, SYSCALL/SYSENTER: arm the tracker of the target CPL.

    SDM CALL far / JMP far / INT n / SYSCALL: "IF EndbranchEnabled(CPL) THEN IA32_x_CET.TRACKER =
    WAIT_FOR_ENDBRANCH; IA32_x_CET.SUPPRESS = 0" with x = U for CPL 3, S otherwise, evaluated at
    the new CPL. Unlike a near indirect branch this ignores SUPPRESS (and clears it).
    """
    if ibt_enabled(m, target_cpl):
        _update_ctl(m, target_cpl, TRACKER, SUPPRESS)


def endbr_executed(m: CetMachine, endbr64: bool = True) -> None:
    """ENDBR64 (``endbr64=True``) or ENDBR32 executed at the current CPL.

    The mode's ENDBR (ENDBR64 in 64-bit mode, ENDBR32 otherwise) sets TRACKER = IDLE and
    SUPPRESS = 0 when IBT is enabled; the other one is a NOP [SDM ENDBR64/ENDBR32 Operation].
    """
    if endbr64 != m.long_mode:
        return
    if ibt_enabled(m, m.cpl):
        _update_ctl(m, m.cpl, 0, _TRACKER_OR_SUPPRESS)


def legacy_bitmap_location(ctl: int, target_lip: int) -> tuple[int, int]:
    """(byte address, bit index) of ``target_lip`` in the legacy code-page bitmap.

    One bit per 4 KiB page of the low 48 bits of the linear address: byte EB_LEG_BITMAP_BASE +
    ((LIP & (2^48-1)) >> 15), bit (LIP >> 12) & 7 [SDM Vol. 1 §18.3.6].
    """
    base = ctl & LEG_BITMAP_BASE_MASK
    return base + ((target_lip & _LIP_BITMAP_MASK) >> 15), (target_lip >> 12) & 7


def _legacy_page_allowed(m: CetMachine, ctl: int, target_lip: int) -> bool:
    """LEG_IW_EN set and the bitmap bit for the target's page set.

    The bitmap byte is read with ``m.mem_read`` (an ordinary data read at the current CPL, so a
    fault on the bitmap is delivered as that read's #PF). Decision recorded here because the
    reference does not say which access type the hardware uses.
    """
    if not ctl & LEG_IW_EN:
        return False
    byte_addr, bit = legacy_bitmap_location(ctl, target_lip)
    return bool(m.mem_read(byte_addr, 1) >> bit & 1)


def ibt_check_target(m: CetMachine, target_lip: int, target_bytes: bytes) -> None:
    """Start of a block at ``target_lip`` whose first bytes are ``target_bytes``: enforce ENDBRANCH.

    With IBT on at the current CPL:
    - the mode's ENDBR (ENDBR64 in 64-bit mode, ENDBR32 otherwise) at ``target_bytes`` executes:
      TRACKER = IDLE, SUPPRESS = 0 (also when the tracker was already IDLE, as the SDM's ENDBR
      does);
    - otherwise, while WAIT_FOR_ENDBRANCH: with LEG_IW_EN and the legacy bitmap bit of the target
      page set → IDLE, and SUPPRESS = 1 unless SUPPRESS_DIS [SDM §18.3.6, Bochs
      LegacyEndbranchTreatment]; else #CP(ENDBRANCH) with RIP at the target (tracker stays WAIT).
    With IBT off, or the tracker IDLE and no ENDBR, nothing happens.
    """
    if not m.cr4_cet:  # ibt_enabled(m, cpl), inlined: ``ctl`` is needed below
        return
    cpl = m.cpl
    msr = U_CET if cpl == 3 else S_CET
    ctl = m.cet_msr(msr)
    if not ctl & ENDBR_EN:
        return
    if target_bytes[:4] == (ENDBR64 if m.long_mode else ENDBR32):
        if ctl & _TRACKER_OR_SUPPRESS:
            m.set_cet_msr(msr, ctl & ~_TRACKER_OR_SUPPRESS)
        return
    if not ctl & TRACKER:
        return
    if _legacy_page_allowed(m, ctl, target_lip):
        suppress = 0 if ctl & SUPPRESS_DIS else SUPPRESS
        _update_ctl(m, cpl, suppress, _TRACKER_OR_SUPPRESS)
        return
    raise cp(CpError.ENDBRANCH)
