"""Console input from the host: bytes typed on the host terminal (or read from any file
descriptor) become received data of the guest's COM1 (QEMU ``-serial stdio``).

The run loop asks :meth:`HostConsoleInput.poll` for input: without blocking between two KVM_RUNs
(at most every :data:`POLL_PERIOD` seconds of host time, so an I/O-heavy guest does not pay a
``select`` per exit), and blocking when no vCPU can run and no timer can wake one — a guest
waiting for its console (Linux in a shell, all CPUs idle without a tick) then waits for the
user instead of being stopped as "halted". End of input (EOF) stops the waiting: the machine
then stops as before.

A terminal is put in raw mode while the machine runs (no line buffering, no local echo: the
guest echoes; Ctrl-C still interrupts cetvm) and restored by :meth:`HostConsoleInput.close`.

Input is the host's, so its timing is not deterministic: a run that takes console input does
not replay identically (the scripted ``serial_input`` of :class:`~cetvm.vmm.devices.pc.PcDevices`
does).
"""

from __future__ import annotations

import os
import select
import termios
import time
import tty
from typing import Callable

#: Seconds between two non-blocking looks at the host input.
POLL_PERIOD = 0.01
READ_CHUNK = 4096


class HostConsoleInput:
    """Reads ``fd`` and hands what arrives to ``deliver`` (e.g. ``Serial16550.queue_input``)."""

    def __init__(self, fd: int, deliver: Callable[[bytes], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.fd = fd
        self.deliver = deliver
        self.clock = clock
        self.eof = False
        self._last_poll = float("-inf")
        self._saved_mode: list | None = None
        if os.isatty(fd):
            self._saved_mode = termios.tcgetattr(fd)
            tty.setraw(fd, termios.TCSANOW)
            mode = termios.tcgetattr(fd)
            mode[3] |= termios.ISIG  # lflag: Ctrl-C still stops cetvm
            mode[1] |= termios.OPOST  # oflag: the guest's "\n" stays a new line on the terminal
            termios.tcsetattr(fd, termios.TCSANOW, mode)

    def poll(self, block: bool) -> bool:
        """Deliver what input is there (``block``: wait for some); True if anything arrived."""
        if self.eof:
            return False
        now = self.clock()
        if not block and now - self._last_poll < POLL_PERIOD:
            return False
        self._last_poll = now
        ready, _, _ = select.select([self.fd], [], [], None if block else 0)
        if not ready:
            return False
        data = os.read(self.fd, READ_CHUNK)
        if not data:
            self.eof = True
            return False
        self.deliver(data)
        return True

    def close(self) -> None:
        """Give the terminal its mode back."""
        if self._saved_mode is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_mode)
            self._saved_mode = None
