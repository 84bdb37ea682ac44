"""Benchmark: the call-heavy loop on the raw engine with CET off, the native CET block hook and
the Python CET block hook, at ring 0 (supervisor shadow stack) and ring 3 (user shadow stack).

    .venv/bin/python benchmarks/bench_native_cet.py [--iterations N] [--repeats R] [--json]

Per iteration: 14 instructions in 5 translation blocks (a direct CALL and an indirect CALL
through RAX to two ENDBR64 functions, 2 RET, ALU work, DEC/JNZ), i.e. 2 shadow-stack pushes,
2 pops and 1 ENDBRANCH check. Runs are interleaved and the best of R is reported (the machines
are shared and noisy). The Python path runs 1/100 of the iterations.
"""

from __future__ import annotations

import argparse
import json
import sys

from cetvm.cpu.native.rawharness import ITERATIONS_PER_LOOP, RawHarness, call_loop_code


def measure(cpl: int, path: str, iterations: int) -> float:
    harness = RawHarness(call_loop_code(), cpl=cpl, path=path)
    harness.run(1000)  # translate every block once
    result = harness.run(iterations)
    if result.fault is not None or result.rcx != 0:
        raise SystemExit(f"benchmark guest failed on the {path} path at CPL {cpl}: {result.fault}")
    return result.mips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for cpl in (0, 3):
            for path in ("off", "native", "python"):
                n = args.iterations // 100 if path == "python" else args.iterations
                key = f"cpl{cpl}_{path}"
                best[key] = max(best.get(key, 0.0), measure(cpl, path, n))
    report = {"instructions_per_iteration": ITERATIONS_PER_LOOP, "iterations": args.iterations,
              **{k: round(v, 1) for k, v in best.items()}}
    for cpl in (0, 3):
        report[f"cpl{cpl}_native_ratio"] = round(best[f"cpl{cpl}_native"] / best[f"cpl{cpl}_off"], 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for cpl in (0, 3):
            print(f"CPL{cpl}: raw (CET off) {best[f'cpl{cpl}_off']:7.1f} MIPS   native CET {best[f'cpl{cpl}_native']:7.1f} MIPS"
                  f" (x{report[f'cpl{cpl}_native_ratio']:.2f})   python CET {best[f'cpl{cpl}_python']:6.2f} MIPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
