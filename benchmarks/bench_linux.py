"""Benchmark: Linux boot to init and to power-off under `cetvm boot` and QEMU TCG (issues 10, 13).

    .venv/bin/python benchmarks/bench_linux.py [--tests none|all] [--cpu MODEL] [--smp N]
                                               [--no-qemu] [--json]

The guest is the cached Linux guest of ``cetvm linux-guest --selftest`` (Debian's 6.12 cloud
kernel, busybox, our /init and CET programs, the kernel's shadow-stack selftest). cetvm runs it
with ``cetvm boot --kernel ... --initrd ... --append ...`` in a child process — the path users
run — and QEMU TCG (no CET: every shadow-stack test skips there) with the same kernel, initramfs
and command line, when ``qemu-system-x86_64`` is installed. Printed for each: wall-clock and CPU
time (user + system of the child) until the kernel starts /init ("Run /init as init process" on
the console) and until power-off, for cetvm also the guest instructions from reset to power-off
and MIPS; then the ratios cetvm / QEMU. A benchmark, not a test: the figures depend on the machine
and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cetvm.linux import NotCached, linux_guest

QEMU = "qemu-system-x86_64"


#: The kernel's line when it starts /init: where "boot to init" ends (issue 10's 60 s).
INIT_MARKER = "Run /init as init process"


@dataclass
class BootTime:
    wall_s: float
    cpu_s: float
    status: int
    instructions: int | None = None
    #: wall-clock and CPU seconds when the kernel started /init (None: never seen)
    init_wall_s: float | None = None
    init_cpu_s: float | None = None

    @property
    def mips(self) -> float | None:
        return None if self.instructions is None else self.instructions / self.cpu_s / 1e6


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(argv: list[str], console: Path | None = None) -> tuple[BootTime, str]:
    """Run ``argv``: wall-clock and CPU time, exit status and stdout, and when the console —
    ``console`` if given, else stdout — shows :data:`INIT_MARKER`."""
    wall0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, errors="replace")
    marks: dict[str, float] = {}
    out: list[str] = []

    def mark() -> None:
        if "wall" not in marks:
            marks["wall"], marks["cpu"] = time.perf_counter() - wall0, _process_cpu(proc.pid)

    def read_stdout() -> None:
        for line in proc.stdout:
            out.append(line)
            if console is None and INIT_MARKER in line:
                mark()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this child's own rusage
        if pid:
            break
        if console is not None and "wall" not in marks and console.exists() and INIT_MARKER in console.read_text(errors="replace"):
            mark()
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return BootTime(time.perf_counter() - wall0, usage.ru_utime + usage.ru_stime, proc.returncode,
                    init_wall_s=marks.get("wall"), init_cpu_s=marks.get("cpu")), "".join(out)


def cetvm_boot(guest, cmdline: str, options: list[str]) -> BootTime:
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "console.txt"
        result, out = timed([sys.executable, "-m", "cetvm", "boot", "--kernel", str(guest.kernel), "--initrd",
                             str(guest.initrd), "--append", cmdline, "--serial", str(serial), "--json", *options],
                            console=serial)
    if out.strip().startswith("{"):
        result.instructions = json.loads(out)["instructions"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", default="all", help="cetvm.tests= for /init (default all)")
    parser.add_argument("--cpu", default=None, help="cetvm boot --cpu (default sapphire-rapids)")
    parser.add_argument("--smp", type=int, default=1, help="vCPUs for both (default 1)")
    parser.add_argument("--no-qemu", action="store_true", help="skip QEMU TCG")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    try:
        guest = linux_guest(with_selftest=True, download=False)
    except NotCached as exc:
        print(f"bench_linux: the Linux guest is not cached ({exc}); run 'cetvm linux-guest --selftest'",
              file=sys.stderr)
        return 2
    cmdline = guest.cmdline_for(tests=args.tests if args.tests in ("all", "none") else args.tests.split(","))
    options = ["--smp", str(args.smp)] + (["--cpu", args.cpu] if args.cpu else [])
    figures: dict[str, BootTime] = {"cetvm": cetvm_boot(guest, cmdline, options)}
    if not args.no_qemu and shutil.which(QEMU):
        figures["qemu_tcg"], _ = timed(guest.qemu_argv(cmdline) + ["-smp", str(args.smp)])
    if args.json:
        print(json.dumps({name: asdict(t) | {"mips": t.mips} for name, t in figures.items()}, indent=2))
        return 0
    for name, t in figures.items():
        if t.init_wall_s is not None:
            print(f"{name:9} boot to init:      {t.init_wall_s:6.1f} s wall, {t.init_cpu_s:6.1f} s CPU")
        extra = f", {t.instructions / 1e9:.2f} G instructions, {t.mips:.1f} MIPS" if t.instructions else ""
        print(f"{name:9} boot to power-off: {t.wall_s:6.1f} s wall, {t.cpu_s:6.1f} s CPU, status {t.status}{extra}")
    if "qemu_tcg" in figures:
        cetvm, qemu = figures["cetvm"], figures["qemu_tcg"]
        if cetvm.init_cpu_s and qemu.init_cpu_s:
            print(f"cetvm / QEMU TCG to init (CPU time): {cetvm.init_cpu_s / qemu.init_cpu_s:.1f} x")
        print(f"cetvm / QEMU TCG to power-off (CPU time): {cetvm.cpu_s / qemu.cpu_s:.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
