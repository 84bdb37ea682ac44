"""Benchmark: speed where users run it — a booted kernel under `cetvm boot`'s machine vs the
`cetvm bench` harness, QEMU TCG and Bochs (issue 13).

    .venv/bin/python benchmarks/bench_boot.py [--loop N] [--events N] [--repeats R] [--json]
                                              [--no-qemu] [--no-bochs]

The guest is guests/tests/bench.c (build: make -C guests): the 8-instruction bench loop
(CALL * -> ENDBR64; CALL * -> ENDBR64; RET -> RET; DEC; JNZ) at CPL0 with supervisor shadow
stacks and kernel IBT, in two page layouts — ``rwx2m`` (the first 4 MiB as two 2 MiB RWX pages:
code, data and stacks share pages) and ``nx`` (W^X: code read-only, data NX) — and two event
round trips with CET on: SYSCALL -> SYSRET from CPL3 with user shadow stacks, #PF -> IRETQ at
CPL0 with supervisor shadow stacks; and two port reads: the UART's line-status register (what a
Linux serial console polls: cetvm answers it next to the engine, a read-only PIO register of its
KVM) and its scratch register (an exit to the device model in userspace); and CPUID, an exit the
hypervisor handles itself (cetvm: KVM's exit fastpath next to the engine).

Every figure is a difference of two runs of the same kernel, one with N iterations and one with
a few, so boot and start-up cancel: MIPS = extra instructions / extra CPU time, ns per round
trip = extra CPU time / extra round trips; each is the median of ``--repeats`` pairs. cetvm runs
in this process (the machine `cetvm boot` builds, timed by the thread's CPU time); QEMU and Bochs
run as child processes (their CPU time, user + system). The harness figure is the same loop in `cetvm bench`'s
vCPU (cetvm.cli.bench.make_vcpu: no kernel, no run slices, native CET hook), in the same run.
Events run with CET on where the CPU has it (cetvm, Bochs' tigerlake model; not QEMU TCG). Ratios are
printed; a benchmark, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cetvm.cli.bench import make_vcpu
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO / "guests" / "build" / "tests" / "bench.elf"
BOOT_SECTOR = REPO / "benchmarks" / "bochs" / "bootsect.S"
LAYOUTS = ("rwx2m", "nx")
MEMORY_MB = 32
LOOP_INSNS = 8            # instructions of one loop iteration
BASE = 1000               # iterations / round trips of the baseline run of every pair
PASS_STATUS = 1           # the TAP kernels' isa-debug-exit status when every test passed
MB_MAGIC = 0x1BADB002


# ------------------------------------------------------------------ one run of each machine
@dataclass
class Run:
    seconds: float
    instructions: int | None  # None: the emulator does not report it


def cetvm_run(cmdline: str) -> Run:
    """Boot and run the kernel on the machine `cetvm boot` uses, timed by this thread's CPU time."""
    start = time.thread_time()
    machine = Machine.boot(KERNEL, MachineConfig(memory=f"{MEMORY_MB}M", cmdline=cmdline,
                                                 serial_sink=lambda _b: None))
    result = machine.run()
    seconds = time.thread_time() - start
    if result.status != PASS_STATUS:
        raise SystemExit(f"bench kernel failed under cetvm ({cmdline}): {result.reason.value}, status {result.status}")
    return Run(seconds, result.instructions)


def child_cpu_seconds(argv: list[str], cwd: Path | None = None) -> float:
    """CPU time (user + system) of a child process that must exit with the kernel's pass status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (PASS_STATUS, 0):
        tail = done.stdout.decode(errors="replace")[-400:]
        raise SystemExit(f"{argv[0]} failed with status {done.returncode}: {tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def qemu_run(cmdline: str) -> Run:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", f"{MEMORY_MB}M", "-display", "none", "-serial", "null",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-no-reboot", "-kernel", str(KERNEL),
            "-append", cmdline]
    return Run(child_cpu_seconds(argv), None)


# ------------------------------------------------------------------ Bochs (no multiboot loader)
def multiboot_image(kernel: bytes) -> tuple[bytes, int, int, int]:
    """(load image, load_addr, bss_end_addr, entry_addr) from the a.out kludge of a multiboot v1
    header in the first 8 KiB [Multiboot Specification 0.6.96, §3.1.1-3.1.3]."""
    for offset in range(0, min(len(kernel), 8192) - 32, 4):
        magic, flags, checksum = struct.unpack_from("<III", kernel, offset)
        if magic == MB_MAGIC and (magic + flags + checksum) & 0xFFFF_FFFF == 0 and flags & (1 << 16):
            header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", kernel, offset + 12)
            start = offset - (header_addr - load_addr)
            return kernel[start:start + load_end - load_addr], load_addr, bss_end, entry
    raise SystemExit(f"{KERNEL} has no multiboot header with load addresses")


def bochs_disk(path: Path, boot_sector: bytes, cmdline: str) -> None:
    """LBA 0: the boot sector; LBA 1: multiboot info, command line and the loader's parameters;
    LBA 2...: the load image (see benchmarks/bochs/bootsect.S). Padded to whole cylinders of
    16 heads x 63 sectors, the geometry Bochs gives a flat image."""
    image, load_addr, bss_end, entry = multiboot_image(KERNEL.read_bytes())
    sectors = -(-len(image) // 512)
    info = bytearray(512)
    struct.pack_into("<III", info, 0, 0x1 | 0x4, 639, (MEMORY_MB - 1) * 1024)  # flags: mem, cmdline
    struct.pack_into("<I", info, 16, 0x10000 + 0x100)
    struct.pack_into("<5I", info, 0x80, sectors, load_addr, len(image), bss_end, entry)
    text = cmdline.encode()[:255]
    info[0x100:0x100 + len(text)] = text
    disk = boot_sector + bytes(info) + image.ljust(sectors * 512, b"\0")
    cylinder = 16 * 63 * 512
    path.write_bytes(disk.ljust(-(-len(disk) // cylinder) * cylinder, b"\0"))


def build_boot_sector(workdir: Path) -> bytes:
    obj, binary = workdir / "bootsect.o", workdir / "bootsect.bin"
    subprocess.run(["gcc", "-c", "-m32", str(BOOT_SECTOR), "-o", str(obj)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7C00", "--oformat", "binary", str(obj), "-o", str(binary)],
                   check=True)
    return binary.read_bytes()


BOCHSRC = """\
megs: {megs}
cpu: model={model}, ips=100000000
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
ata0-master: type=disk, path={disk}, mode=flat
boot: disk
com1: enabled=1, mode=file, dev={serial}
display_library: rfb, options="timeout=0"
sound: driver=dummy
clock: sync=none
log: {log}
panic: action=fatal
error: action=report
"""


class Bochs:
    """Bochs 2.7 (Debian's build: no "nogui" display, so the VNC one that waits for nobody, and
    the debugger, told to continue) with the ``tigerlake`` CPU model, the one with CET (the kernel
    prints what CPUID shows). The run ends at the kernel's write of "Shutdown" to port 0x8900."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.boot_sector = build_boot_sector(workdir)
        self.serial = workdir / "serial.txt"

    def run(self, cmdline: str) -> Run:
        disk = self.workdir / "disk.img"
        bochs_disk(disk, self.boot_sector, cmdline)
        rc = self.workdir / "bochsrc"
        rc.write_text(BOCHSRC.format(megs=MEMORY_MB, model="tigerlake", disk=disk, serial=self.serial,
                                     log=self.workdir / "bochs.log"))
        commands = self.workdir / "debugger"
        commands.write_text("c\nq\n")
        seconds = child_cpu_seconds(["bochs", "-q", "-f", str(rc), "-rc", str(commands)], cwd=self.workdir)
        out = self.serial.read_text(errors="replace")
        if "# 0 failed" not in out:
            raise SystemExit(f"bench kernel failed under Bochs ({cmdline}): {out[-400:]}")
        return Run(seconds, None)

    def cet_line(self) -> str:
        return next((line for line in self.serial.read_text(errors="replace").splitlines()
                     if line.startswith("# shstk")), "?")


# ------------------------------------------------------------------ the harness, same loop
def harness_loop(iterations: int) -> bytes:
    """The bench kernel's loop as `cetvm bench`'s harness runs code (cetvm.cli.bench.make_vcpu:
    4 KiB pages, code RX, data NX, CPL0, supervisor shadow stack, IBT): ENDBR64; MOV ECX, N;
    LEA R11, inner; LEA RAX, outer; loop: CALL RAX; DEC ECX; JNZ loop; HLT; outer: ENDBR64;
    CALL R11; RET; inner: ENDBR64; RET."""
    endbr = bytes.fromhex("f30f1efa")
    head = endbr + b"\xb9" + struct.pack("<I", iterations)
    lea_at = len(head)
    loop_at = lea_at + 14
    tail = b"\xff\xd0" + b"\xff\xc9" + b"\x75" + struct.pack("<b", -(2 + 2 + 2)) + b"\xf4"
    outer_at = loop_at + len(tail)
    outer = endbr + b"\x41\xff\xd3" + b"\xc3"               # call *%r11; ret
    inner_at = outer_at + len(outer)
    lea_r11 = b"\x4c\x8d\x1d" + struct.pack("<i", inner_at - (lea_at + 7))
    lea_rax = b"\x48\x8d\x05" + struct.pack("<i", outer_at - (lea_at + 14))
    return head + lea_r11 + lea_rax + tail + outer + endbr + b"\xc3"


def harness_mips(iterations: int) -> float:
    """MIPS of the loop in `cetvm bench`'s harness (no kernel, no slices: one run, no budget)."""
    vcpu = make_vcpu(iterations, cet=True, cet_path="native", code=harness_loop(iterations))
    start = time.thread_time()
    exit_ = vcpu.run()
    seconds = time.thread_time() - start
    if exit_.reason.name != "HLT" or vcpu.reg("rcx") != 0:
        raise SystemExit(f"harness loop stopped unexpectedly: {exit_}")
    return (5 + LOOP_INSNS * iterations) / seconds / 1e6


# ------------------------------------------------------------------ figures
def paired(run: Callable[[str], Run], cmdline: Callable[[int], str], n: int, repeats: int,
           per_unit: Callable[[Run, Run, int], float]) -> float:
    """Median over ``repeats`` of per_unit(base run, big run, n - BASE)."""
    values = []
    for _ in range(repeats):
        base, big = run(cmdline(BASE)), run(cmdline(n))
        values.append(per_unit(base, big, n - BASE))
    return statistics.median(values)


def loop_mips(base: Run, big: Run, extra: int) -> float:
    instructions = (big.instructions - base.instructions) if big.instructions is not None else extra * LOOP_INSNS
    return instructions / max(big.seconds - base.seconds, 1e-9) / 1e6


def round_trip_ns(base: Run, big: Run, extra: int) -> float:
    return (big.seconds - base.seconds) / extra * 1e9


#: Round trips of each event under QEMU and Bochs, per round trip under cetvm (since cetvm delivers
#: SYSCALL/SYSRET, #PF and IRETQ natively, all take well under a microsecond: the same count).
FAST_EVENTS = 1
#: Port reads under QEMU and Bochs per read under cetvm: theirs take ~100 ns, cetvm's exits to
#: its Python device model take ~100 us, so the same count would drown theirs in start-up noise.
FAST_PORTS = 50


def measure_machine(name: str, run: Callable[[str], Run], loop: int, events: int, ports: int, repeats: int,
                    figures: dict[str, float]) -> None:
    for layout in LAYOUTS:
        figures[f"{name}_loop_{layout}_mips"] = paired(run, lambda k, p=layout: f"pages={p} loop={k}", loop, repeats,
                                                       loop_mips)
    for event, count in (("syscalls", events), ("faults", events), ("ports", ports), ("scratch", ports),
                         ("cpuid", ports)):
        figures[f"{name}_{event}_ns"] = paired(run, lambda k, e=event: f"{e}={k}", count, repeats, round_trip_ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", type=int, default=10_000_000, help="loop iterations (default 10M = 80M instructions)")
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="round trips of each event (default 1000000: a round trip takes well under 1 us)")
    parser.add_argument("--ports", type=int, default=20_000,
                        help="reads of the UART's line status register (cetvm answers them next to the engine), "
                             "of its scratch register (each an exit to the device model) and CPUIDs (each an "
                             "exit the hypervisor handles), each (default 20000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--no-bochs", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if min(args.loop, args.events, args.ports) <= BASE or args.repeats < 1:
        parser.error(f"--loop, --events and --ports must exceed {BASE}, --repeats must be at least 1")
    if not KERNEL.is_file():
        parser.error(f"{KERNEL} is missing: make -C guests")
    figures: dict[str, float] = {}
    notes: list[str] = []
    # the event round trips are measured with the engine's native delivery, the default
    # (cetvm.cpu.native.native_events_requested); CETVM_NATIVE_EVENTS=0 measures Python's
    # (then pass a smaller --events: a Python round trip takes hundreds of microseconds)
    if os.environ.get("CETVM_NATIVE_EVENTS") == "0":
        notes.append("cetvm events: Python delivery (CETVM_NATIVE_EVENTS=0)")
    figures["harness_mips"] = statistics.median(harness_mips(args.loop) for _ in range(args.repeats))
    measure_machine("cetvm", cetvm_run, args.loop, args.events, args.ports, args.repeats, figures)
    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        measure_machine("qemu", qemu_run, args.loop, args.events * FAST_EVENTS, args.ports * FAST_PORTS,
                        args.repeats, figures)
        notes.append("QEMU TCG: no CET (its CPU models have neither SHSTK nor IBT)")
    if not args.no_bochs and shutil.which("bochs"):
        with tempfile.TemporaryDirectory(prefix="cetvm-bochs-") as tmp:
            bochs = Bochs(Path(tmp))
            # Bochs runs ~30-50 MIPS: a tenth of the loop keeps its runs in seconds
            measure_machine("bochs", bochs.run, max(args.loop // 10, BASE + 1), args.events * FAST_EVENTS,
                            args.ports * FAST_PORTS, args.repeats, figures)
            notes.append(f"Bochs 2.7, cpu model tigerlake: {bochs.cet_line()}")
    for layout in LAYOUTS:
        boot = figures[f"cetvm_loop_{layout}_mips"]
        figures[f"ratio_boot_{layout}_vs_harness"] = boot / figures["harness_mips"]
        for other in ("qemu", "bochs"):
            if f"{other}_loop_{layout}_mips" in figures:
                figures[f"ratio_boot_{layout}_vs_{other}"] = boot / figures[f"{other}_loop_{layout}_mips"]
    if args.json:
        print(json.dumps({"figures": {k: round(v, 3) for k, v in figures.items()}, "notes": notes,
                          "loop": args.loop, "events": args.events, "ports": args.ports, "repeats": args.repeats}))
        return 0
    print(f"harness (the loop in cetvm bench's vCPU, native):  {figures['harness_mips']:8.1f} MIPS")
    for name in ("cetvm", "qemu", "bochs"):
        for layout in LAYOUTS:
            key = f"{name}_loop_{layout}_mips"
            if key in figures:
                print(f"{name:5s} boot, bench loop, pages {layout:5s}:            {figures[key]:8.1f} MIPS")
        for event, label in (("syscalls", "SYSCALL->SYSRET"), ("faults", "#PF->IRETQ    "), ("ports", "IN UART LSR   "),
                             ("scratch", "IN UART SCR   "), ("cpuid", "CPUID (exit)  ")):
            key = f"{name}_{event}_ns"
            if key in figures:
                print(f"{name:5s} {label} round trip:                 {figures[key]:10.0f} ns")
    for key, value in figures.items():
        if key.startswith("ratio_"):
            print(f"{key[6:]:32s} {value:6.2f}")
    for note in notes:
        print(f"note: {note}")
    print(f"(medians of {args.repeats} pairs; CPU time; every figure from this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
