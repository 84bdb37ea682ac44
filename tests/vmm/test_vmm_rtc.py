"""The CMOS RTC's register rules (cetvm.vmm.devices.rtc) that the guest test (guests/tests/clocks.c)
does not reach: encodings at the edges of the 12-hour clock, impossible dates, UIP and UF, the
index port, and snapshot state checks."""

from __future__ import annotations

import pytest

from cetvm import InputError
from cetvm.vmm.devices.rtc import (
    REG_A, REG_A_UIP, REG_B, REG_C, REG_C_UF, REG_HOURS, REG_SECONDS, CmosRtc, from_bcd, memory_size_bytes,
    to_bcd,
)

NOON_2024_06_15 = 1_718_452_800  # Saturday 2024-06-15 12:00:00 UTC
SEC = 10**9


def rtc_at(seconds: int, now: list[int]) -> CmosRtc:
    return CmosRtc(ram_size=0, realtime_base_ns=seconds * SEC, clock=lambda: now[0])


def read(rtc: CmosRtc, reg: int) -> int:
    rtc.pio_write(0, 1, reg)
    return rtc.pio_read(1, 1)


def write(rtc: CmosRtc, reg: int, value: int) -> None:
    rtc.pio_write(0, 1, reg)
    rtc.pio_write(1, 1, value)


def test_bcd_round_trips():
    assert all(from_bcd(to_bcd(v)) == v for v in range(100))
    assert to_bcd(59) == 0x59


@pytest.mark.parametrize("offset, hour24, hour12", [(0, 0x12, 0x80 | 0x12), (-12 * 3600, 0x00, 0x12),
                                                    (3600, 0x13, 0x80 | 0x01), (-3600, 0x11, 0x11)])
def test_hours_in_24_and_12_hour_bcd(offset, hour24, hour12):
    rtc = rtc_at(NOON_2024_06_15 + offset, [0])
    assert read(rtc, REG_HOURS) == hour24
    write(rtc, REG_B, 0x00)  # BCD, 12-hour
    assert read(rtc, REG_HOURS) == hour12


def test_weekday_and_century():
    rtc = rtc_at(NOON_2024_06_15, [0])
    assert read(rtc, 0x06) == 7          # Saturday
    assert (read(rtc, 0x32), read(rtc, 0x09)) == (0x20, 0x24)


def test_uip_in_the_last_244_us_of_a_second_and_uf_once_per_second():
    now = [0]
    rtc = rtc_at(NOON_2024_06_15, now)
    assert not read(rtc, REG_A) & REG_A_UIP
    now[0] = SEC - 100_000
    assert read(rtc, REG_A) & REG_A_UIP
    assert read(rtc, REG_C) == 0          # still the first second
    now[0] = SEC + 1
    assert read(rtc, REG_C) == REG_C_UF
    assert read(rtc, REG_C) == 0          # reading C clears it


def test_impossible_date_written_is_ignored():
    now = [0]
    rtc = rtc_at(NOON_2024_06_15, now)
    write(rtc, REG_B, 0x82)               # SET, BCD, 24 h
    write(rtc, 0x08, 0x13)                # month 13
    write(rtc, REG_B, 0x02)
    assert read(rtc, REG_HOURS) == 0x12 and read(rtc, 0x08) == 0x06


def test_index_port_reads_all_ones_and_keeps_the_nmi_bit():
    rtc = rtc_at(0, [0])
    rtc.pio_write(0, 1, 0x80 | REG_SECONDS)
    assert rtc.nmi_disabled and rtc.index == REG_SECONDS
    assert rtc.pio_read(0, 1) == 0xFF


def test_memory_size_bytes_above_4_gib():
    sizes = memory_size_bytes(6 << 30)
    assert (sizes[0x34] | sizes[0x35] << 8) == 0xFFFF - 0xFF  # (4 GiB - 16 MiB) / 64 KiB
    assert (sizes[0x5B] | sizes[0x5C] << 8 | sizes[0x5D] << 16) == (2 << 30) >> 16


def test_state_round_trip_and_bad_state():
    now = [5 * SEC]
    rtc = rtc_at(NOON_2024_06_15, now)
    write(rtc, REG_B, 0x82)
    write(rtc, REG_SECONDS, 0x30)
    write(rtc, REG_B, 0x02)
    copy = rtc_at(NOON_2024_06_15, now)
    copy.set_state(rtc.get_state())
    assert read(copy, REG_SECONDS) == read(rtc, REG_SECONDS) == 0x30
    for bad in ({**rtc.get_state(), "cmos": "00"}, {**rtc.get_state(), "adjust_ns": "x"},
                {**rtc.get_state(), "index": 200}, {k: v for k, v in rtc.get_state().items() if k != "cmos"}):
        with pytest.raises(InputError):
            copy.set_state(bad)
