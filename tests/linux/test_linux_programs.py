"""Our static CET user-space tests (guests/linux) on this host: they are ordinary Linux programs.
On a host whose kernel offers user shadow stacks (``user_shstk`` in /proc/cpuinfo) every check
must pass; elsewhere each must skip cleanly ("1..0 # SKIP shadow stack not supported", exit 0).
Inside a guest they are run by /init (test_linux_qemu.py, and the lead's cetvm boot tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cetvm.linux import Outcome, parse_program_output
from guest_build import GUESTS, built_guest

PROGRAMS = sorted(p.stem for p in (GUESTS / "linux").glob("*.c"))


def _static_libc() -> bool:
    try:
        out = subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return False
    return out.startswith("/") and Path(out).is_file()


def _host_has_user_shstk() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "user_shstk" in flags.split()


pytestmark = pytest.mark.skipif(not _static_libc(),
                                reason="guests/linux needs glibc's static libc.a (Debian's libc6-dev; `make debs`)")


def test_there_are_programs():
    assert {"shstk_prctl", "shstk_rop", "shstk_map", "shstk_signal", "shstk_fork_thread"} <= set(PROGRAMS)


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_on_this_host(name):
    binary = built_guest(f"linux/{name}", GUESTS, "linux", (GUESTS / "linux",))
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    run = parse_program_output(name, proc.stdout, proc.returncode)
    if _host_has_user_shstk():
        assert run.outcome is Outcome.PASS, proc.stdout + proc.stderr
    else:
        assert run.outcome is Outcome.SKIP and proc.returncode == 0, proc.stdout + proc.stderr
        assert run.skip_reason.startswith("shadow stack not supported (arch_prctl(ARCH_SHSTK_ENABLE)")
