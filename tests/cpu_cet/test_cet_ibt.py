"""Indirect branch tracking: arming, ENDBR, NOTRACK, legacy bitmap, #CP(3) (SDM Vol. 1 ch. 18 IBT)."""

import pytest

from cetvm.arch import ENDBR32, ENDBR64, CetCtl, CpError, Msr, Vector
from cetvm.cpu.cet.ibt import (
    endbr_executed,
    ibt_arm_on_indirect,
    ibt_arm_on_transfer,
    ibt_check_target,
    legacy_bitmap_location,
)
from cetvm.cpu.faults import GuestFault
from fake_machine import FakeMachine

NOT_ENDBR = bytes.fromhex("554889e5")  # push rbp; mov rbp, rsp


def ibt_machine(cpl=3, extra=CetCtl(0), long_mode=True):
    m = FakeMachine(cpl=cpl, long_mode=long_mode)
    m.msrs[Msr.IA32_U_CET if cpl == 3 else Msr.IA32_S_CET] = int(CetCtl.ENDBR_EN | extra)
    return m


def ctl(m, cpl=3):
    return m.msrs[Msr.IA32_U_CET if cpl == 3 else Msr.IA32_S_CET]


def test_indirect_branch_to_endbr64_is_fine():
    m = ibt_machine()
    ibt_arm_on_indirect(m, notrack_prefix=False)
    assert ctl(m) & CetCtl.TRACKER
    ibt_check_target(m, 0x401000, ENDBR64 + b"\x90")
    assert not ctl(m) & CetCtl.TRACKER


def test_indirect_branch_to_other_code_is_cp3():
    m = ibt_machine()
    ibt_arm_on_indirect(m, notrack_prefix=False)
    with pytest.raises(GuestFault) as exc:
        ibt_check_target(m, 0x401000, NOT_ENDBR)
    assert (exc.value.vector, exc.value.error_code) == (Vector.CP, CpError.ENDBRANCH)
    assert ctl(m) & CetCtl.TRACKER  # stays WAIT


def test_endbr32_does_not_satisfy_64bit_mode_and_vice_versa():
    m = ibt_machine()
    ibt_arm_on_indirect(m, False)
    with pytest.raises(GuestFault):
        ibt_check_target(m, 0x1000, ENDBR32)
    m32 = ibt_machine(long_mode=False)
    ibt_arm_on_indirect(m32, False)
    with pytest.raises(GuestFault):
        ibt_check_target(m32, 0x1000, ENDBR64)
    ibt_check_target(m32, 0x1000, ENDBR32)
    assert not ctl(m32) & CetCtl.TRACKER


def test_notrack_exempt_only_with_no_track_en():
    m = ibt_machine()
    ibt_arm_on_indirect(m, notrack_prefix=True)  # NO_TRACK_EN = 0: prefix ignored
    assert ctl(m) & CetCtl.TRACKER
    m = ibt_machine(extra=CetCtl.NO_TRACK_EN)
    ibt_arm_on_indirect(m, notrack_prefix=True)
    assert not ctl(m) & CetCtl.TRACKER
    ibt_check_target(m, 0x401000, NOT_ENDBR)  # no fault
    ibt_arm_on_indirect(m, notrack_prefix=False)
    assert ctl(m) & CetCtl.TRACKER


def test_suppress_blocks_arming_by_indirect_branches_but_not_transfers():
    m = ibt_machine(extra=CetCtl.SUPPRESS)
    ibt_arm_on_indirect(m, False)
    assert not ctl(m) & CetCtl.TRACKER
    ibt_arm_on_transfer(m, 3)
    assert ctl(m) & CetCtl.TRACKER and not ctl(m) & CetCtl.SUPPRESS


def test_trackers_are_per_privilege_class():
    m = ibt_machine(cpl=3)
    m.msrs[Msr.IA32_S_CET] = int(CetCtl.ENDBR_EN)
    ibt_arm_on_transfer(m, 0)
    assert m.msrs[Msr.IA32_S_CET] & CetCtl.TRACKER
    assert not m.msrs[Msr.IA32_U_CET] & CetCtl.TRACKER
    ibt_check_target(m, 0x1000, NOT_ENDBR)  # CPL 3 tracker is IDLE: no fault


def test_nothing_when_ibt_disabled():
    m = FakeMachine(cpl=3)
    ibt_arm_on_indirect(m, False)
    ibt_arm_on_transfer(m, 3)
    ibt_check_target(m, 0x1000, NOT_ENDBR)
    assert m.msr_writes == 0


def test_endbr_executed_clears_tracker_and_suppress_in_its_mode_only():
    m = ibt_machine(extra=CetCtl.SUPPRESS)
    endbr_executed(m, endbr64=False)  # ENDBR32 in 64-bit mode is a NOP
    assert ctl(m) & CetCtl.SUPPRESS
    endbr_executed(m, endbr64=True)
    assert not ctl(m) & (CetCtl.SUPPRESS | CetCtl.TRACKER)


def test_legacy_bitmap_location():
    base = 0x7F00_0000_0000
    byte, bit = legacy_bitmap_location(base | CetCtl.ENDBR_EN | CetCtl.LEG_IW_EN, 0x0040_3000)
    # page number 0x403: byte 0x403 >> 3 = 0x80, bit 0x403 & 7 = 3
    assert (byte, bit) == (base + 0x80, 3)


BITMAP = 0x0060_0000


def legacy_machine(extra=CetCtl(0)):
    m = ibt_machine(extra=CetCtl.LEG_IW_EN | extra)
    m.msrs[Msr.IA32_U_CET] |= BITMAP
    m.map_data(BITMAP, user=True)
    m.poke(BITMAP + 0x80, 1 << 3, 1)  # page 0x403000 is legacy code
    return m


def test_legacy_page_target_goes_idle_and_suppressed():
    m = legacy_machine()
    ibt_arm_on_indirect(m, False)
    ibt_check_target(m, 0x403ABC, NOT_ENDBR)
    assert not ctl(m) & CetCtl.TRACKER and ctl(m) & CetCtl.SUPPRESS
    ibt_arm_on_indirect(m, False)  # suppressed: legacy code's own indirect branches are free
    assert not ctl(m) & CetCtl.TRACKER
    ibt_check_target(m, 0x401000, ENDBR64)  # back in IBT code: ENDBR lifts SUPPRESS
    assert not ctl(m) & CetCtl.SUPPRESS


def test_legacy_page_with_suppress_dis_does_not_suppress():
    m = legacy_machine(CetCtl.SUPPRESS_DIS)
    ibt_arm_on_indirect(m, False)
    ibt_check_target(m, 0x403000, NOT_ENDBR)
    assert not ctl(m) & (CetCtl.TRACKER | CetCtl.SUPPRESS)


def test_page_not_in_legacy_bitmap_is_cp3():
    m = legacy_machine()
    ibt_arm_on_indirect(m, False)
    with pytest.raises(GuestFault) as exc:
        ibt_check_target(m, 0x404000, NOT_ENDBR)
    assert exc.value.error_code == CpError.ENDBRANCH


def test_bitmap_ignored_without_leg_iw_en():
    m = legacy_machine()
    m.msrs[Msr.IA32_U_CET] &= ~CetCtl.LEG_IW_EN
    ibt_arm_on_indirect(m, False)
    with pytest.raises(GuestFault):
        ibt_check_target(m, 0x403000, NOT_ENDBR)
