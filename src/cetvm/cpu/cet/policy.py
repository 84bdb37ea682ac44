"""Which CET feature is active at a privilege level [SDM Vol. 1 §18.2.2, §18.3.2].

Pure predicates over the :class:`~cetvm.cpu.cet.machine.CetMachine` state. "Protected mode with
paging" is the engine's concern: these functions assume it (the engine does not call CET
semantics in real mode or with paging off).

Speed (these run at every block start of the Python CET path): the bit and MSR constants below
are plain ints derived from :mod:`cetvm.arch`. ``int & CetCtl.X`` would dispatch to IntFlag's
reflected operator (~0.6 µs in CPython 3.11); ``int & int`` stays on the int fast path.
"""

from __future__ import annotations

from cetvm.arch import CetCtl, Msr, is_canonical
from cetvm.cpu.cet.machine import CetMachine
from cetvm.arch.regs import U64_MASK

#: Linear-address width used for LA_adjust / canonical SSP checks (4-level paging).
LINEAR_ADDRESS_BITS = 48


#: MSR indices and U_CET/S_CET bits as plain ints (hot-path constants, see the module docstring).
U_CET = int(Msr.IA32_U_CET)
S_CET = int(Msr.IA32_S_CET)
SH_STK_EN = int(CetCtl.SH_STK_EN)
WR_SHSTK_EN = int(CetCtl.WR_SHSTK_EN)
ENDBR_EN = int(CetCtl.ENDBR_EN)
LEG_IW_EN = int(CetCtl.LEG_IW_EN)
NO_TRACK_EN = int(CetCtl.NO_TRACK_EN)
SUPPRESS_DIS = int(CetCtl.SUPPRESS_DIS)
SUPPRESS = int(CetCtl.SUPPRESS)
TRACKER = int(CetCtl.TRACKER)
_WRSS_NEEDS = SH_STK_EN | WR_SHSTK_EN
_IBT_TRACKING = ENDBR_EN | SUPPRESS


def cet_msr_for_cpl(cpl: int) -> Msr:
    """IA32_U_CET controls CPL 3, IA32_S_CET controls CPL 0-2 [SDM Vol. 1 §18.2.2]."""
    return Msr.IA32_U_CET if cpl == 3 else Msr.IA32_S_CET


def cet_ctl_index(cpl: int) -> int:
    """:func:`cet_msr_for_cpl` as a plain int MSR index (for the hot paths)."""
    return U_CET if cpl == 3 else S_CET


def cet_ctl(m: CetMachine, cpl: int) -> CetCtl:
    """The U_CET or S_CET value that governs ``cpl``."""
    return CetCtl(m.cet_msr(cet_msr_for_cpl(cpl)))


def shadow_stack_enabled(m: CetMachine, cpl: int) -> bool:
    """ShadowStackEnabled(CPL): CR4.CET = 1 and SH_STK_EN in U_CET (CPL 3) / S_CET (CPL < 3)."""
    return m.cr4_cet and m.cet_msr(U_CET if cpl == 3 else S_CET) & SH_STK_EN != 0


def wrss_enabled(m: CetMachine, cpl: int) -> bool:
    """ShadowStackWriteEnabled(CPL): shadow stacks on and WR_SHSTK_EN set for that CPL (WRSS)."""
    return m.cr4_cet and m.cet_msr(U_CET if cpl == 3 else S_CET) & _WRSS_NEEDS == _WRSS_NEEDS


def ibt_enabled(m: CetMachine, cpl: int) -> bool:
    """EndbranchEnabled(CPL): CR4.CET = 1 and ENDBR_EN in U_CET (CPL 3) / S_CET (CPL < 3)."""
    return m.cr4_cet and m.cet_msr(U_CET if cpl == 3 else S_CET) & ENDBR_EN != 0


def ibt_enabled_and_not_suppressed(m: CetMachine, cpl: int) -> bool:
    """EndbranchEnabledAndNotSuppressed(CPL): ENDBR_EN = 1 and SUPPRESS = 0 [SDM JMP/CALL]."""
    return m.cr4_cet and m.cet_msr(U_CET if cpl == 3 else S_CET) & _IBT_TRACKING == ENDBR_EN


def mode_bit(m: CetMachine) -> int:
    """IA32_EFER.LMA AND CS.L as the 0/1 bit stored in restore and previous-SSP tokens."""
    return 1 if m.long_mode else 0


def la_adjust(value: int) -> int:
    """LA_adjust: bits 63:N take the value of bit N-1 (N = linear-address width) [SDM SYSCALL/INT].

    Used when a CPL-3 SSP is saved to IA32_PL3_SSP in IA-32e mode.
    """
    value &= U64_MASK
    if value & (1 << (LINEAR_ADDRESS_BITS - 1)):
        return value | (U64_MASK & ~((1 << LINEAR_ADDRESS_BITS) - 1))
    return value & ((1 << LINEAR_ADDRESS_BITS) - 1)


def ssp_valid_for_mode(ssp: int, long_mode: bool) -> bool:
    """An SSP to be loaded must be canonical in 64-bit mode, else have bits 63:32 clear.

    [SDM IRET / far RET: "(IA32_EFER.LMA AND CS.L) = 0 AND tempSSP[63:32] != 0 OR
    (IA32_EFER.LMA AND CS.L) = 1 AND tempSSP is not canonical" → #GP(0).]
    """
    if long_mode:
        return is_canonical(ssp, LINEAR_ADDRESS_BITS)
    return (ssp & U64_MASK) >> 32 == 0
