"""Benchmark: the call-heavy loop on the raw engine with CET off, the native CET block hook and
the Python CET block hook, at ring 0 (supervisor shadow stack) and ring 3 (user shadow stack).

    .venv/bin/python benchmarks/bench_native_cet.py [--iterations N] [--repeats R] [--clock cpu|wall] [--json]

Per iteration: 14 instructions in 5 translation blocks (a direct CALL and an indirect CALL
through RAX to two ENDBR64 functions, 2 RET, ALU work, DEC/JNZ), i.e. 2 shadow-stack pushes,
2 pops and 1 ENDBRANCH check. Each of R rounds runs every configuration once on a fresh machine,
in an order that alternates between rounds (the machines are shared and noisy); the best run and
the median are reported, and the native/off ratio of the best runs and of each round's pair.
Runs are timed by the thread's CPU time by default (preemption by other load does not count).
The Python path runs 1/100 of the iterations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from rawharness import ITERATIONS_PER_LOOP, RawHarness, call_loop_code

CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
PATHS = ("off", "native", "python")


def measure(cpl: int, path: str, iterations: int, clock: str = "cpu") -> float:
    """MIPS of one run on a fresh machine (its blocks translated and classified first)."""
    harness = RawHarness(call_loop_code(), cpl=cpl, path=path)
    harness.run(1000)  # translate every block once
    now = CLOCKS[clock]
    start = now()
    result = harness.run(iterations)
    elapsed = now() - start
    if result.fault is not None or result.rcx != 0:
        raise SystemExit(f"benchmark guest failed on the {path} path at CPL {cpl}: {result.fault}")
    return result.instructions / elapsed / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.iterations < 100 or args.repeats < 1:
        parser.error("--iterations must be at least 100 and --repeats at least 1")
    runs: dict[str, list[float]] = {}
    for round_ in range(args.repeats):
        for cpl in (0, 3):
            for path in PATHS if round_ % 2 == 0 else PATHS[::-1]:
                n = args.iterations // 100 if path == "python" else args.iterations
                runs.setdefault(f"cpl{cpl}_{path}", []).append(measure(cpl, path, n, args.clock))
    report: dict[str, object] = {"instructions_per_iteration": ITERATIONS_PER_LOOP, "iterations": args.iterations,
                                 "clock": args.clock, "repeats": args.repeats}
    for key, values in runs.items():
        report[key] = round(max(values), 1)
        report[f"{key}_median"] = round(statistics.median(values), 1)
    for cpl in (0, 3):
        native, off = runs[f"cpl{cpl}_native"], runs[f"cpl{cpl}_off"]
        report[f"cpl{cpl}_native_ratio"] = round(max(native) / max(off), 3)
        report[f"cpl{cpl}_native_ratio_paired_median"] = round(statistics.median(a / b for a, b in zip(native, off)), 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"best (median) of {args.repeats} runs, {args.clock} clock:")
        for cpl in (0, 3):
            print(f"CPL{cpl}: raw (CET off) {report[f'cpl{cpl}_off']:7.1f} ({report[f'cpl{cpl}_off_median']:7.1f}) MIPS   "
                  f"native CET {report[f'cpl{cpl}_native']:7.1f} ({report[f'cpl{cpl}_native_median']:7.1f}) MIPS "
                  f"(x{report[f'cpl{cpl}_native_ratio']:.2f}, pairs x{report[f'cpl{cpl}_native_ratio_paired_median']:.2f})"
                  f"   python CET {report[f'cpl{cpl}_python']:6.2f} MIPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
