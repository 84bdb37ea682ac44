"""The ACPI fixed-hardware PM1 registers (PM1a event and control blocks) at QEMU's PIIX4 PM base
0x600 [ACPI 6.4 §4.8.3.1 PM1 event grouping, §4.8.3.2 PM1 control grouping]:

===========  ======  ===================================================================
register     port    behaviour
===========  ======  ===================================================================
PM1_STS      0x600   status bits, write 1 to clear (PWRBTN_STS set by :meth:`press_power_button`)
PM1_EN       0x602   enable bits; an enabled status bit asserts the SCI (ISA IRQ 9, level)
PM1_CNT      0x604   SCI_EN reads 1 (the FADT's SMI_CMD is 0: the machine is always in ACPI
                     mode, ACPI 6.4 §4.8.2.1); SLP_TYP (12:10) and BM_RLD are kept; writing
                     SLP_EN with SLP_TYP = :data:`SLP_TYP_S5` powers the machine off (a
                     :class:`~cetvm.vmm.requests.PowerOffRequest`: ``cetvm boot`` exits 0, as
                     QEMU's poweroff). The DSDT declares only \\_S5, so no other sleep type is
                     requested by an OS; one written anyway is ignored (no sleep states).
===========  ======  ===================================================================

Accesses of 1, 2 or 4 bytes at any offset of the block reach the bytes they cover. The PM
timer (0x608, :mod:`cetvm.vmm.devices.pm_timer`) is its own device; its overflow status
(TMR_STS) is never set (Linux uses the timer as a clocksource, not its interrupt).
"""

from __future__ import annotations

from typing import Callable

from cetvm.arch.acpi import PM1_SLP_TYP_MASK, PM1_SLP_TYP_SHIFT, Pm1Control, Pm1Enable, Pm1Status
from cetvm.vmm.devices.state import state_int
from cetvm.vmm.requests import PowerOffRequest

PM_BASE = 0x600
PM1_EVT_BLK = PM_BASE
PM1_EVT_LEN = 4
PM1_CNT_BLK = PM_BASE + 4
PM1_CNT_LEN = 2
PM1_PORT_COUNT = PM1_EVT_LEN + PM1_CNT_LEN
#: The SCI's ISA IRQ (FADT SCI_INT; MADT: level-triggered, active high).
SCI_IRQ = 9
#: SLP_TYP of S5 (soft off), as the DSDT's \_S5 package declares it.
SLP_TYP_S5 = 5
_STS_BITS = int(Pm1Status.TMR_STS | Pm1Status.BM_STS | Pm1Status.GBL_STS | Pm1Status.PWRBTN_STS
                | Pm1Status.SLPBTN_STS | Pm1Status.RTC_STS | Pm1Status.PCIEXP_WAKE_STS | Pm1Status.WAK_STS)
_EN_BITS = int(Pm1Enable.TMR_EN | Pm1Enable.GBL_EN | Pm1Enable.PWRBTN_EN | Pm1Enable.SLPBTN_EN | Pm1Enable.RTC_EN)
_CNT_KEPT = int(Pm1Control.BM_RLD) | PM1_SLP_TYP_MASK


class AcpiPm1:
    """PM1a_EVT_BLK + PM1a_CNT_BLK (6 ports); ``sci(level)`` drives the SCI line."""

    def __init__(self, sci: Callable[[bool], None] | None = None) -> None:
        self.sci = sci
        self.status = 0
        self.enable = 0
        self.control = int(Pm1Control.SCI_EN)

    @property
    def sci_level(self) -> bool:
        return bool(self.status & self.enable)

    def _update_sci(self) -> None:
        if self.sci is not None:
            self.sci(self.sci_level)

    def press_power_button(self) -> None:
        """The fixed power button was pressed: PWRBTN_STS, and the SCI if PWRBTN_EN."""
        self.status |= Pm1Status.PWRBTN_STS
        self._update_sci()

    def _registers(self) -> bytes:
        return (self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little")
                + self.control.to_bytes(2, "little"))

    def pio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._registers()[offset:offset + size].ljust(size, b"\xff"), "little")

    def pio_write(self, offset: int, size: int, value: int) -> None:
        data = bytearray(PM1_PORT_COUNT)
        mask = bytearray(PM1_PORT_COUNT)
        for i in range(size):
            if offset + i < PM1_PORT_COUNT:
                data[offset + i], mask[offset + i] = (value >> (8 * i)) & 0xFF, 0xFF
        word = [int.from_bytes(data[r:r + 2], "little") for r in (0, 2, 4)]
        bits = [int.from_bytes(mask[r:r + 2], "little") for r in (0, 2, 4)]
        self.status &= ~(word[0] & bits[0] & _STS_BITS)
        self.enable = (self.enable & ~bits[1]) | (word[1] & bits[1] & _EN_BITS)
        self.control = (self.control & ~(bits[2] & _CNT_KEPT)) | (word[2] & bits[2] & _CNT_KEPT)
        self._update_sci()
        if word[2] & bits[2] & Pm1Control.SLP_EN:
            self._sleep((self.control & PM1_SLP_TYP_MASK) >> PM1_SLP_TYP_SHIFT)

    def _sleep(self, slp_typ: int) -> None:
        """SLP_EN written: enter sleep type ``slp_typ`` (only S5 exists)."""
        if slp_typ == SLP_TYP_S5:
            raise PowerOffRequest("ACPI PM1a_CNT (SLP_TYP=S5, SLP_EN)")

    def get_state(self) -> dict:
        return {"status": self.status, "enable": self.enable, "control": self.control}

    def set_state(self, state: dict) -> None:
        status = state_int(state, "status", "acpi pm1", 16) & _STS_BITS
        enable = state_int(state, "enable", "acpi pm1", 16) & _EN_BITS
        control = state_int(state, "control", "acpi pm1", 16) & _CNT_KEPT | Pm1Control.SCI_EN
        self.status, self.enable, self.control = status, enable, int(control)
