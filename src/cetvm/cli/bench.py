"""`cetvm bench`: emulated MIPS of a call-heavy loop with CET on and with CET off, ring 0 and ring 3.

The workload (built here, our own machine code): N iterations of a direct CALL and an indirect
CALL to ENDBR64 functions (11 instructions per iteration, 5 translation blocks). CET on: a
traced vCPU with shadow stacks and IBT — at ring 0 supervisor shadow stacks (S_CET =
SH_STK_EN | ENDBR_EN), at ring 3 user shadow stacks (U_CET, user pages) — measured on both CET
paths: the native block hook (:mod:`cetvm.cpu.native`, if built) and the Python block hook
(ring 0 only). CET off: an untraced vCPU (no block hook), raw engine speed. At ring 3 the final
HLT raises #GP, which the benchmark intercepts (exception bitmap) as its end. A benchmark, not a
test: the figures depend on the machine.

Robust figures on shared, noisy machines: each of the ``--repeats`` rounds runs, per ring, the
native CET path and CET off back to back on fresh vCPUs (alternating which goes first), so both
see the same machine load; the headline figures are the best run of each, and the distribution
(min / median / best) and the ratio of each round's pair are reported too. Runs are timed by
the emulating thread's CPU time (``--clock cpu``, the default: time the thread spends preempted
by other processes does not count, cache and SMT sharing still do; on an idle machine it equals
wall-clock time) or by wall-clock time (``--clock wall``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import time
from dataclasses import dataclass, field

from cetvm import CetvmError, InputError
from cetvm.arch import ENDBR64, CetCtl, Msr
from cetvm.cpu.bootstrap import (
    build_identity_map, code_page_flags, data_page_flags, enter_long_mode, shadow_stack_page_flags, table_pages,
)
from cetvm.arch import Pte, Vector, VmcsField
from cetvm.cpu.exits import ExitReason
from cetvm.cpu.state import Segment
from cetvm.cpu.vcpu import Vcpu
from cetvm.cpu.native import native_available
from cetvm.cpuid import get_model

MODEL = "sapphire-rapids"
RAM = 2 << 20
TABLES = 0x1000
GDT = 0x10000
CODE = 0x20000
SHADOW_STACK = 0x30000
STACK_TOP = 0x80000
INSNS_PER_ITERATION = 11
INSNS_OUTSIDE_LOOP = 2  # endbr64, mov ecx
HLT_OFFSET = 0x1B  # offset of the HLT in workload()


def workload(iterations: int) -> bytes:
    """The loop at CODE (see the module docstring); ends with HLT."""
    if not 0 < iterations < 1 << 31:
        raise InputError(f"--iterations must be between 1 and {(1 << 31) - 1}, got {iterations}")
    head = ENDBR64 + b"\xb9" + struct.pack("<I", iterations)          # endbr64; mov ecx, N
    loop_at = len(head)
    # loop: call f1; lea rax,[rip+f2]; call rax; dec ecx; jnz loop; hlt
    body_len = 5 + 7 + 2 + 2 + 2 + 1
    f1_at = loop_at + body_len
    f2_at = f1_at + 9
    call_f1 = b"\xe8" + struct.pack("<i", f1_at - (loop_at + 5))
    lea_f2 = b"\x48\x8d\x05" + struct.pack("<i", f2_at - (loop_at + 12))
    tail = b"\xff\xd0" + b"\xff\xc9" + b"\x75" + struct.pack("<b", loop_at - (loop_at + 18)) + b"\xf4"
    f1 = ENDBR64 + bytes.fromhex("4883c201") + b"\xc3"                 # add rdx, 1; ret
    f2 = ENDBR64 + bytes.fromhex("4883c601") + b"\xc3"                 # add rsi, 1; ret
    return head + call_f1 + lea_f2 + tail + f1 + f2


def instruction_count(iterations: int) -> int:
    """Instructions the workload executes before its HLT."""
    return INSNS_OUTSIDE_LOOP + INSNS_PER_ITERATION * iterations


#: Ring-3 selectors in bootstrap.FLAT_GDT: data DPL3 (index 3), 64-bit code DPL3 (index 4).
USER_DS = 0x1B
USER_CS = 0x23
RINGS = (0, 3)


def page_flags(addr: int, user: bool = False) -> int:
    if addr == 0:
        return 0
    us = int(Pte.US) if user else 0
    if CODE <= addr < CODE + 0x1000:
        return code_page_flags() | us
    if addr == SHADOW_STACK:
        return shadow_stack_page_flags(user=user)
    return data_page_flags() | us


def enter_ring3(vcpu: Vcpu) -> None:
    """Flat 64-bit ring-3 segments (CPL 3 follows SS.DPL / CS.DPL)."""
    sregs = vcpu.get_sregs()
    sregs.cs = Segment.code64(USER_CS, dpl=3)
    sregs.ss = sregs.ds = sregs.es = Segment.data(USER_DS, dpl=3)
    vcpu.set_sregs(sregs)


def make_vcpu(iterations: int, cet: bool, cet_path: str | None = None, cpl: int = 0, code: bytes | None = None) -> Vcpu:
    """The workload's vCPU at ``cpl`` 0 (supervisor shadow stack) or 3 (user shadow stack);
    ``code``: other machine code to run at CODE instead (one page at most, e.g. the boot
    benchmark's loop, benchmarks/bench_boot.py)."""
    if cpl not in RINGS:
        raise InputError(f"ring must be 0 or 3, not {cpl}")
    user = cpl == 3
    vcpu = Vcpu(get_model(MODEL), trace=cet, cet_path=cet_path if cet else None)
    vcpu.map_ram(0, RAM)
    assert TABLES + table_pages(RAM) <= GDT
    cr3 = build_identity_map(vcpu, TABLES, RAM, lambda addr: page_flags(addr, user))
    vcpu.write_phys(CODE, workload(iterations) if code is None else code)
    enter_long_mode(vcpu, cr3=cr3, gdt=GDT, cet=cet)
    if user:
        enter_ring3(vcpu)
        # the final HLT at CPL 3: #GP(0) ends the run (an exception-bitmap exit)
        vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, vcpu.vmcs.read(VmcsField.EXCEPTION_BITMAP) | 1 << Vector.GP)
    if cet:
        vcpu.set_msr(Msr.IA32_U_CET if user else Msr.IA32_S_CET, int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN))
        vcpu.ssp = SHADOW_STACK + 0x1000
    vcpu.set_reg("rsp", STACK_TOP)
    vcpu.rip = CODE
    return vcpu


def _ended_at_hlt(exit_, cpl: int) -> bool:
    if exit_.rip != CODE + HLT_OFFSET:
        return False
    if cpl == 0:
        return exit_.reason == ExitReason.HLT
    return (exit_.reason == ExitReason.EXCEPTION and exit_.exception is not None
            and exit_.exception.vector == Vector.GP)


@dataclass
class BenchResult:
    cet_on_python_mips: float
    cet_on_native_mips: float | None  # None: the native fast path is not built
    cet_off_mips: float
    instructions: int
    cet_on_native_ring3_mips: float | None = None  # ring 3, user shadow stacks
    cet_off_ring3_mips: float | None = None
    #: every run's MIPS in run order, by configuration: "native_ring0", "off_ring0", "native_ring3",
    #: "off_ring3" (round i of the native and off lists of a ring ran back to back)
    samples: dict[str, list[float]] = field(default_factory=dict)
    clock: str = "cpu"

    def distribution(self) -> dict[str, dict[str, float]]:
        """min / median / max MIPS and the number of runs of each configuration."""
        return {name: {"min": min(runs), "median": statistics.median(runs), "max": max(runs), "runs": len(runs)}
                for name, runs in self.samples.items() if runs}

    def paired_shares(self, ring: int) -> list[float]:
        """Native CET on / CET off of each round at ``ring`` (the two ran back to back)."""
        native, off = self.samples.get(f"native_ring{ring}", []), self.samples.get(f"off_ring{ring}", [])
        return [on / base for on, base in zip(native, off) if base]

    @property
    def cet_on_mips(self) -> float:
        """CET on with the best available path (native when built)."""
        return self.cet_on_native_mips if self.cet_on_native_mips is not None else self.cet_on_python_mips

    @property
    def ratio(self) -> float:
        return self.cet_off_mips / self.cet_on_mips if self.cet_on_mips else float("inf")

    @staticmethod
    def _share(on: float | None, off: float | None) -> float | None:
        return None if on is None or not off else on / off

    @property
    def native_share(self) -> float | None:
        """Native CET-on speed as a fraction of the CET-off speed, ring 0 (None: not built)."""
        return self._share(self.cet_on_native_mips, self.cet_off_mips)

    @property
    def native_share_ring3(self) -> float | None:
        """The same at ring 3 (user shadow stacks)."""
        return self._share(self.cet_on_native_ring3_mips, self.cet_off_ring3_mips)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def measure(iterations: int, cet: bool, cet_path: str | None = None, cpl: int = 0, clock: str = "cpu") -> float:
    """MIPS of one run of the workload (set-up excluded), by wall-clock or thread CPU time."""
    if clock not in CLOCKS:
        raise InputError(f"clock must be one of {', '.join(CLOCKS)}, not {clock!r}")
    now = CLOCKS[clock]
    vcpu = make_vcpu(iterations, cet, cet_path, cpl)
    start = now()
    exit_ = vcpu.run()
    elapsed = now() - start
    if not _ended_at_hlt(exit_, cpl):
        raise CetvmError(f"benchmark guest stopped unexpectedly: {exit_}")
    if vcpu.reg("rdx") != iterations or vcpu.reg("rsi") != iterations:
        raise CetvmError("benchmark guest computed a wrong result")
    return instruction_count(iterations) / elapsed / 1e6


def run_bench(iterations: int, off_iterations: int | None = None, repeats: int = 3,
              clock: str = "cpu") -> BenchResult:
    """Python CET path (ring 0) with ``iterations``; native CET path and CET off at ring 0 and
    ring 3 with ``off_iterations`` (default 100× more: they are fast) in ``repeats`` rounds; in
    each round and ring the native and off runs go back to back, alternating which runs first
    (the machines are shared and noisy). Headline figures: the best run of each configuration;
    all runs are in :attr:`BenchResult.samples`. The native path is skipped when it is not built."""
    if repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {repeats}")
    if clock not in CLOCKS:
        raise InputError(f"--clock must be one of {', '.join(CLOCKS)}, not {clock!r}")
    off_iterations = off_iterations or iterations * 100
    python = measure(iterations, cet=True, cet_path="python", clock=clock)
    kinds = ("native", "off") if native_available() else ("off",)
    samples: dict[str, list[float]] = {f"{kind}_ring{cpl}": [] for cpl in RINGS for kind in kinds}
    for round_ in range(repeats):
        for cpl in RINGS:
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                samples[f"{kind}_ring{cpl}"].append(
                    measure(off_iterations, cet=kind == "native", cet_path="native", cpl=cpl, clock=clock))
    best = {name: max(runs) for name, runs in samples.items()}
    runs = sum(len(r) for r in samples.values())
    instructions = instruction_count(iterations) + instruction_count(off_iterations) * runs
    return BenchResult(python, best.get("native_ring0"), best["off_ring0"], instructions,
                       best.get("native_ring3"), best["off_ring3"], samples, clock)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure emulated MIPS with CET on and off",
                                   description=(
                                       "Measure emulated MIPS of a call-heavy loop (direct and indirect calls to "
                                       "ENDBR64 functions) with CET on — native block hook and Python block hook — "
                                       "and with CET off (the raw engine), at ring 0 (supervisor shadow stacks) and "
                                       "ring 3 (user shadow stacks). A benchmark, not a test: figures vary with load."))
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--iterations", type=int, default=100_000, metavar="N",
                        help="loop iterations on the Python CET path (native CET and CET off run 100x more); "
                             "default 100000")
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="rounds of interleaved native CET and CET-off runs per ring; the best run is the "
                             "headline figure, the distribution is reported too (default 3)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="how runs are timed: 'cpu' = the emulating thread's CPU time (default; robust "
                             "against other load on the machine) or 'wall' = wall clock")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run_bench(args.iterations, repeats=args.repeats, clock=args.clock)

    def r3(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    native = r3(result.cet_on_native_mips)
    if args.json:
        print(json.dumps({"cet_on_mips": round(result.cet_on_mips, 3), "cet_off_mips": round(result.cet_off_mips, 3),
                          "ratio": round(result.ratio, 3), "instructions": result.instructions,
                          "cet_on_native_mips": native, "cet_on_python_mips": round(result.cet_on_python_mips, 3),
                          "cet_on_native_ring3_mips": r3(result.cet_on_native_ring3_mips),
                          "cet_off_ring3_mips": r3(result.cet_off_ring3_mips),
                          "native_share": r3(result.native_share), "native_share_ring3": r3(result.native_share_ring3),
                          "clock": result.clock, "repeats": args.repeats,
                          "samples": {k: [round(v, 3) for v in runs] for k, runs in result.samples.items()},
                          "paired_native_share": {f"ring{cpl}": [round(v, 3) for v in result.paired_shares(cpl)]
                                                  for cpl in RINGS}}))
    else:
        if native is None:
            print("CET on  (native block hook):                      not built (python -m cetvm.cpu.native.build)")
        else:
            print(f"CET on  (native block hook, shadow stacks + IBT): {result.cet_on_native_mips:8.2f} MIPS   "
                  f"ring 3: {result.cet_on_native_ring3_mips:8.2f} MIPS")
        print(f"CET on  (Python block hook, shadow stacks + IBT): {result.cet_on_python_mips:8.2f} MIPS")
        print(f"CET off (raw engine, no block hook):              {result.cet_off_mips:8.2f} MIPS   "
              f"ring 3: {result.cet_off_ring3_mips:8.2f} MIPS")
        print(f"ratio off/on (best CET path): {result.ratio:.2f}x   instructions: {result.instructions}")
        if native is not None:
            print(f"native CET on / CET off: ring 0 {result.native_share:.2f}, ring 3 {result.native_share_ring3:.2f}")
        print(f"runs ({result.clock} clock), MIPS min / median / best:")
        for name, d in result.distribution().items():
            print(f"  {name:13s} {d['min']:8.2f} {d['median']:8.2f} {d['max']:8.2f}   ({d['runs']} runs)")
        for cpl in RINGS if native is not None else ():
            shares = result.paired_shares(cpl)
            print(f"  native/off, each round's pair, ring {cpl}: median {statistics.median(shares):.2f} "
                  f"(min {min(shares):.2f}, max {max(shares):.2f})")
    return 0
