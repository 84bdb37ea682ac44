"""The ACPI power-management timer (ACPI 6.4 §4.8.3.3, "PM_TMR"), at QEMU's PIIX4 port 0x608.

A free-running 24-bit counter at 3.579545 MHz; reads of the 4-byte register return its value
(QEMU hw/acpi/core.c acpi_pm_tmr_get: ``ticks & 0xFFFFFF``; TMR_VAL_EXT clear in the FADT), writes
are ignored. It counts in guest time (the VMM's :class:`~cetvm.vmm.irq.GuestClock`, ns), so a
run reads the same values every time. kvm-unit-tests' vmexit ``inl_from_pmtimer`` finds the
port through the FADT (:mod:`cetvm.vmm.acpi`).
"""

from __future__ import annotations

from typing import Callable

#: QEMU's PIIX4 PM I/O base (0x600) + the timer's offset (8).
PM_TIMER_PORT = 0x608
PM_TIMER_PORT_COUNT = 4
PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF


class PmTimer:
    """Reads return the tick count of ``clock_ns()`` (guest ns) at 3.579545 MHz, 24 bits."""

    def __init__(self, clock_ns: Callable[[], int]) -> None:
        self.clock_ns = clock_ns

    def ticks(self) -> int:
        return (self.clock_ns() * PM_TIMER_HZ // 1_000_000_000) & PM_TIMER_MASK

    def pio_read(self, offset: int, size: int) -> int:
        return (self.ticks() >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass
