"""`cetvm bench`: emulated MIPS of a call-heavy ring-0 loop with CET on and with CET off.

The workload (built here, our own machine code): N iterations of a direct CALL and an indirect
CALL to ENDBR64 functions (11 instructions per iteration, 4 translation blocks). CET on: a
traced vCPU with supervisor shadow stacks and IBT (S_CET = SH_STK_EN | ENDBR_EN, CR4.CET),
measured on both CET paths — the native block hook (:mod:`cetvm.cpu.native`, if built) and the
Python block hook. CET off: an untraced vCPU (no block hook), raw engine speed.
A benchmark, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from dataclasses import dataclass

from cetvm import CetvmError, InputError
from cetvm.arch import CetCtl, Msr
from cetvm.cpu.bootstrap import (
    build_identity_map, code_page_flags, data_page_flags, enter_long_mode, shadow_stack_page_flags, table_pages,
)
from cetvm.cpu.exits import ExitReason
from cetvm.cpu.vcpu import Vcpu

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
    endbr = bytes.fromhex("f30f1efa")
    head = endbr + b"\xb9" + struct.pack("<I", iterations)          # endbr64; mov ecx, N
    loop_at = len(head)
    # loop: call f1; lea rax,[rip+f2]; call rax; dec ecx; jnz loop; hlt
    body_len = 5 + 7 + 2 + 2 + 2 + 1
    f1_at = loop_at + body_len
    f2_at = f1_at + 9
    call_f1 = b"\xe8" + struct.pack("<i", f1_at - (loop_at + 5))
    lea_f2 = b"\x48\x8d\x05" + struct.pack("<i", f2_at - (loop_at + 12))
    tail = b"\xff\xd0" + b"\xff\xc9" + b"\x75" + struct.pack("<b", loop_at - (loop_at + 18)) + b"\xf4"
    f1 = endbr + bytes.fromhex("4883c201") + b"\xc3"                 # add rdx, 1; ret
    f2 = endbr + bytes.fromhex("4883c601") + b"\xc3"                 # add rsi, 1; ret
    return head + call_f1 + lea_f2 + tail + f1 + f2


def instruction_count(iterations: int) -> int:
    """Instructions the workload executes before its HLT."""
    return INSNS_OUTSIDE_LOOP + INSNS_PER_ITERATION * iterations


def page_flags(addr: int) -> int:
    if addr == 0:
        return 0
    if CODE <= addr < CODE + 0x1000:
        return code_page_flags()
    if addr == SHADOW_STACK:
        return shadow_stack_page_flags()
    return data_page_flags()


def make_vcpu(iterations: int, cet: bool, cet_path: str | None = None) -> Vcpu:
    from cetvm.cpuid import get_model

    vcpu = Vcpu(get_model(MODEL), trace=cet, cet_path=cet_path if cet else None)
    vcpu.map_ram(0, RAM)
    assert TABLES + table_pages(RAM) <= GDT
    cr3 = build_identity_map(vcpu, TABLES, RAM, page_flags)
    vcpu.write_phys(CODE, workload(iterations))
    enter_long_mode(vcpu, cr3=cr3, gdt=GDT, cet=cet)
    if cet:
        vcpu.set_msr(Msr.IA32_S_CET, int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN))
        vcpu.ssp = SHADOW_STACK + 0x1000
    vcpu.set_reg("rsp", STACK_TOP)
    vcpu.rip = CODE
    return vcpu


@dataclass
class BenchResult:
    cet_on_python_mips: float
    cet_on_native_mips: float | None  # None: the native fast path is not built
    cet_off_mips: float
    instructions: int

    @property
    def cet_on_mips(self) -> float:
        """CET on with the best available path (native when built)."""
        return self.cet_on_native_mips if self.cet_on_native_mips is not None else self.cet_on_python_mips

    @property
    def ratio(self) -> float:
        return self.cet_off_mips / self.cet_on_mips if self.cet_on_mips else float("inf")


def measure(iterations: int, cet: bool, cet_path: str | None = None) -> float:
    """MIPS of one run of the workload (set-up excluded)."""
    vcpu = make_vcpu(iterations, cet, cet_path)
    start = time.perf_counter()
    exit_ = vcpu.run()
    elapsed = time.perf_counter() - start
    if exit_.reason != ExitReason.HLT or exit_.rip != CODE + HLT_OFFSET:
        raise CetvmError(f"benchmark guest stopped unexpectedly: {exit_}")
    if vcpu.reg("rdx") != iterations or vcpu.reg("rsi") != iterations:
        raise CetvmError("benchmark guest computed a wrong result")
    return instruction_count(iterations) / elapsed / 1e6


def run_bench(iterations: int, off_iterations: int | None = None) -> BenchResult:
    """Python CET path with ``iterations``; native CET path and CET off with ``off_iterations``
    (default 100× more: they are fast). The native path is skipped when it is not built."""
    from cetvm.cpu.native import native_available

    off_iterations = off_iterations or iterations * 100
    python = measure(iterations, cet=True, cet_path="python")
    native = measure(off_iterations, cet=True, cet_path="native") if native_available() else None
    off = measure(off_iterations, cet=False)
    instructions = instruction_count(iterations) + instruction_count(off_iterations) * (2 if native else 1)
    return BenchResult(python, native, off, instructions)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure emulated MIPS with CET on and off",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--iterations", type=int, default=100_000,
                        help="loop iterations on the Python CET path (native CET and CET off run 100x more); "
                             "default 100000")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run_bench(args.iterations)
    native = None if result.cet_on_native_mips is None else round(result.cet_on_native_mips, 3)
    if args.json:
        print(json.dumps({"cet_on_mips": round(result.cet_on_mips, 3), "cet_off_mips": round(result.cet_off_mips, 3),
                          "ratio": round(result.ratio, 3), "instructions": result.instructions,
                          "cet_on_native_mips": native, "cet_on_python_mips": round(result.cet_on_python_mips, 3)}))
    else:
        if native is None:
            print("CET on  (native block hook):                      not built (python -m cetvm.cpu.native.build)")
        else:
            print(f"CET on  (native block hook, shadow stacks + IBT): {result.cet_on_native_mips:8.2f} MIPS")
        print(f"CET on  (Python block hook, shadow stacks + IBT): {result.cet_on_python_mips:8.2f} MIPS")
        print(f"CET off (raw engine, no block hook):              {result.cet_off_mips:8.2f} MIPS")
        print(f"ratio off/on (best CET path): {result.ratio:.2f}x   instructions: {result.instructions}")
    return 0
