"""The CET instructions, every row and fault of SDM Vol. 1 ch. 18's table."""

import pytest

from cetvm.arch import CetCtl, CpError, Msr, PfErr, Vector, supervisor_token
from cetvm.cpu.cet.instructions import (
    FlagsResult,
    clrssbsy,
    endbr32,
    endbr64,
    incssp,
    rdssp,
    rstorssp,
    saveprevssp,
    setssbsy,
    wrss,
    wruss,
)
from cetvm.cpu.faults import GuestFault
from fake_machine import PAGE, FakeMachine, machine_with_shadow_stacks

KSS = 0x10000
USS = 0x7000_0000


def fault_of(fn, *args):
    with pytest.raises(GuestFault) as exc:
        fn(*args)
    return exc.value.vector, exc.value.error_code


UD = (Vector.UD, None)
GP0 = (Vector.GP, 0)


# --- RDSSP --------------------------------------------------------------------------------


def test_rdssp_returns_ssp_when_on():
    m = machine_with_shadow_stacks(cpl=3)
    assert rdssp(m, 8) == USS + 2 * PAGE


def test_rdsspd_returns_low_32_bits():
    m = machine_with_shadow_stacks(cpl=3)
    m.ssp = 0x7F12_3456_7000
    assert rdssp(m, 4) == 0x3456_7000


def test_rdssp_is_nop_when_off():
    m = machine_with_shadow_stacks(cpl=3)
    m.msrs[Msr.IA32_U_CET] = 0
    assert rdssp(m, 8) is None
    m = machine_with_shadow_stacks()
    m.cr4_cet = False
    assert rdssp(m, 8) is None


# --- INCSSP -------------------------------------------------------------------------------


def test_incsspq_pops_n_entries():
    m = machine_with_shadow_stacks(cpl=3)
    m.ssp = USS + PAGE
    incssp(m, 0x103, 8)  # only bits 7:0 count
    assert m.ssp == USS + PAGE + 24


def test_incsspd_uses_4_byte_entries():
    m = machine_with_shadow_stacks(cpl=3)
    m.ssp = USS + PAGE
    incssp(m, 3, 4)
    assert m.ssp == USS + PAGE + 12


def test_incssp_zero_still_reads_ssp():
    m = machine_with_shadow_stacks(cpl=3)
    m.ssp = USS + 2 * PAGE  # just above the stack: reading [SSP] faults
    vec, err = fault_of(incssp, m, 0, 8)
    assert vec == Vector.PF and err & PfErr.SS and not err & PfErr.W
    assert m.ssp == USS + 2 * PAGE


def test_incssp_past_the_stack_end_faults_without_moving_ssp():
    m = machine_with_shadow_stacks(cpl=3)
    m.ssp = USS + 2 * PAGE - 16
    vec, _ = fault_of(incssp, m, 3, 8)  # last entry read at top+8
    assert vec == Vector.PF
    assert m.ssp == USS + 2 * PAGE - 16


def test_incssp_ud_when_off():
    m = machine_with_shadow_stacks(cpl=3)
    m.msrs[Msr.IA32_U_CET] = 0
    assert fault_of(incssp, m, 1, 8) == UD


# --- RSTORSSP / SAVEPREVSSP ---------------------------------------------------------------

A_SS = USS  # thread A's shadow stack (pages 0-1)
B_SS = 0x7100_0000  # thread B's shadow stack, created with a restore token at its top


def two_thread_machine():
    m = machine_with_shadow_stacks(cpl=3)
    m.map_shadow_stack(B_SS, user=True)
    b_top = B_SS + PAGE
    m.poke(b_top - 8, b_top | 1)  # what map_shadow_stack(SHADOW_STACK_SET_TOKEN) writes
    m.ssp = A_SS + PAGE - 0x100
    return m, b_top


def test_stack_pivot_and_back_with_rstorssp_saveprevssp():
    m, b_top = two_thread_machine()
    a_ssp = m.ssp
    # switch A -> B
    assert rstorssp(m, b_top - 8) == FlagsResult(cf=False)
    assert m.ssp == b_top - 8
    assert m.peek(b_top - 8) == a_ssp | 2 | 1  # previous-SSP token
    saveprevssp(m, cf=False)
    assert m.ssp == b_top
    assert m.peek(a_ssp - 8) == a_ssp | 1  # restore token left on A
    # switch B -> A
    rstorssp(m, a_ssp - 8)
    saveprevssp(m, cf=False)
    assert m.ssp == a_ssp
    assert m.peek(b_top - 8) == b_top | 1  # B can be resumed again
    rstorssp(m, b_top - 8)
    assert m.ssp == b_top - 8


def test_rstorssp_token_for_another_address_is_cp4_and_nothing_changes():
    m, b_top = two_thread_machine()
    m.poke(b_top - 8, (b_top + 8) | 1)
    ssp = m.ssp
    assert fault_of(rstorssp, m, b_top - 8) == (Vector.CP, CpError.RSTORSSP)
    assert m.ssp == ssp and m.peek(b_top - 8) == (b_top + 8) | 1


def test_rstorssp_mode_bit_mismatch_is_cp4():
    m, b_top = two_thread_machine()
    m.poke(b_top - 8, b_top)  # 32-bit token in 64-bit mode
    assert fault_of(rstorssp, m, b_top - 8) == (Vector.CP, CpError.RSTORSSP)


def test_rstorssp_refuses_previous_ssp_token():
    m, b_top = two_thread_machine()
    m.poke(b_top - 8, b_top | 3)
    assert fault_of(rstorssp, m, b_top - 8) == (Vector.CP, CpError.RSTORSSP)


def test_rstorssp_32bit_mode_token_and_high_bits():
    m = machine_with_shadow_stacks(cpl=3, long_mode=False)
    top = USS + PAGE
    m.poke(top - 8, top)  # mode bit 0 in 32-bit mode: valid
    assert rstorssp(m, top - 8).cf is False
    m.ssp = USS + 0x800
    m.poke(top - 16, (1 << 32) | (top - 8))
    assert fault_of(rstorssp, m, top - 16) == (Vector.CP, CpError.RSTORSSP)


def test_rstorssp_cf_reports_alignment_hole():
    m = machine_with_shadow_stacks(cpl=3, long_mode=False)
    top = USS + PAGE - 4  # an SSP that was 4 mod 8
    m.poke(top - 12, top)  # ((top - 8) & ~7) == top - 12
    assert rstorssp(m, top - 12) == FlagsResult(cf=True, clear_others=True)


def test_rstorssp_misaligned_operand_is_gp0_and_off_is_ud():
    m, b_top = two_thread_machine()
    assert fault_of(rstorssp, m, b_top - 4) == GP0
    m.msrs[Msr.IA32_U_CET] = 0
    assert fault_of(rstorssp, m, b_top - 8) == UD


def test_saveprevssp_faults():
    m, b_top = two_thread_machine()
    rstorssp(m, b_top - 8)
    assert fault_of(saveprevssp, m, True) == GP0  # CF=1 in 64-bit mode
    m.ssp = b_top - 4
    assert fault_of(saveprevssp, m, False) == GP0  # SSP not 8-aligned
    m.ssp = b_top - 8
    m.poke(b_top - 8, m.peek(b_top - 8) & ~2)  # not a previous-SSP token
    assert fault_of(saveprevssp, m, False) == GP0
    m.msrs[Msr.IA32_U_CET] = 0
    assert fault_of(saveprevssp, m, False) == UD


def test_saveprevssp_pops_zero_alignment_hole_in_32bit_mode():
    m = machine_with_shadow_stacks(cpl=3, long_mode=False)
    old = USS + 0x804  # previous stack's SSP, 4 mod 8
    m.ssp = USS + PAGE - 16
    m.poke(m.ssp, old | 2)
    m.poke(m.ssp + 8, 0, 4)
    saveprevssp(m, cf=True)
    assert m.ssp == USS + PAGE - 4
    assert m.peek(old - 12) == old  # restore token at (old & ~7) - 8, mode bit 0
    m.ssp = USS + PAGE - 16
    m.poke(m.ssp + 8, 5, 4)
    assert fault_of(saveprevssp, m, True) == GP0


# --- SETSSBSY / CLRSSBSY ------------------------------------------------------------------

TOKEN = KSS + PAGE - 8


def setssbsy_machine():
    m = machine_with_shadow_stacks()
    m.msrs[Msr.IA32_PL0_SSP] = TOKEN
    m.poke(TOKEN, supervisor_token(TOKEN))
    m.ssp = 0
    return m


def test_setssbsy_marks_token_busy_and_loads_ssp():
    m = setssbsy_machine()
    setssbsy(m)
    assert m.ssp == TOKEN and m.peek(TOKEN) == TOKEN | 1


def test_setssbsy_on_busy_token_is_cp5():
    m = setssbsy_machine()
    setssbsy(m)
    m.ssp = 0
    assert fault_of(setssbsy, m) == (Vector.CP, CpError.SETSSBSY)
    assert m.ssp == 0


def test_setssbsy_checks_in_order():
    m = setssbsy_machine()
    m.cpl = 3
    assert fault_of(setssbsy, m) == GP0
    m.msrs[Msr.IA32_S_CET] = 0
    assert fault_of(setssbsy, m) == UD  # #UD before the CPL check
    m = setssbsy_machine()
    m.msrs[Msr.IA32_PL0_SSP] = TOKEN + 4
    assert fault_of(setssbsy, m) == GP0
    m = setssbsy_machine()
    m.cr4_cet = False
    assert fault_of(setssbsy, m) == UD


def test_clrssbsy_clears_busy_token_cf0_and_zeroes_ssp():
    m = setssbsy_machine()
    setssbsy(m)
    assert clrssbsy(m, TOKEN) == FlagsResult(cf=False, clear_others=True)
    assert m.ssp == 0 and m.peek(TOKEN) == TOKEN


def test_clrssbsy_invalid_token_sets_cf():
    m = setssbsy_machine()  # token is free: invalid for CLRSSBSY
    m.ssp = TOKEN
    assert clrssbsy(m, TOKEN).cf is True
    assert m.ssp == 0 and m.peek(TOKEN) == TOKEN


def test_clrssbsy_faults():
    m = setssbsy_machine()
    assert fault_of(clrssbsy, m, TOKEN + 4) == GP0
    m.cpl = 1
    assert fault_of(clrssbsy, m, TOKEN) == GP0
    m.msrs[Msr.IA32_S_CET] = 0
    assert fault_of(clrssbsy, m, TOKEN) == UD


# --- WRSS / WRUSS -------------------------------------------------------------------------


def wrss_machine(cpl=3):
    m = machine_with_shadow_stacks(cpl=cpl)
    msr = Msr.IA32_U_CET if cpl == 3 else Msr.IA32_S_CET
    m.msrs[msr] |= CetCtl.WR_SHSTK_EN
    return m


def test_wrss_writes_own_shadow_stack():
    m = wrss_machine()
    wrss(m, USS + 0x100, 0x1122_3344_5566_7788, 8)
    wrss(m, USS + 0x10C, 0xAABBCCDD, 4)
    assert m.peek(USS + 0x100) == 0x1122_3344_5566_7788
    assert m.peek(USS + 0x10C, 4) == 0xAABBCCDD


def test_wrss_without_wr_shstk_en_is_ud():
    m = machine_with_shadow_stacks(cpl=3)
    assert fault_of(wrss, m, USS + 0x100, 1, 8) == UD


def test_wrss_misaligned_is_gp0():
    m = wrss_machine()
    assert fault_of(wrss, m, USS + 0x104, 1, 8) == GP0
    assert fault_of(wrss, m, USS + 0x102, 1, 4) == GP0


def test_wrss_to_ordinary_page_is_pf_ss():
    m = wrss_machine()
    m.map_data(0x5000_0000, user=True)
    vec, err = fault_of(wrss, m, 0x5000_0000, 1, 8)
    assert vec == Vector.PF and err == PfErr.SS | PfErr.W | PfErr.U | PfErr.P


def test_wrss_at_cpl0_cannot_write_user_shadow_stack():
    m = wrss_machine(cpl=0)
    vec, err = fault_of(wrss, m, USS, 1, 8)
    assert vec == Vector.PF and err & PfErr.SS and not err & PfErr.U


def test_wruss_writes_user_shadow_stack_from_kernel():
    m = machine_with_shadow_stacks(cpl=0)
    m.msrs[Msr.IA32_S_CET] = 0  # WRUSS needs only CR4.CET
    wruss(m, USS + 0x200, 0xCAFE, 8)
    assert m.peek(USS + 0x200) == 0xCAFE


def test_wruss_faults():
    m = machine_with_shadow_stacks(cpl=3)
    assert fault_of(wruss, m, USS, 1, 8) == GP0  # CPL 3
    m.cpl = 0
    assert fault_of(wruss, m, USS + 4, 1, 8) == GP0  # misaligned
    vec, err = fault_of(wruss, m, KSS, 1, 8)  # supervisor shadow-stack page
    assert vec == Vector.PF and err & PfErr.SS and err & PfErr.U
    m.cr4_cet = False
    assert fault_of(wruss, m, USS, 1, 8) == UD


# --- ENDBR --------------------------------------------------------------------------------


def test_endbr64_and_endbr32_reset_tracker_in_their_mode():
    m = FakeMachine(cpl=0)
    m.msrs[Msr.IA32_S_CET] = int(CetCtl.ENDBR_EN | CetCtl.TRACKER)
    endbr32(m)
    assert m.msrs[Msr.IA32_S_CET] & CetCtl.TRACKER
    endbr64(m)
    assert not m.msrs[Msr.IA32_S_CET] & CetCtl.TRACKER
    m32 = FakeMachine(cpl=0, long_mode=False)
    m32.msrs[Msr.IA32_S_CET] = int(CetCtl.ENDBR_EN | CetCtl.TRACKER)
    endbr32(m32)
    assert not m32.msrs[Msr.IA32_S_CET] & CetCtl.TRACKER
