"""isa-debug-exit (QEMU hw/misc/debugexit.c): a write of ``v`` ends the machine with status
``(v << 1) | 1``.

QEMU's default is iobase 0xF4, iosize 1, but the port accepts 1-, 2- and 4-byte writes and uses
the whole value (``.valid`` and ``.impl`` are 1..4 bytes); the shift means a guest can never
produce status 0, so a test harness tells "guest said pass" from "QEMU exited normally". Reads
return 0 (QEMU ``debug_exit_read``).
"""

from __future__ import annotations

from cetvm.vmm.requests import GuestExitRequest

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_PORT_COUNT = 1


def debug_exit_status(value: int) -> int:
    """The exit status a write of ``value`` requests."""
    return (value << 1) | 1


class IsaDebugExit:
    """Raises :class:`GuestExitRequest` on every write."""

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        raise GuestExitRequest(debug_exit_status(value))

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass
