"""`cetvm boot IMAGE`: run a bare-metal kernel on the cetvm PC (QEMU-compatible exit status).

Serial output (COM1) goes to stdout, or to ``--serial FILE``. The exit status is the machine's
(:mod:`cetvm.vmm.run_loop`): isa-debug-exit's ``(code << 1) | 1`` & 0xFF, 0 for power off / halt
/ a saved snapshot, 124 on a timeout or instruction limit, 125 on a triple fault, 126 on a KVM
internal error; a failed run also prints a one-line diagnosis on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import BinaryIO, Callable

from cetvm import InputError
from cetvm.vmm.config import DEFAULT_CPU_MODEL, CetMode, MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import RunResult


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "boot", help="boot a multiboot or ELF64 kernel on the cetvm PC",
        description="Boot a bare-metal kernel (multiboot v1 or ELF64) with COM1 on stdout. The exit "
                    "status follows QEMU's isa-debug-exit ((code << 1) | 1); 124 timeout or instruction "
                    "limit, 125 triple fault, 126 internal error.")
    p.add_argument("image", nargs="?", help="kernel image (omit with --restore-state)")
    p.add_argument("--cpu", default=None, metavar="MODEL",
                   help=f"host CPU model or CPUID dump file (default {DEFAULT_CPU_MODEL})")
    p.add_argument("--cet", default=None, choices=[m.value for m in CetMode],
                   help="CET features the guest CPUID shows (default on)")
    p.add_argument("--memory", "-m", default=None, metavar="SIZE", help="RAM size, e.g. 256M (default)")
    p.add_argument("--append", default="", metavar="CMDLINE", help="kernel command line")
    p.add_argument("--initrd", action="append", default=[], metavar="FILE",
                   help="multiboot module (repeatable; the first is the initrd)")
    p.add_argument("--timeout", type=_positive_float, metavar="S", help="wall-clock limit in seconds")
    p.add_argument("--max-instructions", type=_positive_int, metavar="N", help="instruction limit")
    p.add_argument("--serial", metavar="FILE", help="write the serial output to FILE instead of stdout")
    p.add_argument("--save-state", metavar="FILE", help="write a snapshot at the end (or at --save-at)")
    p.add_argument("--save-at", type=_positive_int, metavar="N",
                   help="with --save-state: stop after N instructions and save")
    p.add_argument("--restore-state", metavar="FILE", help="continue a snapshot instead of booting IMAGE")
    p.add_argument("--json", action="store_true", help="print a JSON result object at the end")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.restore_state:
        if args.image:
            raise InputError("give either IMAGE or --restore-state, not both")
        given = [f"--{name.replace('_', '-')}" for name in ("cpu", "cet", "memory") if getattr(args, name) is not None]
        if given or args.append or args.initrd:
            raise InputError(f"{', '.join(given + (['--append'] if args.append else []) + (['--initrd'] if args.initrd else []))}"
                             " cannot be combined with --restore-state (the snapshot holds the machine config)")
    elif not args.image:
        raise InputError("missing IMAGE (a kernel to boot) or --restore-state FILE")
    if args.save_at is not None and not args.save_state:
        raise InputError("--save-at needs --save-state FILE")


def _open_sink(args: argparse.Namespace, captured: bytearray | None) -> tuple[Callable[[bytes], None], BinaryIO | None]:
    if args.serial:
        try:
            handle = open(args.serial, "wb")
        except OSError as exc:
            raise InputError(f"--serial '{args.serial}': {exc.strerror or exc}") from None

        def to_file(data: bytes) -> None:
            handle.write(data)
        return to_file, handle
    if captured is not None:
        return captured.extend, None
    out = sys.stdout.buffer

    def to_stdout(data: bytes) -> None:
        out.write(data)
        out.flush()
    return to_stdout, None


def build_machine(args: argparse.Namespace, sink: Callable[[bytes], None]) -> Machine:
    if args.restore_state:
        return Machine.restore(args.restore_state, serial_sink=sink)
    config = MachineConfig(cpu=args.cpu or DEFAULT_CPU_MODEL, memory=args.memory or "256M",
                           cet=args.cet or "on", cmdline=args.append, modules=tuple(args.initrd),
                           serial_sink=sink)
    return Machine.boot(args.image, config)


def report(result: RunResult, args: argparse.Namespace, captured: bytearray | None) -> None:
    if result.reason.is_failure:
        print(f"cetvm: {result.diagnosis()}", file=sys.stderr)
    if args.json:
        doc = result.to_json()
        if captured is not None:
            doc["serial"] = captured.decode("utf-8", errors="replace")
        if args.save_state:
            doc["snapshot"] = args.save_state
        print(json.dumps(doc, indent=2))


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    captured = bytearray() if args.json and not args.serial else None
    sink, handle = _open_sink(args, captured)
    try:
        machine = build_machine(args, sink)
        result = machine.run(timeout=args.timeout, max_instructions=args.max_instructions, save_at=args.save_at)
        if args.save_state:
            machine.save(args.save_state)
            print(f"cetvm: snapshot written to {args.save_state} after {result.instructions} instructions "
                  f"(continue with: cetvm boot --restore-state {args.save_state})", file=sys.stderr)
    finally:
        if handle is not None:
            handle.close()
    report(result, args, captured)
    return result.exit_code
