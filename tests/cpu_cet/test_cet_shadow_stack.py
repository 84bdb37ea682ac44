"""Near CALL/RET, far-transfer frames and supervisor tokens (SDM Vol. 1 ch. 18; where Bochs 2.7 deviates the SDM wins)."""

import pytest

from cetvm.arch import CpError, Msr, PfErr, Vector, supervisor_token
from cetvm.cpu.cet.shadow_stack import (
    call_pushes_shadow_stack,
    pop_transfer_frame,
    push_transfer_frame,
    shstk_enter_supervisor,
    shstk_free_token,
    shstk_pop_near_and_check,
    shstk_push_near,
    token_and_frame_share_region,
)
from cetvm.cpu.faults import GuestFault
from fake_machine import PAGE, machine_with_shadow_stacks

KSS = 0x10000  # supervisor shadow stack (2 pages) in machine_with_shadow_stacks
USS = 0x7000_0000


def test_call_rel_zero_pushes_nothing_other_calls_push():
    assert call_pushes_shadow_stack(displacement_zero=False)
    assert not call_pushes_shadow_stack(displacement_zero=True)


def test_near_call_then_ret_round_trip_at_cpl3():
    m = machine_with_shadow_stacks(cpl=3)
    top = m.ssp
    shstk_push_near(m, 0x401234)
    assert m.ssp == top - 8
    assert m.peek(top - 8) == 0x401234
    shstk_pop_near_and_check(m, 0x401234)
    assert m.ssp == top


def test_nested_calls_pop_in_lifo_order():
    m = machine_with_shadow_stacks()
    for ret in (0x1000, 0x2000, 0x3000):
        shstk_push_near(m, ret)
    for ret in (0x3000, 0x2000, 0x1000):
        shstk_pop_near_and_check(m, ret)
    assert m.ssp == KSS + 2 * PAGE


def test_ret_mismatch_is_cp1_and_leaves_ssp_unchanged():
    m = machine_with_shadow_stacks(cpl=3)
    shstk_push_near(m, 0x401234)
    ssp = m.ssp
    with pytest.raises(GuestFault) as exc:
        shstk_pop_near_and_check(m, 0xDEADBEEF)
    assert (exc.value.vector, exc.value.error_code) == (Vector.CP, CpError.NEAR_RET)
    assert m.ssp == ssp
    assert m.peek(ssp) == 0x401234  # the entry is still there for the handler to inspect


def test_32bit_mode_uses_4_byte_entries():
    m = machine_with_shadow_stacks(long_mode=False)
    top = m.ssp
    shstk_push_near(m, 0x8048123)
    assert m.ssp == top - 4
    assert m.peek(top - 4, 4) == 0x8048123
    shstk_pop_near_and_check(m, 0x8048123)
    assert m.ssp == top


def test_nothing_happens_when_shadow_stacks_are_off_at_cpl():
    m = machine_with_shadow_stacks(cpl=3)
    m.msrs[Msr.IA32_U_CET] = 0
    top = m.ssp
    shstk_push_near(m, 0x1234)
    shstk_pop_near_and_check(m, 0x9999)
    assert m.ssp == top and m.peek(top - 8) == 0


def test_push_to_ordinary_page_is_pf_with_ss_bit_and_ssp_unchanged():
    m = machine_with_shadow_stacks(cpl=3)
    m.map_data(0x5000_0000, user=True)
    m.ssp = 0x5000_1000
    with pytest.raises(GuestFault) as exc:
        shstk_push_near(m, 0x401000)
    f = exc.value
    assert f.vector == Vector.PF and f.cr2 == 0x5000_0FF8
    assert f.error_code == PfErr.SS | PfErr.W | PfErr.U | PfErr.P
    assert m.ssp == 0x5000_1000


def test_user_code_cannot_use_supervisor_shadow_stack_page():
    m = machine_with_shadow_stacks(cpl=3)
    m.ssp = KSS + PAGE
    with pytest.raises(GuestFault) as exc:
        shstk_push_near(m, 0x1)
    assert exc.value.vector == Vector.PF and exc.value.error_code & PfErr.SS


def test_unmapped_shadow_stack_pf_without_p_bit():
    m = machine_with_shadow_stacks()
    m.ssp = 0x9000_0000
    with pytest.raises(GuestFault) as exc:
        shstk_pop_near_and_check(m, 0)
    assert exc.value.error_code == PfErr.SS  # supervisor read, page not present


# --- far-transfer frame -------------------------------------------------------------------


def test_frame_layout_prev_lip_cs():
    m = machine_with_shadow_stacks()
    top = KSS + PAGE
    new = push_transfer_frame(m, top, 0x10, 0xFFFF_8000_0000_1234, 0xABC0, user=False)
    assert new == top - 24
    assert [m.peek(new), m.peek(new + 8), m.peek(new + 16)] == [0xABC0, 0xFFFF_8000_0000_1234, 0x10]


def test_frame_push_from_4_mod_8_ssp_pads_with_zero():
    m = machine_with_shadow_stacks()
    top = KSS + PAGE - 4
    m.poke(top - 4, 0xFFFF_FFFF, 4)
    new = push_transfer_frame(m, top, 0x23, 0x1000, top, user=False)
    assert new == KSS + PAGE - 8 - 24
    assert m.peek(top - 4, 4) == 0
    assert m.peek(new) == top


def test_frame_pop_round_trip():
    m = machine_with_shadow_stacks()
    sp = push_transfer_frame(m, KSS + PAGE, 0x10, 0x4000, 0x12340, user=False)
    assert pop_transfer_frame(m, sp, 0x10, 0x4000, user=False) == (0x12340, KSS + PAGE)


@pytest.mark.parametrize(
    "cs,lip,prev",
    [
        (0x18, 0x4000, 0x12340),  # CS mismatch
        (0x10, 0x4008, 0x12340),  # LIP mismatch
        (0x10, 0x4000, 0x12342),  # prevSSP & 3 != 0
    ],
)
def test_frame_pop_mismatch_is_cp2(cs, lip, prev):
    m = machine_with_shadow_stacks()
    sp = push_transfer_frame(m, KSS + PAGE, 0x10, 0x4000, prev, user=False)
    with pytest.raises(GuestFault) as exc:
        pop_transfer_frame(m, sp, cs, lip, user=False)
    assert (exc.value.vector, exc.value.error_code) == (Vector.CP, CpError.FAR_RET_IRET)


def test_frame_pop_cs_compare_is_64_bit():
    m = machine_with_shadow_stacks()
    sp = push_transfer_frame(m, KSS + PAGE, 0x10, 0x4000, 0x12340, user=False)
    m.poke(sp + 16, 0x1_0000_0010)
    with pytest.raises(GuestFault):
        pop_transfer_frame(m, sp, 0x10, 0x4000, user=False)


def test_frame_pop_misaligned_ssp_is_cp2():
    m = machine_with_shadow_stacks()
    with pytest.raises(GuestFault) as exc:
        pop_transfer_frame(m, KSS + 0x104, 0x10, 0, user=False)
    assert exc.value.error_code == CpError.FAR_RET_IRET


# --- supervisor tokens --------------------------------------------------------------------

TOKEN_AT = KSS + PAGE - 8  # 8 below a page top: SSP mod 32 == 24


def test_region_rule_only_accepts_ssp_mod_32_equal_24():
    accepted = [off for off in range(0, 64, 8) if token_and_frame_share_region(0x10000 + off)]
    assert accepted == [24, 56]


def test_enter_supervisor_marks_free_token_busy():
    m = machine_with_shadow_stacks()
    m.poke(TOKEN_AT, supervisor_token(TOKEN_AT))
    shstk_enter_supervisor(m, TOKEN_AT)
    assert m.peek(TOKEN_AT) == TOKEN_AT | 1


@pytest.mark.parametrize(
    "token",
    [supervisor_token(TOKEN_AT, busy=True), supervisor_token(TOKEN_AT - 32), 0],
    ids=["busy", "other-address", "zero"],
)
def test_enter_supervisor_bad_token_is_gp0(token):
    m = machine_with_shadow_stacks()
    m.poke(TOKEN_AT, token)
    with pytest.raises(GuestFault) as exc:
        shstk_enter_supervisor(m, TOKEN_AT)
    assert (exc.value.vector, exc.value.error_code) == (Vector.GP, 0)
    assert m.peek(TOKEN_AT) == token


def test_enter_supervisor_misaligned_is_gp0():
    m = machine_with_shadow_stacks()
    with pytest.raises(GuestFault) as exc:
        shstk_enter_supervisor(m, TOKEN_AT + 4)
    assert exc.value.vector == Vector.GP


def test_enter_supervisor_32_byte_region_rule_is_gp0_even_with_a_good_token():
    m = machine_with_shadow_stacks()
    ssp = KSS + PAGE - 16  # mod 32 == 16: the frame would cross into the previous 32 bytes
    m.poke(ssp, supervisor_token(ssp))
    with pytest.raises(GuestFault) as exc:
        shstk_enter_supervisor(m, ssp)
    assert (exc.value.vector, exc.value.error_code) == (Vector.GP, 0)
    assert m.peek(ssp) == supervisor_token(ssp)  # not marked busy


def test_enter_supervisor_high_bits_outside_64bit_mode_is_gp0():
    m = machine_with_shadow_stacks(long_mode=False)
    with pytest.raises(GuestFault):
        shstk_enter_supervisor(m, 0x1_0000_0018)


def test_token_on_user_page_is_pf():
    m = machine_with_shadow_stacks()
    ssp = USS + PAGE - 8
    m.poke(ssp, supervisor_token(ssp))
    with pytest.raises(GuestFault) as exc:
        shstk_enter_supervisor(m, ssp)
    assert exc.value.vector == Vector.PF and exc.value.error_code & PfErr.SS


def test_free_token_clears_busy_only_when_it_matches():
    m = machine_with_shadow_stacks()
    m.poke(TOKEN_AT, TOKEN_AT | 1)
    assert shstk_free_token(m, TOKEN_AT)
    assert m.peek(TOKEN_AT) == TOKEN_AT
    assert not shstk_free_token(m, TOKEN_AT)  # already free: no fault, no change
    assert m.peek(TOKEN_AT) == TOKEN_AT
