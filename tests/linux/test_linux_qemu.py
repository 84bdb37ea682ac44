"""The Linux guest end to end under QEMU TCG (which has no CET): the kernel boots our /init,
which runs every program, prints its report and powers the machine off; every shadow-stack
test skips ("shadow stack not supported"; the kernel selftest: "[SKIP] Could not enable
Shadow stack"). Needs qemu-system-x86_64 and the packages already in the cache
(``cetvm linux-guest [--selftest]``; CETVM_LINUX_CACHE names another cache); skipped with the
reason otherwise. One boot, about 5-10 s; the shell-mode boot is opt-in (CETVM_LINUX_SHELL_TEST=1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from cetvm.linux import NotCached, Outcome, linux_guest, parse_console
from cetvm.linux.packages import KERNEL_RELEASE, SELFTEST_BINARY
from cetvm.linux.recipe import default_cache_dir

QEMU = "qemu-system-x86_64"
BOOT_LIMIT = 120  # seconds: a wedged guest ends the test instead of hanging it


def _cache():
    return os.environ.get("CETVM_LINUX_CACHE") or default_cache_dir()


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    initrd = tmp_path_factory.mktemp("linux") / "initrd.img"
    try:
        return linux_guest(_cache(), with_selftest=True, download=False, initrd=initrd)
    except NotCached:
        pass
    try:
        return linux_guest(_cache(), download=False, initrd=initrd)
    except NotCached as exc:
        pytest.skip(f"the Linux guest packages are not cached ({exc})")


def boot(guest, cmdline: str, when: bytes = b"", typed: bytes = b"") -> str:
    """Boot under QEMU and return the console; ``typed`` goes to the console once a line holding
    ``when`` appeared (the tty drops input that arrives before the shell opens it)."""
    proc = subprocess.Popen(guest.qemu_argv(cmdline), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(BOOT_LIMIT, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if typed and when in line:
                proc.stdin.write(typed)
                proc.stdin.flush()
        status = proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
    console = b"".join(lines).decode(errors="replace")
    assert status == 0, f"QEMU exit status {status} (killed after {BOOT_LIMIT} s?): {console[-2000:]}"
    return console


def test_boots_runs_every_program_and_powers_off(guest):
    console = boot(guest, guest.cmdline)
    report = parse_console(console)
    assert report.finished, console[-3000:]
    assert report.kernel == KERNEL_RELEASE
    assert report.selected == list(guest.tests) == [p.name for p in report.programs]
    assert report.cpu_flags == {"user_shstk": False, "ibt": False, "shstk": False}, "QEMU 7.2 TCG has no CET"
    assert not report.ibt_enabled
    for program in report.programs:
        assert program.outcome is Outcome.SKIP, report.summary()
    if guest.selftest is not None:
        selftest = report.program(SELFTEST_BINARY)
        assert selftest.output == ["[SKIP]\tCould not enable Shadow stack"] and selftest.status == 1
    assert report.all_passed


@pytest.mark.skipif(not os.environ.get("CETVM_LINUX_SHELL_TEST"),
                    reason="a second QEMU boot (~10 s): opt in with CETVM_LINUX_SHELL_TEST=1")
def test_command_line_selects_programs_and_shell_mode(guest):
    first = guest.tests[0]
    console = boot(guest, guest.cmdline_for([first], "shell"), when=b"cetvm-init: shell",
                   typed=b"echo shell-says-$((6*7))\nexit\n")
    report = parse_console(console)
    assert [p.name for p in report.programs] == [first] and report.options["mode"] == "shell"
    assert "shell-says-42" in console and report.finished
