"""Acceptance: real guest code (guests/cpu/*.S) under CET on the Vcpu (harness.py)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import L, PAGE, Machine, Options  # noqa: E402

from cetvm.arch import CetCtl, CpError, PfErr, Vector, supervisor_token  # noqa: E402
from cetvm.cpu.exits import ExitReason  # noqa: E402

pytestmark = pytest.mark.guest

SHSTK_IBT = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)


def event_log(m: Machine) -> list[tuple[int, int]]:
    raw = m.vcpu.read_phys(L["RESULTS_ADDR"], 0x500)
    count = m.results.count
    return [(struct.unpack_from("<Q", raw, L["R_LOG_VEC"] + 8 * i)[0],
             struct.unpack_from("<Q", raw, L["R_LOG_SSP"] + 8 * i)[0]) for i in range(count)]


# ----------------------------------------------------------------------------- near CALL/RET
def test_nested_direct_and_indirect_calls_run_without_faults():
    m = Machine("shstk_ret")
    exit_ = m.run_case("case_calls")
    assert exit_.reason == ExitReason.HLT and exit_.rip == m.sym("after_calls")
    assert m.results.count == 0
    assert m.results.guest[0] == 0x1234
    assert m.vcpu.ssp == L["SSTK_KERNEL"] + PAGE  # balanced


def test_corrupted_return_address_raises_cp_near_ret_at_the_ret():
    m = Machine("shstk_ret")
    m.run_case("case_corrupt_ret")
    r = m.results
    assert (r.count, r.vector, r.error) == (1, Vector.CP, CpError.NEAR_RET)
    assert r.rip == m.sym("bad_ret")
    # RSP unchanged by the faulting RET: it still points at the overwritten return address
    assert r.rsp == L["KSTACK_TOP"] - 8  # one CALL deep
    assert m.read_u64(r.rsp) == m.sym("attacker")
    assert r.guest[1] == 0, "the attacker's code must never run"


# ----------------------------------------------------------------------------- IBT
def test_indirect_call_and_jmp_to_endbr_targets_are_allowed():
    m = Machine("ibt")
    m.run_case("case_good")
    assert m.results.count == 0 and m.results.guest[0] == 1


@pytest.mark.parametrize("case", ["case_jmp_bad", "case_call_bad"])
def test_indirect_branch_to_non_endbr_target_raises_cp_endbranch_at_the_target(case):
    m = Machine("ibt")
    m.run_case(case)
    r = m.results
    assert (r.count, r.vector, r.error) == (1, Vector.CP, CpError.ENDBRANCH)
    assert r.rip == m.sym("no_endbr_target")
    assert r.guest[1] == 0


def test_notrack_jmp_needs_no_track_en():
    m = Machine("ibt")
    m.run_case("case_notrack_jmp")
    assert (m.results.vector, m.results.error, m.results.rip) == (Vector.CP, CpError.ENDBRANCH, m.sym("notrack_landed"))
    m = Machine("ibt", Options(s_cet=SHSTK_IBT | CetCtl.NO_TRACK_EN))
    m.run_case("case_notrack_jmp")
    assert m.results.count == 0 and m.results.guest[0] == 2


def test_ibt_off_allows_any_target():
    m = Machine("ibt", Options(s_cet=int(CetCtl.SH_STK_EN)))
    m.run_case("case_jmp_bad")
    assert m.results.count == 0 and m.results.guest[1] == 0xBAD


# ----------------------------------------------------------------------------- CET instructions
def test_rstorssp_with_a_bad_token_raises_cp_rstorssp():
    m = Machine("cet_insn")
    m.run_case("case_rstorssp_bad")
    assert (m.results.vector, m.results.error) == (Vector.CP, CpError.RSTORSSP)


def test_setssbsy_on_a_busy_token_raises_cp_setssbsy():
    m = Machine("cet_insn")
    token_at = L["SSTK_KERNEL2"] + PAGE - 8
    m.write_u64(token_at, supervisor_token(token_at, busy=True))
    m.run_case("case_setssbsy_busy")
    assert (m.results.vector, m.results.error) == (Vector.CP, CpError.SETSSBSY)


def test_setssbsy_on_a_free_token_loads_pl0_ssp_and_marks_it_busy():
    m = Machine("cet_insn")
    token_at = L["SSTK_KERNEL2"] + PAGE - 8
    m.run_case("case_setssbsy_busy")
    assert m.results.count == 0 and m.results.guest[0] == token_at
    assert m.read_u64(token_at) == token_at | 1


def test_wrss_without_wr_shstk_en_is_ud_and_with_it_writes_the_shadow_stack():
    m = Machine("cet_insn")
    m.run_case("case_wrss")
    assert (m.results.count, m.results.vector) == (1, Vector.UD)
    m = Machine("cet_insn", Options(s_cet=SHSTK_IBT | CetCtl.WR_SHSTK_EN))
    m.run_case("case_wrss")
    assert m.results.count == 0
    assert m.read_u64(L["SSTK_KERNEL"] + 0x800) == 0x1122334455667788


def test_wrmsr_of_a_misaligned_pl0_ssp_is_gp():
    m = Machine("cet_insn")
    m.run_case("case_wrmsr_misaligned")
    assert (m.results.vector, m.results.error) == (Vector.GP, 0)
    assert m.vcpu.cet.pl_ssp[0] == L["SSTK_KERNEL2"] + PAGE - 8


def test_setting_cr4_cet_with_cr0_wp_clear_is_gp():
    m = Machine("cet_insn")
    m.run_case("case_cr4_cet_wp0")
    assert (m.results.vector, m.results.error, m.results.rip) == (Vector.GP, 0, m.sym("cr4_write"))
    assert not m.vcpu.cr4_cet


def test_rdssp_and_incssp():
    m = Machine("cet_insn")
    m.run_case("case_rdssp_incssp")
    top = L["SSTK_KERNEL"] + PAGE
    assert m.results.count == 0
    assert m.results.guest[:3] == [top - 8, top, top]


def test_stack_pivot_and_back_with_rstorssp_and_saveprevssp():
    m = Machine("cet_insn")
    new_top = L["SSTK_SPARE"] + PAGE
    m.write_u64(new_top - 8, new_top | 1)  # restore token (64-bit mode), as a thread library creates it
    m.run_case("case_pivot")
    old_top = L["SSTK_KERNEL"] + PAGE
    assert m.results.count == 0
    assert m.results.guest[:4] == [old_top, new_top, old_top, 2]
    # the new stack now holds a restore token for a later switch back to it
    assert m.read_u64(new_top - 8) == new_top | 1


# ----------------------------------------------------------------------------- paging
def test_shadow_stack_push_to_a_normal_page_is_pf_with_ss_bit():
    m = Machine("paging_ss", Options(ist_vectors={Vector.PF: 1}))  # deliver on a valid shadow stack
    m.vcpu.ssp = L["NORMAL_PAGE"] + PAGE
    m.run_case("case_call_on_normal_page")
    r = m.results
    assert (r.vector, r.error) == (Vector.PF, PfErr.P | PfErr.W | PfErr.SS)
    assert r.rip == m.sym("call_site") and r.rsp == L["KSTACK_TOP"]
    assert m.vcpu.get_sregs().cr2 == L["NORMAL_PAGE"] + PAGE - 8


def test_ordinary_write_to_a_shadow_stack_page_is_pf_without_ss_bit():
    m = Machine("paging_ss")
    m.run_case("case_write_ss_page")
    r = m.results
    assert (r.vector, r.error, r.rip) == (Vector.PF, PfErr.P | PfErr.W, m.sym("write_site"))
    assert m.vcpu.get_sregs().cr2 == L["SSTK_KERNEL"] + 0x100


def test_ordinary_read_of_a_shadow_stack_page_is_allowed():
    m = Machine("paging_ss")
    m.write_u64(L["SSTK_KERNEL"] + 0xFF8, 0xFEED)
    m.run_case("case_read_ss_page")
    assert m.results.count == 0 and m.results.guest[0] == 0xFEED


# ----------------------------------------------------------------------------- privilege changes
def test_ring3_events_switch_to_pl0_ssp_and_the_ist_shadow_stack_and_iretq_back():
    m = Machine("ring3", Options(u_cet=int(CetCtl.SH_STK_EN), ist_vectors={0x80: 1}, iret_vectors=(3, 0x80)))
    m.run_case("case_user_events")
    pl0_token = L["SSTK_KERNEL2"] + PAGE - 8
    ist_token = L["SSTK_IST"] + PAGE - 8
    user_top = L["SSTK_USER"] + PAGE
    assert event_log(m) == [(Vector.BP, pl0_token), (0x80, ist_token), (Vector.GP, pl0_token)]
    assert m.results.rip == m.sym("user_hlt") and m.results.cs == L["USER_CS"]
    assert m.results.guest[:3] == [user_top] * 3  # user SSP restored by each IRETQ
    assert m.read_u64(ist_token) == ist_token          # freed by IRETQ
    assert m.read_u64(pl0_token) == pl0_token | 1      # busy: the #GP handler never returned
    assert m.vcpu.cet.pl_ssp[3] == user_top            # saved on the last ring 3 → 0 event


def test_syscall_and_sysret_save_and_restore_the_user_ssp_through_pl3_ssp():
    m = Machine("ring3", Options(u_cet=int(CetCtl.SH_STK_EN)))
    m.run_case("case_syscall")
    user_top = L["SSTK_USER"] + PAGE
    pl0_token = L["SSTK_KERNEL2"] + PAGE - 8
    assert m.results.guest[:4] == [user_top, 0, pl0_token, user_top]
    # CLRSSBSY freed the token: the final HLT at CPL 3 (#GP) could take it again
    assert event_log(m) == [(Vector.GP, pl0_token)] and m.results.cs == L["USER_CS"]


def test_far_call_and_far_ret_round_trip():
    m = Machine("farret")
    m.run_case("case_far_roundtrip")
    assert m.results.count == 0 and m.results.guest[:2] == [1, 1]
    assert m.vcpu.ssp == L["SSTK_KERNEL"] + PAGE


def test_far_ret_to_another_address_than_the_shadow_stack_frame_is_cp_far_ret():
    m = Machine("farret")
    m.run_case("case_far_ret_mismatch")
    assert (m.results.vector, m.results.error, m.results.rip) == (Vector.CP, CpError.FAR_RET_IRET, m.sym("far_bad_ret"))


# ----------------------------------------------------------------------------- modes
def test_guest_switches_from_32_bit_protected_mode_to_long_mode():
    m = Machine("longmode", Options(start32=True, cr4_cet=False, s_cet=0))
    assert not m.vcpu.long_mode
    exit_ = m.run()
    assert exit_.reason == ExitReason.HLT
    assert m.vcpu.long_mode
    assert m.results.guest[0] == 0x64
    assert m.results.guest[1] & 0x500 == 0x500  # EFER.LME | LMA read back in 64-bit mode


# ----------------------------------------------------------------------------- XSAVES
def test_xsaves_and_xrstors_round_trip_the_cet_state():
    m = Machine("xsaves")
    m.run_case("case_roundtrip")
    assert m.results.count == 0
    assert m.results.guest[:2] == [0x7F_0765_4320, 0x1234568]  # PL3_SSP, PL1_SSP as saved


def test_xrstors_of_a_bad_cet_value_is_gp_and_loads_nothing():
    from cetvm.xstate import XsaveLayout

    m = Machine("xsaves")
    layout = XsaveLayout.from_cpuid(m.vcpu.model)
    pl3_ssp_offset = layout.compacted_offset(11, 0x1803) + 8  # CET_U: +8 is PL3_SSP
    m.write_u64(L["RESULTS_ADDR"] + L["R_GUEST"] + 24, pl3_ssp_offset)
    m.run_case("case_bad_value")
    r = m.results
    assert r.guest[:2] == [0x1803, (1 << 63) | 0x1803]  # XSTATE_BV, XCOMP_BV written by XSAVES
    assert (r.vector, r.error, r.rip) == (Vector.GP, 0, m.sym("bad_xrstors"))
    assert m.vcpu.cet.pl_ssp[3] == 0x7F_0765_4320


def test_ret_mismatch_to_a_not_present_target_is_cp_not_pf():
    """The RET's target faults on fetch before its block starts: the pending RET is applied in
    the exception path and its #CP(1) wins over the fetch #PF."""
    m = Machine("shstk_ret")
    m.run_case("case_ret_to_unmapped")
    r = m.results
    assert (r.count, r.vector, r.error, r.rip) == (1, Vector.CP, CpError.NEAR_RET, m.sym("bad_ret2"))
    assert r.rsp == L["KSTACK_TOP"] - 8


def test_untraced_vcpu_emulates_syscall_into_ring_0():
    """Untraced mode (no block hook): SYSCALL is a NOP in Unicorn, so cetvm stops after it and
    emulates it; the kernel entry then hits SETSSBSY with CR4.CET=0 → #UD at CPL 0."""
    m = Machine("ring3", Options(trace=False, cr4_cet=False, s_cet=0))
    m.run_case("case_syscall")
    r = m.results
    assert (r.vector, r.cs) == (Vector.UD, L["KERNEL_CS"])
    assert m.sym("syscall_entry") < r.rip < m.sym("syscall_entry") + 32


@pytest.mark.parametrize("options", [Options(), Options(cr4_cet=False, s_cet=0),
                                     Options(trace=False, cr4_cet=False, s_cet=0)],
                         ids=["cet", "traced-no-cet", "untraced"])
def test_ring3_store_to_a_supervisor_page_is_pf_with_p_w_u(options):
    m = Machine("ring3", options)
    m.run_case("case_user_store_supervisor")
    r = m.results
    assert (r.vector, r.error, r.rip, r.cs) == (Vector.PF, PfErr.P | PfErr.W | PfErr.U, m.sym("user_store_site"), L["USER_CS"])
    assert m.read_u64(L["SUPERVISOR_PAGE"]) == 5  # the CPL 0 store happened, the CPL 3 one did not
    assert m.vcpu.get_sregs().cr2 == L["SUPERVISOR_PAGE"]


def test_iretq_to_a_code_descriptor_whose_dpl_differs_from_the_rpl_is_gp():
    m = Machine("ring3")
    m.run_case("case_iret_bad_cs")
    r = m.results
    assert (r.vector, r.error, r.rip, r.cs) == (Vector.GP, L["KERNEL_CS"], m.sym("bad_iret"), L["KERNEL_CS"])
    assert m.vcpu.cpl == 0


def test_fault_during_delivery_becomes_double_fault_on_its_ist_stack():
    """#PF(SS) from a CALL, whose same-privilege delivery pushes the CET frame onto the same bad
    shadow stack → #PF again → #DF, delivered on IST1 with the interrupt SSP table."""
    m = Machine("paging_ss", Options(ist_vectors={Vector.DF: 1}))
    m.vcpu.ssp = L["NORMAL_PAGE"] + PAGE
    m.run_case("case_call_on_normal_page")
    r = m.results
    assert (r.count, r.vector, r.error) == (1, Vector.DF, 0)
    assert r.rip == m.sym("call_site")
    ist_token = L["SSTK_IST"] + PAGE - 8
    assert r.ssp == ist_token - 24  # token taken, then the same-privilege frame
    assert m.read_u64(ist_token) == ist_token | 1


def test_fault_during_double_fault_delivery_is_a_triple_fault():
    m = Machine("paging_ss")
    m.vcpu.ssp = L["NORMAL_PAGE"] + PAGE
    assert m.run_case("case_call_on_normal_page").reason == ExitReason.TRIPLE_FAULT
