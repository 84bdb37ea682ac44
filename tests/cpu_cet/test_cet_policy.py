"""Which CET feature is active at which CPL (SDM Vol. 3 §2.5)."""

import pytest

from cetvm.arch import CetCtl, Msr
from cetvm.cpu.cet.policy import (
    cet_msr_for_cpl,
    ibt_enabled,
    la_adjust,
    shadow_stack_enabled,
    ssp_valid_for_mode,
    wrss_enabled,
)
from fake_machine import FakeMachine


@pytest.mark.parametrize("cpl,msr", [(0, Msr.IA32_S_CET), (1, Msr.IA32_S_CET), (2, Msr.IA32_S_CET), (3, Msr.IA32_U_CET)])
def test_cet_msr_for_cpl(cpl, msr):
    assert cet_msr_for_cpl(cpl) == msr


def test_shadow_stack_enable_is_per_privilege_class():
    m = FakeMachine()
    m.msrs[Msr.IA32_U_CET] = CetCtl.SH_STK_EN
    assert shadow_stack_enabled(m, 3)
    assert not any(shadow_stack_enabled(m, cpl) for cpl in (0, 1, 2))
    m.msrs[Msr.IA32_S_CET] = CetCtl.SH_STK_EN
    assert all(shadow_stack_enabled(m, cpl) for cpl in range(4))


def test_everything_off_without_cr4_cet():
    m = FakeMachine(cr4_cet=False)
    m.msrs[Msr.IA32_U_CET] = m.msrs[Msr.IA32_S_CET] = CetCtl.SH_STK_EN | CetCtl.WR_SHSTK_EN | CetCtl.ENDBR_EN
    for cpl in range(4):
        assert not shadow_stack_enabled(m, cpl)
        assert not wrss_enabled(m, cpl)
        assert not ibt_enabled(m, cpl)


def test_wrss_needs_both_bits():
    m = FakeMachine()
    m.msrs[Msr.IA32_S_CET] = CetCtl.WR_SHSTK_EN
    assert not wrss_enabled(m, 0)
    m.msrs[Msr.IA32_S_CET] = CetCtl.SH_STK_EN
    assert not wrss_enabled(m, 0)
    m.msrs[Msr.IA32_S_CET] = CetCtl.SH_STK_EN | CetCtl.WR_SHSTK_EN
    assert wrss_enabled(m, 0) and not wrss_enabled(m, 3)


def test_ibt_enable():
    m = FakeMachine()
    m.msrs[Msr.IA32_U_CET] = CetCtl.ENDBR_EN
    assert ibt_enabled(m, 3) and not ibt_enabled(m, 0)


def test_la_adjust_sign_extends_bit_47():
    assert la_adjust(0x0000_8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert la_adjust(0x1234_7FFF_FFFF_F000) == 0x0000_7FFF_FFFF_F000


def test_ssp_validity_per_mode():
    assert ssp_valid_for_mode(0x7FFF_FFFF_F000, True)
    assert not ssp_valid_for_mode(0x8000_0000_0000, True)
    assert ssp_valid_for_mode(0xFFFF_F000, False)
    assert not ssp_valid_for_mode(0x1_0000_0000, False)
