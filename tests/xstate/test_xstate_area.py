"""XsaveArea: header fields, component bytes and typed CET access."""

from __future__ import annotations

import struct

import pytest

from cetvm import InputError
from cetvm.cpuid import get_model
from cetvm.xstate import CetKernelState, CetUserState, XsaveArea, XsaveFormat, XsaveLayout

SPR = XsaveLayout.from_cpuid(get_model("sapphire-rapids"))
MASK = 0x602E7 | 0x1800


def q(data: bytes, off: int) -> int:
    return struct.unpack_from("<Q", data, off)[0]


def test_new_compacted_area_header_and_size():
    area = XsaveArea.new(SPR, MASK)
    assert len(area.to_bytes()) == 0x2A00
    assert area.xcomp_bv == MASK | (1 << 63)
    assert area.xstate_bv == 0
    assert area.cet_user == CetUserState(0, 0) and area.cet_kernel == CetKernelState(0, 0, 0)


def test_cet_accessors_write_the_reference_offsets_and_round_trip():
    area = XsaveArea.new(SPR, MASK)
    area.cet_user = CetUserState(u_cet=0x1, pl3_ssp=0x7FFF_F000)
    area.cet_kernel = CetKernelState(0xFFFF_8000_0000_1000, 0x2000, 0x3000)
    raw = area.to_bytes()
    assert q(raw, 0x988) == 0x1 and q(raw, 0x990) == 0x7FFF_F000
    assert (q(raw, 0x998), q(raw, 0x9A0), q(raw, 0x9A8)) == (0xFFFF_8000_0000_1000, 0x2000, 0x3000)
    assert q(raw, 512) == 0x1800  # XSTATE_BV marks both components
    again = XsaveArea.from_bytes(SPR, raw)
    assert again.format is XsaveFormat.COMPACTED
    assert again.cet_user == CetUserState(0x1, 0x7FFF_F000)
    assert again.cet_kernel.pl0_ssp == 0xFFFF_8000_0000_1000


def test_component_with_clear_xstate_bv_reads_as_init_state():
    area = XsaveArea.new(SPR, MASK)
    area.cet_user = CetUserState(0x5, 0x1000)
    area.xstate_bv = area.xstate_bv & ~(1 << 11)   # stale bytes stay in the buffer
    assert q(area.to_bytes(), 0x988) == 0x5
    assert area.cet_user == CetUserState(0, 0)


def test_clear_component_is_init_state_and_clears_bit():
    area = XsaveArea.new(SPR, MASK)
    area.cet_kernel = CetKernelState(0x1000, 0x2000, 0x3000)
    area.cet_user = CetUserState(1, 0x4000)
    area.clear_component(12)
    assert area.xstate_bv == 1 << 11
    assert area.component_bytes(12) == bytes(24)
    assert area.to_bytes()[0x998:0x9B0] == bytes(24)
    assert area.cet_user.pl3_ssp == 0x4000


def test_component_bytes_and_errors():
    area = XsaveArea.new(SPR, MASK)
    area.set_component_bytes(9, b"\x01\x02\x03\x04\x00\x00\x00\x00")   # PKRU
    assert area.component_bytes(9)[:4] == b"\x01\x02\x03\x04"
    assert area.xstate_bv == 1 << 9
    with pytest.raises(InputError, match="is 8 bytes"):
        area.set_component_bytes(9, b"\x00")
    with pytest.raises(InputError, match="not part of this XSAVE area"):
        area.component_bytes(8)
    with pytest.raises(InputError, match="legacy region"):
        area.component_bytes(1)
    with pytest.raises(InputError, match="64-bit"):
        area.cet_user = CetUserState(1 << 64, 0)


def test_standard_area():
    area = XsaveArea.new(SPR, 0x2E7, XsaveFormat.STANDARD)
    assert len(area.to_bytes()) == 0xA88
    area.set_component_bytes(9, bytes([7] * 8))
    assert area.to_bytes()[0xA80:0xA88] == bytes([7] * 8)
    assert XsaveArea.from_bytes(SPR, area.to_bytes()).format is XsaveFormat.STANDARD
    with pytest.raises(InputError, match="supervisor"):
        XsaveArea.new(SPR, 0x2E7 | 0x800, XsaveFormat.STANDARD)


def test_from_bytes_rejects_short_images():
    with pytest.raises(InputError, match="shorter"):
        XsaveArea.from_bytes(SPR, bytes(100))
    raw = bytearray(XsaveArea.new(SPR, MASK).to_bytes())
    with pytest.raises(InputError, match="too short"):
        XsaveArea.from_bytes(SPR, bytes(raw[:0x9A0]))
