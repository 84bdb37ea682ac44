"""The CET instructions, one function each [SDM Vol. 2 instruction pages].

The engine decodes the instruction and passes the operands it resolved: a register value, the
linear address of a memory operand (segmentation and, in 64-bit mode, the canonical check
already applied by the engine's address generation — a non-canonical address is the engine's
#GP(0)/#SS(0)), and the operand size in bytes (4 for the ...D forms, 8 for the ...Q forms).
The LOCK-prefix #UD is also the engine's (it applies to every instruction here).

Each function raises the instruction's #UD/#GP/#CP/#PF as a :class:`~cetvm.cpu.faults.GuestFault`
with no architectural state changed, or performs the instruction; the engine then advances RIP
and applies any :class:`FlagsResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm import CetvmError
from cetvm.arch import CpError, Msr
from cetvm.cpu.cet.ibt import endbr_executed
from cetvm.cpu.cet.machine import CetMachine
from cetvm.cpu.cet.policy import SH_STK_EN, mode_bit, shadow_stack_enabled, wrss_enabled
from cetvm.cpu.cet.shadow_stack import is_user_shadow_stack
from cetvm.cpu.faults import cp, gp, ud
from cetvm.arch.regs import U64_MASK



@dataclass(frozen=True)
class FlagsResult:
    """RFLAGS effect of RSTORSSP / CLRSSBSY: set CF to ``cf``; if ``clear_others``, clear ZF,
    PF, AF, OF and SF ("RFLAGS.ZF,PF,AF,OF,SF := 0")."""

    cf: bool
    clear_others: bool = True


def _check_operand_size(operand_size: int) -> None:
    if operand_size not in (4, 8):
        raise CetvmError(f"internal error: CET instruction operand size must be 4 or 8, got {operand_size}")


def _require_shadow_stack(m: CetMachine) -> None:
    """#UD unless CR4.CET and SH_STK_EN of the current CPL's CET MSR (U_CET at CPL 3, S_CET below)."""
    if not shadow_stack_enabled(m, m.cpl):
        raise ud()


def _require_supervisor_shadow_stack_at_cpl0(m: CetMachine) -> None:
    """SETSSBSY/CLRSSBSY: #UD if CR4.CET = 0 or S_CET.SH_STK_EN = 0 (regardless of CPL), then
    #GP(0) if CPL > 0."""
    if not (m.cr4_cet and m.cet_msr(Msr.IA32_S_CET) & SH_STK_EN):
        raise ud()
    if m.cpl != 0:
        raise gp(0)


def rdssp(m: CetMachine, operand_size: int) -> int | None:
    """RDSSPD r32 / RDSSPQ r64: the new register value, or None (a NOP, register unchanged) when
    shadow stacks are off at the current CPL. RDSSPD returns SSP[31:0] (zero-extended into the
    64-bit register, like any 32-bit register write) [SDM RDSSP]."""
    _check_operand_size(operand_size)
    if not shadow_stack_enabled(m, m.cpl):
        return None
    return m.ssp & (0xFFFF_FFFF if operand_size == 4 else U64_MASK)


def incssp(m: CetMachine, reg_value: int, operand_size: int) -> None:
    """INCSSPD r32 / INCSSPQ r64: pop n = r[7:0] entries of ``operand_size`` bytes [SDM INCSSP].

    #UD if shadow stacks are off. Reads the first and the last entry being popped ([SSP] and
    [SSP + (max(n,1)-1)·w]; both reads happen even for n = 0) so that a pop beyond the stack's
    pages faults (#PF with SS); then SSP += n·w.
    """
    _check_operand_size(operand_size)
    _require_shadow_stack(m)
    count = reg_value & 0xFF
    user = is_user_shadow_stack(m.cpl)
    ssp = m.ssp
    m.ss_read(ssp, operand_size, user=user)
    m.ss_read((ssp + (max(count, 1) - 1) * operand_size) & U64_MASK, operand_size, user=user)
    m.ssp = (ssp + count * operand_size) & U64_MASK


def rstorssp(m: CetMachine, linear: int) -> FlagsResult:
    """RSTORSSP m64: switch to the shadow stack whose restore token is at ``linear`` [SDM RSTORSSP].

    #UD if shadow stacks are off; #GP(0) if ``linear`` is not 8-aligned; the token is loaded with
    a locked shadow-stack access; #CP(RSTORSSP) if token[1:0] ≠ (64-bit mode ? 1 : 0) (bit 1 set
    means it is a previous-SSP token), if outside 64-bit mode token[63:32] ≠ 0, or if
    ((token & ~1) - 8) & ~7 ≠ ``linear``. On success the token is replaced by the previous-SSP
    token (old SSP | mode | 2), SSP = ``linear``, CF = token bit 2 (an alignment hole exists),
    ZF/PF/AF/OF/SF cleared.
    """
    _require_shadow_stack(m)
    linear &= U64_MASK
    if linear & 7:
        raise gp(0)
    user = is_user_shadow_stack(m.cpl)
    mode = mode_bit(m)
    previous_ssp_token = (m.ssp & U64_MASK) | mode | 2
    token = m.ss_read(linear, 8, user=user)
    if not _restore_token_valid(token, linear, mode):
        raise cp(CpError.RSTORSSP)
    swapped, _old = m.ss_cmpxchg(linear, token, previous_ssp_token, user=user)
    if not swapped:
        raise cp(CpError.RSTORSSP)
    m.ssp = linear
    return FlagsResult(cf=bool(token & 4))


def _restore_token_valid(token: int, linear: int, mode: int) -> bool:
    """The restore-token checks of RSTORSSP (see :func:`rstorssp`)."""
    if token & 3 != mode:
        return False
    if not mode and token >> 32:
        return False
    return (((token & ~1) - 8) & ~7 & U64_MASK) == linear


def saveprevssp(m: CetMachine, cf: bool) -> None:
    """SAVEPREVSSP: pop the previous-SSP token and leave a restore token on the previous stack.

    [SDM SAVEPREVSSP] #UD if shadow stacks are off; #GP(0) if SSP is not 8-aligned. Pops the
    8-byte previous-SSP token at SSP. If CF (``cf``, the current RFLAGS.CF as RSTORSSP left it)
    is 1: #GP(0) in 64-bit mode, else pop a 4-byte alignment hole that must be 0 (#GP(0)).
    #GP(0) if the token's bit 1 is 0, or outside 64-bit mode if its bits 63:32 are not 0.
    Then with old = token & ~3: if old is 4 mod 8 a 4-byte 0 is stored at old-4 (the hole, as
    Bochs does), and the restore token old | mode is stored at (old & ~7) - 8, where RSTORSSP
    will look for it. SSP += 8 (+4 for the hole). Flags are not changed.
    """
    _require_shadow_stack(m)
    ssp = m.ssp & U64_MASK
    if ssp & 7:
        raise gp(0)
    user = is_user_shadow_stack(m.cpl)
    token = m.ss_read(ssp, 8, user=user)
    new_ssp = ssp + 8
    if cf:
        if m.long_mode:
            raise gp(0)
        if m.ss_read(new_ssp, 4, user=user) != 0:
            raise gp(0)
        new_ssp += 4
    if not token & 2:
        raise gp(0)
    if not m.long_mode and token >> 32:
        raise gp(0)
    old_ssp = token & ~3 & U64_MASK
    if old_ssp & 4:
        m.ss_write(old_ssp - 4, 0, 4, user=user)
    m.ss_write((old_ssp & ~7) - 8, old_ssp | mode_bit(m), 8, user=user)
    m.ssp = new_ssp & U64_MASK


def setssbsy(m: CetMachine) -> None:
    """SETSSBSY: mark the supervisor token at IA32_PL0_SSP busy and load SSP from it [SDM SETSSBSY].

    #UD if CR4.CET = 0 or S_CET.SH_STK_EN = 0; #GP(0) if CPL > 0; #GP(0) if PL0_SSP is not
    8-aligned; locked cmpxchg of the token from PL0_SSP (free) to PL0_SSP | 1, failure (busy or
    not naming its own address) → #CP(SETSSBSY); SSP = PL0_SSP.
    """
    _require_supervisor_shadow_stack_at_cpl0(m)
    ssp_la = m.cet_msr(Msr.IA32_PL0_SSP) & U64_MASK
    if ssp_la & 7:
        raise gp(0)
    swapped, _old = m.ss_cmpxchg(ssp_la, ssp_la, ssp_la | 1, user=False)
    if not swapped:
        raise cp(CpError.SETSSBSY)
    m.ssp = ssp_la


def clrssbsy(m: CetMachine, linear: int) -> FlagsResult:
    """CLRSSBSY m64: clear the busy bit of the supervisor token at ``linear``; SSP = 0.

    [SDM CLRSSBSY] #UD if CR4.CET = 0 or S_CET.SH_STK_EN = 0; #GP(0) if CPL > 0 or ``linear``
    not 8-aligned. Locked cmpxchg from ``linear | 1`` to ``linear``; CF = 1 if the token was
    invalid (not busy, or not naming ``linear``), else CF = 0 — the SDM's rule; Bochs 2.7 has it
    inverted. ZF/PF/AF/OF/SF cleared; SSP = 0 either way.
    """
    _require_supervisor_shadow_stack_at_cpl0(m)
    linear &= U64_MASK
    if linear & 7:
        raise gp(0)
    swapped, _old = m.ss_cmpxchg(linear, linear | 1, linear, user=False)
    m.ssp = 0
    return FlagsResult(cf=not swapped)


def wrss(m: CetMachine, linear: int, value: int, operand_size: int) -> None:
    """WRSSD/WRSSQ: store to the current CPL's shadow stack [SDM WRSS].

    #UD unless CR4.CET, SH_STK_EN and WR_SHSTK_EN for the current CPL; #GP(0) if ``linear`` is not
    aligned to ``operand_size``; a shadow-stack store (a user access at CPL 3, supervisor
    otherwise — so WRSS at CPL 0 to a user shadow-stack page → #PF with SS).
    """
    _check_operand_size(operand_size)
    if not wrss_enabled(m, m.cpl):
        raise ud()
    linear &= U64_MASK
    if linear & (operand_size - 1):
        raise gp(0)
    m.ss_write(linear, value & ((1 << (8 * operand_size)) - 1), operand_size, user=is_user_shadow_stack(m.cpl))


def wruss(m: CetMachine, linear: int, value: int, operand_size: int) -> None:
    """WRUSSD/WRUSSQ: kernel store to a user shadow stack [SDM WRUSS].

    #UD if CR4.CET = 0 (no SH_STK_EN needed); #GP(0) if CPL ≠ 0; #GP(0) if ``linear`` is not
    aligned to ``operand_size``; a user shadow-stack store (the page must be a user shadow-stack
    page, else #PF with SS and U).
    """
    _check_operand_size(operand_size)
    if not m.cr4_cet:
        raise ud()
    if m.cpl != 0:
        raise gp(0)
    linear &= U64_MASK
    if linear & (operand_size - 1):
        raise gp(0)
    m.ss_write(linear, value & ((1 << (8 * operand_size)) - 1), operand_size, user=True)


def endbr64(m: CetMachine) -> None:
    """ENDBR64: in 64-bit mode with IBT on at the CPL, tracker → IDLE, SUPPRESS → 0; else NOP."""
    endbr_executed(m, endbr64=True)


def endbr32(m: CetMachine) -> None:
    """ENDBR32: outside 64-bit mode with IBT on at the CPL, tracker → IDLE, SUPPRESS → 0; else NOP."""
    endbr_executed(m, endbr64=False)
