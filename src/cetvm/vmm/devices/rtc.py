"""The CMOS real-time clock and its RAM at ports 0x70/0x71 (Motorola MC146818A, as every PC
chipset keeps it; QEMU hw/rtc/mc146818rtc.c behaves the same for what is modelled here).

Port 0x70 selects a register (bits 6:0) and holds the NMI-disable bit (bit 7, stored: cetvm
raises no NMI); reading it returns all ones (write-only on the PC). Port 0x71 reads or writes
the selected register:

=========  ==============================================================================
0x00-0x09  seconds, seconds alarm, minutes, minutes alarm, hours, hours alarm, day of week
           (1 = Sunday), day of month, month, year (00-99), in BCD or binary (register B
           bit 2, DM) and for hours 24- or 12-hour form (bit 1; 12-hour: 1-12, bit 7 = PM)
0x0A       register A: bit 7 UIP (read-only), divider 6:4 and rate 3:0 stored (reset 0x26)
0x0B       register B: SET 7, PIE 6, AIE 5, UIE 4, SQWE 3, DM 2, 24/12 1, DSE 0 (reset 0x02)
0x0C       register C (read-only, read clears): UF (bit 4) once a second boundary passed
           since the last read; IRQF/PF/AF stay 0 (no periodic or alarm interrupt, below)
0x0D       register D (read-only): VRT = 1 (valid RAM and time)
0x32       century (BCD or binary, as the time registers)
others     CMOS RAM; the VMM fills in the memory-size bytes the BIOS would (QEMU pc_cmos_init):
           0x15/0x16 base memory 640 KiB, 0x17/0x18 and 0x30/0x31 KiB above 1 MiB (at most
           0xFFFF), 0x34/0x35 64-KiB units above 16 MiB (below 4 GiB), 0x5B-0x5D 64-KiB units
           above 4 GiB
=========  ==============================================================================

Time (a decision, for determinism): the RTC shows ``realtime_base_ns`` (the machine config's
wall clock: a fixed epoch by default, or the host's time) plus guest time
(:class:`cetvm.vmm.irq.GuestClock`), plus what the guest set. Register B's SET bit freezes the
registers and lets the guest write them; clearing SET (or writing a time register while SET
is 0) makes the written time current, with the fraction of the second restarted at 0. UIP
reads 1 during the last 244 µs of each second (the MC146818A's update-pending window before
the registers change). The guest's clock runs whatever the divider bits say (decision; the
divider is only stored).

Not modelled: IRQ 8 (the machine has no IRQ-line API yet: periodic, alarm and update-ended
interrupts are never raised, so IRQF, PF and AF stay 0) and daylight-saving (DSE is stored).
"""

from __future__ import annotations

import calendar
import time
from typing import Callable

from cetvm import InputError
from cetvm.arch.timekeeping import NSEC_PER_SEC
from cetvm.vmm.devices.state import state_bool, state_bytes, state_field, state_int

RTC_PORT = 0x70
RTC_PORT_COUNT = 2
CMOS_SIZE = 128

REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)

REG_A_UIP = 1 << 7
REG_A_RESET = 0x26
REG_B_SET = 1 << 7
REG_B_DM_BINARY = 1 << 2
REG_B_24H = 1 << 1
REG_B_RESET = REG_B_24H
REG_C_UF = 1 << 4
REG_D_VRT = 1 << 7
HOUR_PM = 1 << 7
NMI_DISABLE = 1 << 7
#: The update-pending window before each second's update [MC146818A datasheet, "UIP"].
UIP_WINDOW_NS = 244_000
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0xF)


def memory_size_bytes(ram_size: int) -> dict[int, int]:
    """The CMOS memory-size bytes for ``ram_size`` bytes of RAM (module docstring)."""
    below_4g, above_4g = min(ram_size, 4 * GIB), max(0, ram_size - 4 * GIB)
    ext_kib = min(0xFFFF, max(0, below_4g - MIB) // KIB)
    above_16m = min(0xFFFF, max(0, below_4g - 16 * MIB) // (64 * KIB))
    high = above_4g // (64 * KIB)
    values = {0x15: 640 & 0xFF, 0x16: 640 >> 8, 0x17: ext_kib & 0xFF, 0x18: ext_kib >> 8,
              0x30: ext_kib & 0xFF, 0x31: ext_kib >> 8, 0x34: above_16m & 0xFF, 0x35: above_16m >> 8,
              0x5B: high & 0xFF, 0x5C: (high >> 8) & 0xFF, 0x5D: (high >> 16) & 0xFF}
    return values


class CmosRtc:
    """MC146818A RTC + CMOS RAM (module docstring). ``clock``: guest time in ns."""

    def __init__(self, ram_size: int = 0, realtime_base_ns: int = 0,
                 clock: Callable[[], int] = lambda: 0) -> None:
        self.clock = clock
        self.realtime_base_ns = realtime_base_ns
        self.cmos = bytearray(CMOS_SIZE)
        for index, value in memory_size_bytes(ram_size).items():
            self.cmos[index] = value
        self.cmos[REG_A], self.cmos[REG_B], self.cmos[REG_D] = REG_A_RESET, REG_B_RESET, REG_D_VRT
        self.index = 0
        self.nmi_disabled = False
        #: ns the guest moved its clock by (setting the time), relative to base + guest time.
        self.adjust_ns = 0
        #: the RTC second at the last read of register C (for UF), first the power-on second.
        self.last_c_second = self.now_ns() // NSEC_PER_SEC

    # ------------------------------------------------------------------ time
    def now_ns(self) -> int:
        """The RTC's time now, ns since 1970."""
        return self.realtime_base_ns + self.clock() + self.adjust_ns

    def _time_registers(self, seconds: int) -> dict[int, int]:
        """The time registers for ``seconds`` since 1970, in the format register B selects."""
        tm = time.gmtime(seconds)
        binary, h24 = self.cmos[REG_B] & REG_B_DM_BINARY, self.cmos[REG_B] & REG_B_24H

        def enc(value: int) -> int:
            return value if binary else to_bcd(value)
        hour = enc(tm.tm_hour)
        if not h24:
            hour = enc(tm.tm_hour % 12 or 12) | (HOUR_PM if tm.tm_hour >= 12 else 0)
        return {REG_SECONDS: enc(tm.tm_sec), REG_MINUTES: enc(tm.tm_min), REG_HOURS: hour,
                REG_WEEKDAY: enc((tm.tm_wday + 1) % 7 + 1), REG_DAY: enc(tm.tm_mday), REG_MONTH: enc(tm.tm_mon),
                REG_YEAR: enc(tm.tm_year % 100), REG_CENTURY: enc(tm.tm_year // 100)}

    def _latch(self) -> None:
        """Copy the running time into the registers (done before SET freezes them)."""
        for reg, value in self._time_registers(self.now_ns() // NSEC_PER_SEC).items():
            self.cmos[reg] = value

    def _registers_to_seconds(self) -> int | None:
        """The time the registers hold, seconds since 1970 (None for an impossible date)."""
        binary, h24 = self.cmos[REG_B] & REG_B_DM_BINARY, self.cmos[REG_B] & REG_B_24H

        def dec(reg: int, mask: int = 0xFF) -> int:
            value = self.cmos[reg] & mask
            return value if binary else from_bcd(value)
        hour = dec(REG_HOURS, 0x7F if not h24 else 0xFF)
        if not h24:
            hour = hour % 12 + (12 if self.cmos[REG_HOURS] & HOUR_PM else 0)
        year = dec(REG_CENTURY) * 100 + dec(REG_YEAR)
        try:
            return calendar.timegm((year, dec(REG_MONTH), dec(REG_DAY), hour, dec(REG_MINUTES), dec(REG_SECONDS)))
        except (ValueError, OverflowError):
            return None

    def _apply_registers(self) -> None:
        """The guest set the time: it is current from now, at the start of its second."""
        seconds = self._registers_to_seconds()
        if seconds is not None and 0 <= seconds < 1 << 32:
            self.adjust_ns = seconds * NSEC_PER_SEC - self.realtime_base_ns - self.clock()

    # ------------------------------------------------------------------ registers
    @property
    def frozen(self) -> bool:
        return bool(self.cmos[REG_B] & REG_B_SET)

    def read_register(self, reg: int) -> int:
        if reg in TIME_REGISTERS and not self.frozen:
            self._latch()
        if reg == REG_A:
            uip = not self.frozen and self.now_ns() % NSEC_PER_SEC >= NSEC_PER_SEC - UIP_WINDOW_NS
            return (self.cmos[REG_A] & ~REG_A_UIP) | (REG_A_UIP if uip else 0)
        if reg == REG_C:
            second = self.now_ns() // NSEC_PER_SEC
            flags = REG_C_UF if second != self.last_c_second and not self.frozen else 0
            self.last_c_second = second
            return flags
        return self.cmos[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg in (REG_C, REG_D):
            return  # read-only
        if reg == REG_A:
            self.cmos[REG_A] = value & ~REG_A_UIP
            return
        if reg == REG_B:
            was_frozen = self.frozen
            if value & REG_B_SET and not was_frozen:
                self._latch()
            self.cmos[REG_B] = value
            if was_frozen and not self.frozen:
                self._apply_registers()
            return
        if reg in TIME_REGISTERS and not self.frozen:
            self._latch()
            self.cmos[reg] = value
            self._apply_registers()
            return
        self.cmos[reg] = value

    # ------------------------------------------------------------------ ports
    def pio_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        return self.read_register(self.index)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index, self.nmi_disabled = value & 0x7F, bool(value & NMI_DISABLE)
        else:
            self.write_register(self.index, value)

    # ------------------------------------------------------------------ snapshot
    def get_state(self) -> dict:
        return {"cmos": self.cmos.hex(), "index": self.index, "nmi_disabled": self.nmi_disabled,
                "adjust_ns": self.adjust_ns, "last_c_second": self.last_c_second}

    def set_state(self, state: dict) -> None:
        cmos = state_bytes(state, "cmos", "RTC")
        if len(cmos) != CMOS_SIZE:
            raise InputError(f"RTC state 'cmos' must hold {CMOS_SIZE} bytes, not {len(cmos)}")
        index = state_int(state, "index", "RTC", 7)
        nmi = state_bool(state, "nmi_disabled", "RTC")
        adjust = state_field(state, "adjust_ns", "RTC")
        if isinstance(adjust, bool) or not isinstance(adjust, int) or not -(1 << 63) <= adjust < 1 << 63:
            raise InputError(f"RTC state 'adjust_ns' must be a signed 64-bit integer, got {adjust!r}")
        last = state_int(state, "last_c_second", "RTC", 64)
        self.cmos, self.index, self.nmi_disabled, self.adjust_ns, self.last_c_second = (
            bytearray(cmos), index, nmi, adjust, last)
