"""XRSTOR/XRSTORS #GP checks and the CET value checks XRSTORS applies."""

from __future__ import annotations

import struct

import pytest

from cetvm.cpuid import get_model
from cetvm.xstate import (
    CetKernelState,
    CetUserState,
    XsaveArea,
    XsaveLayout,
    cet_component_value_fault,
    xrstor_fault,
    xrstors_value_fault,
)

XCR0, XSS = 0x602E7, 0x1900


def header(xstate_bv: int, xcomp_bv: int, tail: bytes = bytes(48)) -> bytes:
    return struct.pack("<QQ", xstate_bv, xcomp_bv) + tail


GOOD_COMPACTED = header(0x1803, (1 << 63) | 0x602E7 | 0x1800)
GOOD_STANDARD = header(0x207, 0)


def test_good_headers_pass():
    assert xrstor_fault(GOOD_COMPACTED, 0x1000, XCR0, XSS, compacted_insn=True) is None
    assert xrstor_fault(GOOD_STANDARD, 0x1000, XCR0, XSS, compacted_insn=False) is None
    assert xrstor_fault(header(0x207, (1 << 63) | 0x207), 0x1000, XCR0, XSS, compacted_insn=False) is None


@pytest.mark.parametrize("hdr,addr,xrstors,expected", [
    (GOOD_COMPACTED, 0x1020, True, "not 64-byte aligned"),
    (GOOD_STANDARD, 0x1008, False, "not 64-byte aligned"),
    (header(0x3, 0x602E7), 0x1000, True, "XCOMP_BV[63] is 0"),
    (header(0x3, (1 << 63) | 0x602E7 | 0x4000), 0x1000, True, "outside XCR0|IA32_XSS"),
    (header(0x803, (1 << 63) | 0x602E7), 0x1000, True, "not in XCOMP_BV"),
    (header(0x3, (1 << 63) | 0x3, b"\x01" + bytes(47)), 0x1000, True, "bytes 63:16"),
    (header(0x3, (1 << 63) | 0x3, bytes(47) + b"\x01"), 0x1000, True, "bytes 63:16"),
    (header(0x800, 0), 0x1000, False, "outside XCR0"),
    (header(0x3, 0, b"\x01" + bytes(47)), 0x1000, False, "bytes 23:8"),
    (header(0x3, (1 << 63) | 0x800), 0x1000, False, "outside XCR0"),
    (header(0x7, (1 << 63) | 0x3), 0x1000, False, "not in XCOMP_BV"),
    (header(0x3, (1 << 63) | 0x3, bytes(8) + b"\x02" + bytes(39)), 0x1000, False, "bytes 63:16"),
])
def test_each_check_fires_on_its_own_bad_header(hdr, addr, xrstors, expected):
    fault = xrstor_fault(hdr, addr, XCR0, XSS, compacted_insn=xrstors)
    assert fault is not None and expected in fault


def test_standard_form_ignores_header_bytes_36_to_63():
    # SDM 13.8.1 checks only bytes 23:8 of the header in the standard form.
    assert xrstor_fault(header(0x3, 0, bytes(8) + b"\xff" * 40), 0, XCR0, XSS, compacted_insn=False) is None


def test_xrstor_compacted_form_needs_xsavec():
    fault = xrstor_fault(header(0x3, (1 << 63) | 0x3), 0, XCR0, XSS, compacted_insn=False, xsavec_supported=False)
    assert fault and "XSAVEC" in fault


def test_xrstor_accepts_area_or_image():
    layout = XsaveLayout.from_cpuid(get_model("sapphire-rapids"))
    area = XsaveArea.new(layout, XCR0 | 0x1800)
    area.cet_user = CetUserState(1, 0x1000)
    assert xrstor_fault(area, 0x2000, XCR0, XSS, compacted_insn=True) is None
    assert xrstor_fault(area.to_bytes(), 0x2000, XCR0, XSS, compacted_insn=True) is None
    assert "outside" in xrstor_fault(area, 0x2000, XCR0, 0, compacted_insn=True)


@pytest.mark.parametrize("state,expected", [
    (CetUserState(0x1, 0x7FFF_FFF0), None),
    (CetUserState(0x40, 0), "reserved bits 9:6"),
    (CetUserState(0x200, 0), "reserved bits 9:6"),
    (CetUserState(0xC00, 0), "SUPPRESS and TRACKER"),
    (CetUserState(0x0000_8000_0000_0000, 0), "not canonical"),
    (CetUserState(0xFFFF_8000_0000_0004, 0), None),
    (CetUserState(0, 0x1002), "bits 1:0"),
    (CetUserState(0, 0x1004), None),
    (CetUserState(0, 0x0000_8000_0000_0000), "not canonical"),
    (CetKernelState(0x1000, 0x2000, 0x3000), None),
    (CetKernelState(0x1001, 0, 0), "IA32_PL0_SSP"),
    (CetKernelState(0, 0xDEAD_0000_0000_0000, 0), "IA32_PL1_SSP"),
    (CetKernelState(0, 0, 0x3), "IA32_PL2_SSP"),
])
def test_cet_component_values(state, expected):
    fault = cet_component_value_fault(state)
    if expected is None:
        assert fault is None
    else:
        assert fault is not None and expected in fault


def test_xrstors_checks_only_components_it_loads():
    layout = XsaveLayout.from_cpuid(get_model("sapphire-rapids"))
    area = XsaveArea.new(layout, XCR0 | 0x1800)
    area.cet_kernel = CetKernelState(0x1001, 0, 0)
    assert "PL0_SSP" in xrstors_value_fault(area, rfbm=0x1800)
    assert xrstors_value_fault(area, rfbm=0x800) is None           # CET_S not requested
    area.xstate_bv = area.xstate_bv & ~0x1000                       # CET_S in init state
    assert xrstors_value_fault(area, rfbm=0x1800) is None
