"""The architectural facts match the reference tables."""

from cetvm.arch import CetCtl, Cr4, CpError, Msr, VmcsField, VmEntryControls, VmExitControls, XFeature, is_canonical
from cetvm.arch.cet import is_valid_supervisor_token, supervisor_token


def test_cet_msr_indices():
    assert [int(m) for m in (Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL3_SSP,
                             Msr.IA32_INT_SSP_TAB, Msr.IA32_XSS)] == [0x6A0, 0x6A2, 0x6A4, 0x6A7, 0x6A8, 0xDA0]


def test_cet_bits_and_codes():
    assert int(CetCtl.SUPPRESS | CetCtl.TRACKER) == 0xC00
    assert int(Cr4.CET) == 1 << 23
    assert [int(c) for c in CpError] == [1, 2, 3, 4, 5]
    assert XFeature.CET_USER.mask | XFeature.CET_KERNEL.mask == 0x1800


def test_vmcs_cet_fields():
    assert (VmcsField.GUEST_S_CET, VmcsField.GUEST_SSP, VmcsField.GUEST_INTR_SSP_TABLE) == (0x6828, 0x682A, 0x682C)
    assert (VmcsField.HOST_S_CET, VmcsField.HOST_SSP, VmcsField.HOST_INTR_SSP_TABLE) == (0x6C18, 0x6C1A, 0x6C1C)
    assert int(VmEntryControls.LOAD_CET_STATE) == 0x00100000
    assert int(VmExitControls.LOAD_CET_STATE) == 0x10000000


def test_canonical():
    assert is_canonical(0x7FFF_FFFF_FFFF)
    assert not is_canonical(0x8000_0000_0000)
    assert is_canonical(0xFFFF_8000_0000_0000)
    assert not is_canonical(0xFFFF_7FFF_FFFF_FFFF)


def test_supervisor_token():
    tok = supervisor_token(0x1000FF8)
    assert tok == 0x1000FF8 and is_valid_supervisor_token(tok, 0x1000FF8)
    assert supervisor_token(0x1000FF8, busy=True) == 0x1000FF9
    assert is_valid_supervisor_token(0x1000FF9, 0x1000FF8)
    assert not is_valid_supervisor_token(0x1000FF0, 0x1000FF8)
