"""Benchmark: Linux boot to power-off under `cetvm boot` and QEMU TCG (issues 10 and 13).

    .venv/bin/python benchmarks/bench_linux.py [--tests none|all] [--cpu MODEL] [--smp N]
                                               [--no-qemu] [--json]

The guest is the cached Linux guest of ``cetvm linux-guest --selftest`` (Debian's 6.12 cloud
kernel, busybox, our /init and CET programs, the kernel's shadow-stack selftest). cetvm runs it
with ``cetvm boot --kernel ... --initrd ... --append ...`` in a child process — the path users
run — and QEMU TCG (no CET: every shadow-stack test skips there) with the same kernel, initramfs
and command line, when ``qemu-system-x86_64`` is installed. Printed for each: wall-clock and CPU
time (user + system of the child), for cetvm also the guest instructions from reset to power-off
and MIPS; then the ratio cetvm / QEMU. A benchmark, not a test: the figures depend on the machine
and its load.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cetvm.linux import NotCached, linux_guest

QEMU = "qemu-system-x86_64"


@dataclass
class BootTime:
    wall_s: float
    cpu_s: float
    status: int
    instructions: int | None = None

    @property
    def mips(self) -> float | None:
        return None if self.instructions is None else self.instructions / self.cpu_s / 1e6


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str]) -> tuple[BootTime, str]:
    """Run ``argv``; its wall-clock and CPU time, exit status and stdout."""
    cpu0, wall0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    return BootTime(time.perf_counter() - wall0, _child_cpu() - cpu0, proc.returncode), proc.stdout


def cetvm_boot(guest, cmdline: str, options: list[str]) -> BootTime:
    with tempfile.TemporaryDirectory() as tmp:
        serial = Path(tmp) / "console.txt"
        result, out = timed([sys.executable, "-m", "cetvm", "boot", "--kernel", str(guest.kernel), "--initrd",
                             str(guest.initrd), "--append", cmdline, "--serial", str(serial), "--json", *options])
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
        extra = f", {t.instructions / 1e9:.2f} G instructions, {t.mips:.1f} MIPS" if t.instructions else ""
        print(f"{name:9} boot to power-off: {t.wall_s:6.1f} s wall, {t.cpu_s:6.1f} s CPU, status {t.status}{extra}")
    if "qemu_tcg" in figures:
        print(f"cetvm / QEMU TCG (CPU time): {figures['cetvm'].cpu_s / figures['qemu_tcg'].cpu_s:.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
