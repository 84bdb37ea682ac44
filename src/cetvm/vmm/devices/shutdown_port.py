"""The Bochs/QEMU shutdown port 0x8900: writing the characters ``Shutdown`` powers off.

Bochs (iodev/unmapped.cc) and QEMU up to 2.x (hw/i386/pc.c ``bochs_bios_write``) compare each
byte written to port 0x8900 with the next character of "Shutdown"; a mismatch starts the match
over (the mismatching byte itself is not re-tried as a first character). The eighth matching byte
powers the machine off. Reads are unclaimed on real Bochs: all ones.
"""

from __future__ import annotations

from cetvm import InputError
from cetvm.vmm.devices.state import state_int
from cetvm.vmm.requests import PowerOffRequest

SHUTDOWN_PORT = 0x8900
SHUTDOWN_MAGIC = b"Shutdown"


class BochsShutdownPort:
    """Matches the byte sequence ``Shutdown`` and raises :class:`PowerOffRequest`."""

    def __init__(self) -> None:
        self.matched = 0

    def pio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == SHUTDOWN_MAGIC[self.matched]:
            self.matched += 1
            if self.matched == len(SHUTDOWN_MAGIC):
                self.matched = 0
                raise PowerOffRequest("shutdown port 0x8900")
        else:
            self.matched = 0

    def get_state(self) -> dict:
        return {"matched": self.matched}

    def set_state(self, state: dict) -> None:
        matched = state_int(state, "matched", "shutdown port", 8)
        if matched >= len(SHUTDOWN_MAGIC):
            raise InputError(f"shutdown port state 'matched' = {matched} must be below {len(SHUTDOWN_MAGIC)}")
        self.matched = matched
