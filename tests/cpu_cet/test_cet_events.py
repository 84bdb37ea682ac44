"""SSP handling on events, IRET, far CALL/RET, SYSCALL/SYSRET (SDM Vol. 1 §18.2.4-§18.2.6 and the instruction pages)."""

import pytest

from cetvm import CetvmError
from cetvm.arch import CetCtl, CpError, Msr, PfErr, Vector, supervisor_token
from cetvm.cpu.cet.far_transfers import (
    ssp_on_event,
    ssp_on_far_call,
    ssp_on_far_ret,
    ssp_on_iret,
    ssp_on_syscall,
    ssp_on_sysret,
)
from cetvm.cpu.faults import GuestFault
from fake_machine import PAGE, machine_with_shadow_stacks

KSS = 0x10000
USS = 0x7000_0000
KTOKEN = KSS + 2 * PAGE - 8  # supervisor token at the top of the kernel shadow stack
IST_SS = 0x30000  # a separate supervisor shadow stack for IST 2
IST_TOKEN = IST_SS + PAGE - 8
ISST = 0x50000  # interrupt SSP table (ordinary data page)
USER_CS, KERNEL_CS = 0x33, 0x10


def kernel_ready(cpl: int = 3):
    """Both shadow stacks on, PL0_SSP → a free token, an IST shadow stack for IST 2."""
    m = machine_with_shadow_stacks(cpl=cpl)
    m.poke(KTOKEN, supervisor_token(KTOKEN))
    m.msrs[Msr.IA32_PL0_SSP] = KTOKEN
    m.map_shadow_stack(IST_SS)
    m.poke(IST_TOKEN, supervisor_token(IST_TOKEN))
    m.map_data(ISST)
    m.poke(ISST + 8 * 2, IST_TOKEN)
    m.msrs[Msr.IA32_INT_SSP_TAB] = ISST
    return m


def deliver(m, old_cpl, new_cpl, *, ist=0, cs=USER_CS, lip=0x401000):
    m.cpl = new_cpl
    return ssp_on_event(m, old_cpl, new_cpl, ist, True, cs, lip)


def test_user_to_kernel_event_switches_to_pl0_ssp_and_saves_pl3_ssp():
    m = kernel_ready()
    user_ssp = m.ssp - 16
    m.ssp = user_ssp
    new = deliver(m, 3, 0)
    assert new == m.ssp == KTOKEN  # no frame: the interrupted code was user
    assert m.msrs[Msr.IA32_PL3_SSP] == user_ssp
    assert m.peek(KTOKEN) == KTOKEN | 1  # busy


def test_event_arms_the_new_cpl_tracker():
    m = kernel_ready()
    m.msrs[Msr.IA32_S_CET] |= CetCtl.ENDBR_EN | CetCtl.SUPPRESS
    deliver(m, 3, 0)
    s_cet = m.msrs[Msr.IA32_S_CET]
    assert s_cet & CetCtl.TRACKER and not s_cet & CetCtl.SUPPRESS
    assert not m.msrs[Msr.IA32_U_CET] & CetCtl.TRACKER


def test_user_to_kernel_event_through_ist_uses_interrupt_ssp_table():
    m = kernel_ready()
    assert deliver(m, 3, 0, ist=2) == IST_TOKEN
    assert m.peek(IST_TOKEN) == IST_TOKEN | 1
    assert m.peek(KTOKEN) == KTOKEN  # PL0 stack untouched


def test_busy_token_is_gp0_and_state_is_unchanged():
    m = kernel_ready()
    m.poke(KTOKEN, KTOKEN | 1)
    ssp = m.ssp
    with pytest.raises(GuestFault) as exc:
        deliver(m, 3, 0)
    assert (exc.value.vector, exc.value.error_code) == (Vector.GP, 0)
    assert m.ssp == ssp and m.msrs[Msr.IA32_PL3_SSP] == 0


def test_token_for_another_address_is_gp0():
    m = kernel_ready()
    m.poke(KTOKEN, supervisor_token(KTOKEN - 64))
    with pytest.raises(GuestFault) as exc:
        deliver(m, 3, 0)
    assert exc.value.vector == Vector.GP


def test_pl0_ssp_breaking_the_32_byte_region_rule_is_gp0():
    m = kernel_ready()
    bad = KSS + PAGE - 32  # mod 32 == 0
    m.poke(bad, supervisor_token(bad))
    m.msrs[Msr.IA32_PL0_SSP] = bad
    with pytest.raises(GuestFault) as exc:
        deliver(m, 3, 0)
    assert (exc.value.vector, exc.value.error_code) == (Vector.GP, 0)
    assert m.peek(bad) == supervisor_token(bad)


def test_misaligned_ist_entry_is_gp0():
    m = kernel_ready()
    m.poke(ISST + 8 * 2, IST_TOKEN + 4)
    with pytest.raises(GuestFault):
        deliver(m, 3, 0, ist=2)


def test_kernel_event_without_ist_pushes_frame_on_current_stack():
    m = kernel_ready(cpl=0)
    m.ssp = KSS + PAGE - 0x40
    old = m.ssp
    new = deliver(m, 0, 0, cs=KERNEL_CS, lip=0xFFFF_FFFF_8100_0123)
    assert new == old - 24
    assert (m.peek(new), m.peek(new + 8), m.peek(new + 16)) == (old, 0xFFFF_FFFF_8100_0123, KERNEL_CS)


def test_kernel_event_with_ist_checks_token_and_pushes_frame_on_new_stack():
    m = kernel_ready(cpl=0)
    old = m.ssp = KSS + PAGE - 0x40
    new = deliver(m, 0, 0, ist=2, cs=KERNEL_CS, lip=0x5555)
    assert new == IST_TOKEN - 24
    assert m.peek(IST_TOKEN) == IST_TOKEN | 1
    assert m.peek(new) == old


def test_ring1_to_ring0_event_pushes_frame_below_token():
    m = kernel_ready(cpl=1)
    m.map_shadow_stack(0x60000)
    m.ssp = 0x60800
    new = deliver(m, 1, 0, cs=0x19, lip=0x7777)
    assert new == KTOKEN - 24
    assert m.peek(new) == 0x60800 and m.peek(KTOKEN) == KTOKEN | 1


def test_event_with_kernel_shadow_stacks_off_only_saves_pl3_ssp():
    m = kernel_ready()
    m.msrs[Msr.IA32_S_CET] = 0
    ssp = m.ssp
    assert deliver(m, 3, 0) == ssp
    assert m.msrs[Msr.IA32_PL3_SSP] == ssp
    assert m.peek(KTOKEN) == KTOKEN


def test_event_requires_cpl_switched_first():
    m = kernel_ready()
    with pytest.raises(CetvmError):
        ssp_on_event(m, 3, 0, 0, True, USER_CS, 0)


# --- IRET ---------------------------------------------------------------------------------


def test_iret_to_user_restores_pl3_ssp_and_frees_token():
    m = kernel_ready()
    user_ssp = m.ssp = USS + PAGE - 8
    deliver(m, 3, 0)
    assert ssp_on_iret(m, 0, 3, USER_CS, 0x401000) == user_ssp
    assert m.ssp == user_ssp
    assert m.peek(KTOKEN) == KTOKEN  # free again: the next event can use it
    m.cpl = 3
    assert deliver(m, 3, 0) == KTOKEN


def test_iret_to_user_with_bad_pl3_ssp_is_gp0_and_token_stays_busy():
    m = kernel_ready()
    deliver(m, 3, 0)
    m.msrs[Msr.IA32_PL3_SSP] = 0x8000_0000_0000  # non-canonical
    with pytest.raises(GuestFault) as exc:
        ssp_on_iret(m, 0, 3, USER_CS, 0x401000)
    assert exc.value.vector == Vector.GP
    assert m.ssp == KTOKEN and m.peek(KTOKEN) == KTOKEN | 1


def test_iret_same_privilege_round_trip():
    m = kernel_ready(cpl=0)
    old = m.ssp = KSS + PAGE - 0x40
    deliver(m, 0, 0, cs=KERNEL_CS, lip=0x9000)
    assert ssp_on_iret(m, 0, 0, KERNEL_CS, 0x9000) == old


def test_iret_same_privilege_does_not_free_own_stack_token():
    # SDM: only if tempSSP != SSP. An event right after kernel entry (SSP at its own busy token)
    # returns to the same stack; Bochs would wrongly free the token here (the SDM keeps it busy).
    m = kernel_ready()
    deliver(m, 3, 0)  # SSP = KTOKEN, token busy
    deliver(m, 0, 0, cs=KERNEL_CS, lip=0x9000)
    assert ssp_on_iret(m, 0, 0, KERNEL_CS, 0x9000) == KTOKEN
    assert m.peek(KTOKEN) == KTOKEN | 1


def test_iret_same_privilege_from_ist_stack_frees_ist_token():
    m = kernel_ready(cpl=0)
    old = m.ssp = KSS + PAGE - 0x40
    deliver(m, 0, 0, ist=2, cs=KERNEL_CS, lip=0x9000)
    assert ssp_on_iret(m, 0, 0, KERNEL_CS, 0x9000) == old
    assert m.peek(IST_TOKEN) == IST_TOKEN


@pytest.mark.parametrize("cs,lip", [(0x08, 0x9000), (KERNEL_CS, 0x9001)])
def test_iret_same_privilege_frame_mismatch_is_cp2_and_ssp_unchanged(cs, lip):
    m = kernel_ready(cpl=0)
    m.ssp = KSS + PAGE - 0x40
    frame = deliver(m, 0, 0, cs=KERNEL_CS, lip=0x9000)
    with pytest.raises(GuestFault) as exc:
        ssp_on_iret(m, 0, 0, cs, lip)
    assert (exc.value.vector, exc.value.error_code) == (Vector.CP, CpError.FAR_RET_IRET)
    assert m.ssp == frame


def test_iret_prev_ssp_not_4_aligned_is_cp2():
    m = kernel_ready(cpl=0)
    m.ssp = KSS + PAGE - 0x40
    frame = deliver(m, 0, 0, cs=KERNEL_CS, lip=0x9000)
    m.poke(frame, m.peek(frame) | 2)
    with pytest.raises(GuestFault) as exc:
        ssp_on_iret(m, 0, 0, KERNEL_CS, 0x9000)
    assert exc.value.error_code == CpError.FAR_RET_IRET


def test_iret_misaligned_ssp_is_cp2():
    m = kernel_ready(cpl=0)
    m.ssp = KSS + PAGE - 0x44
    with pytest.raises(GuestFault) as exc:
        ssp_on_iret(m, 0, 0, KERNEL_CS, 0x9000)
    assert exc.value.error_code == CpError.FAR_RET_IRET


def test_iret_ring0_to_ring1_pops_frame_and_frees_token():
    m = kernel_ready(cpl=1)
    m.map_shadow_stack(0x60000)
    m.ssp = 0x60800
    deliver(m, 1, 0, cs=0x19, lip=0x7777)
    assert ssp_on_iret(m, 0, 1, 0x19, 0x7777) == 0x60800
    assert m.peek(KTOKEN) == KTOKEN


# --- far CALL / far RET -------------------------------------------------------------------


def test_far_call_and_far_ret_same_privilege_round_trip():
    m = machine_with_shadow_stacks(cpl=3)
    old = m.ssp
    frame = ssp_on_far_call(m, 3, 3, USER_CS, 0x401005)
    assert frame == old - 24 and m.peek(frame) == old
    assert ssp_on_far_ret(m, 3, 3, USER_CS, 0x401005) == old


def test_far_ret_same_privilege_lip_mismatch_is_cp2():
    m = machine_with_shadow_stacks(cpl=3)
    ssp_on_far_call(m, 3, 3, USER_CS, 0x401005)
    with pytest.raises(GuestFault) as exc:
        ssp_on_far_ret(m, 3, 3, USER_CS, 0x666)
    assert exc.value.error_code == CpError.FAR_RET_IRET


def test_far_ret_same_privilege_frees_no_token():
    m = kernel_ready(cpl=0)
    m.ssp = KTOKEN
    m.poke(KTOKEN, KTOKEN | 1)
    ssp_on_far_call(m, 0, 0, KERNEL_CS, 0x1234)
    ssp_on_far_ret(m, 0, 0, KERNEL_CS, 0x1234)
    assert m.peek(KTOKEN) == KTOKEN | 1


def test_call_gate_to_ring0_and_far_ret_back_to_user():
    m = kernel_ready()
    user_ssp = m.ssp
    assert ssp_on_far_call(m, 3, 0, USER_CS, 0x401007) == KTOKEN
    assert m.msrs[Msr.IA32_PL3_SSP] == user_ssp
    assert ssp_on_far_ret(m, 0, 3, USER_CS, 0x401007) == user_ssp
    assert m.peek(KTOKEN) == KTOKEN


def test_call_gate_with_busy_token_is_gp0():
    m = kernel_ready()
    m.poke(KTOKEN, KTOKEN | 1)
    with pytest.raises(GuestFault) as exc:
        ssp_on_far_call(m, 3, 0, USER_CS, 0x401007)
    assert exc.value.vector == Vector.GP


# --- SYSCALL / SYSRET ---------------------------------------------------------------------


def test_syscall_saves_user_ssp_zeroes_ssp_and_arms_kernel_tracker():
    m = kernel_ready()
    m.msrs[Msr.IA32_S_CET] |= CetCtl.ENDBR_EN
    user_ssp = m.ssp
    assert ssp_on_syscall(m, 3) == 0
    assert m.msrs[Msr.IA32_PL3_SSP] == user_ssp
    assert m.msrs[Msr.IA32_S_CET] & CetCtl.TRACKER


def test_syscall_without_kernel_shadow_stacks_keeps_ssp():
    m = kernel_ready()
    m.msrs[Msr.IA32_S_CET] = 0
    user_ssp = m.ssp
    assert ssp_on_syscall(m, 3) == user_ssp
    assert m.msrs[Msr.IA32_PL3_SSP] == user_ssp


def test_sysret_restores_pl3_ssp():
    m = kernel_ready()
    user_ssp = m.ssp
    ssp_on_syscall(m, 3)
    m.cpl = 0
    m.ssp = 0x1234
    m.cpl = 3
    assert ssp_on_sysret(m) == user_ssp


def test_sysret_without_user_shadow_stacks_leaves_ssp():
    m = kernel_ready()
    m.msrs[Msr.IA32_U_CET] = 0
    m.msrs[Msr.IA32_PL3_SSP] = 0x5000
    m.ssp = 0x9990
    assert ssp_on_sysret(m) == 0x9990


def test_event_frame_push_fault_reports_pf_with_ss():
    m = kernel_ready(cpl=0)
    m.map_data(0x80000)
    m.ssp = 0x80800  # kernel SSP pointing into an ordinary page
    with pytest.raises(GuestFault) as exc:
        deliver(m, 0, 0, cs=KERNEL_CS, lip=0)
    assert exc.value.vector == Vector.PF and exc.value.error_code & PfErr.SS
    assert m.ssp == 0x80800
