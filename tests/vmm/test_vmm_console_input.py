"""Host console input: a terminal in raw mode while the machine runs (restored after), bytes
delivered to the UART, non-blocking polls rate-limited, end of input."""

import os
import pty
import termios

from cetvm.vmm.console_input import POLL_PERIOD, HostConsoleInput


def test_a_terminal_is_raw_while_attached_and_restored_after():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        got = []
        console = HostConsoleInput(slave, got.append)
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO) and raw[3] & termios.ISIG
        os.write(master, b"ls\r")  # no line buffering: delivered before any newline
        assert console.poll(block=True) and got == [b"ls\r"]
        console.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_non_blocking_polls_are_rate_limited_and_eof_ends_input():
    read_fd, write_fd = os.pipe()
    now = [0.0]
    got = []
    console = HostConsoleInput(read_fd, got.append, clock=lambda: now[0])
    assert not console.poll(block=False)
    os.write(write_fd, b"x")
    assert not console.poll(block=False)  # too soon after the last look
    now[0] += POLL_PERIOD
    assert console.poll(block=False) and got == [b"x"]
    os.close(write_fd)
    assert not console.poll(block=True) and console.eof
    assert not console.poll(block=True)
    console.close()
    os.close(read_fd)
