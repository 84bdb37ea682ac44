"""`cetvm boot IMAGE`: run a bare-metal kernel on the cetvm PC (QEMU-compatible exit status).

Serial output (COM1) goes to stdout, or to ``--serial FILE``; when stdin is a terminal, what is
typed there is COM1's input (raw mode while the machine runs, :mod:`cetvm.vmm.console_input`).
ACPI power-off (and the 0x8900 shutdown port) exits 0. The exit status is the machine's
(:mod:`cetvm.vmm.run_loop`): isa-debug-exit's ``(code << 1) | 1`` & 0xFF, 0 for power off / halt
/ a saved snapshot, 124 on a timeout or instruction limit, 125 on a triple fault, 126 on a KVM
internal error; a failed run also prints a one-line diagnosis on stderr.

Decision: an error cetvm raises while the guest runs (e.g. a :class:`cetvm.NotSupportedError`
for an instruction the CPU cannot emulate on MMIO) ends the run as an internal error, status
126, with the usual one-line diagnosis and JSON result — never status 1, which a QEMU-style test
runner reads as "the guest passed" (isa-debug-exit code 0). Errors before the run that are not
bad input (cetvm refuses the machine) are 126 as well (``error_status``); bad input is 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from typing import BinaryIO, Callable

from cetvm import CetvmError, InputError
from cetvm.cli.output import discard_stdout, flush_stdout, stdout_binary
from cetvm.files import (check_distinct, check_output_path, open_output_stream, read_input_head, same_file,
                         write_atomically)
from cetvm.cpuid import model_names
from cetvm.report import CetViolation, Symbolizer, format_report, report_json
from cetvm.report.symtab import ELF_MAGIC
from cetvm.vmm.config import DEFAULT_CPU_MODEL, MAX_VCPUS, CetMode, MachineConfig, check_vcpu_count
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import STATUS_INTERNAL_ERROR, RunResult, StopReason

DEFAULT_MEMORY = "256M"


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _vcpu_count(text: str) -> int:
    try:
        return check_vcpu_count(int(text, 10))
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"expected a vCPU count from 1 to {MAX_VCPUS}, got {text!r}") from None


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
        "boot", help="boot a Linux bzImage, a multiboot or an ELF64 kernel on the cetvm PC",
        description="Boot a kernel (a Linux bzImage through the 64-bit boot protocol, or a bare-metal "
                    "multiboot v1 or ELF64 kernel) with COM1 on stdout. The exit "
                    "status follows QEMU's isa-debug-exit ((code << 1) | 1, so 1 = the guest wrote 0); 0 "
                    "power off, HLT or snapshot taken; 124 timeout or instruction limit, 125 triple fault, "
                    "126 internal error (each with a one-line diagnosis on stderr); 2 bad input.")
    p.add_argument("image", nargs="?",
                   help="kernel image: a Linux bzImage (boot protocol 2.12+, 64-bit entry), multiboot v1 "
                        "(ELF32 or a.out kludge) or an ELF64 x86-64 executable (omit with --restore-state)")
    p.add_argument("--kernel", dest="kernel", metavar="FILE",
                   help="the kernel image, as an option (QEMU -kernel style); same as IMAGE (default none)")
    p.add_argument("--cpu", default=None, metavar="MODEL|FILE",
                   help="host CPU the modeled KVM runs on; the guest sees what KVM offers on it. A built-in "
                        f"model ({', '.join(model_names())}) or a CPUID dump/JSON file "
                        f"(default {DEFAULT_CPU_MODEL})")
    p.add_argument("--cet", default=None, choices=[m.value for m in CetMode],
                   help="CET features the guest CPUID shows: on = SHSTK and IBT as KVM offers them, "
                        "shstk or ibt = only that one, off = neither (default on)")
    p.add_argument("--force-emulation-prefix", action="store_true", default=None,
                   help="load the modeled KVM with kvm.force_emulation_prefix=1: a #UD at the prefix "
                        "'ud2; .ascii \"kvm\"' makes KVM emulate the next instruction (kvm-unit-tests' "
                        "KVM_FEP); KVM refuses CET-guarded instructions while CET is on (#UD) "
                        "(default off)")
    p.add_argument("--memory", "-m", default=None, metavar="SIZE",
                   help="guest RAM: bytes, or a number with a K/M/G/T suffix (binary units, QEMU -m style), "
                        f"2M or more (default {DEFAULT_MEMORY})")
    p.add_argument("--smp", type=_vcpu_count, default=None, metavar="N",
                   help=f"number of vCPUs, 1 to {MAX_VCPUS} (QEMU -smp N): vCPU 0 boots the kernel, the others "
                        "wait for INIT/SIPI from its local APIC; they run round-robin, deterministically, and "
                        "--max-instructions / --save-at count the instructions of all of them (default 1; "
                        "with --restore-state it must match the snapshot)")
    p.add_argument("--wall-clock", default=None, metavar="fixed|host|NS",
                   help="the real time the CMOS RTC and kvmclock start from: fixed = 2024-01-01T00:00:00Z "
                        "(deterministic), host = the host's time now, or ns since 1970; both then advance "
                        "with guest time (default fixed)")
    p.add_argument("--append", default="", metavar="CMDLINE",
                   help="kernel command line: Linux's (e.g. 'console=ttyS0'), or the multiboot information's "
                        "(default empty)")
    p.add_argument("--initrd", action="append", default=[], metavar="FILE",
                   help="Linux: the initramfs (one). Multiboot/ELF64: a module, loaded page-aligned after the "
                        "kernel; repeat for more, in order (the first is the initrd; default none)")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="stop after S seconds of wall-clock time, exit status 124 (default no limit)")
    p.add_argument("--max-instructions", type=_positive_int, metavar="N",
                   help="stop after N guest instructions (counted from the machine's first start, across "
                        "snapshots), exit status 124 (default no limit)")
    p.add_argument("--serial", metavar="FILE",
                   help="write the COM1 output to FILE (created, or truncated once every input has been read; a "
                        "device or FIFO is written in place; refused if FILE is one of the inputs); default stdout")
    p.add_argument("--save-state", metavar="FILE",
                   help="when the run stops (or at --save-at), write the whole machine to FILE: a new or "
                        "regular file, replaced atomically; not a device, FIFO or input of the run "
                        "(default no snapshot)")
    p.add_argument("--save-at", type=_positive_int, metavar="N",
                   help="with --save-state: stop after exactly N instructions and save; exit status 0 "
                        "(default: save when the run stops by itself)")
    p.add_argument("--restore-state", metavar="FILE",
                   help="continue the machine saved in FILE (its CPU, memory, CET setting, command line and "
                        "devices come from the snapshot); default: boot IMAGE")
    p.add_argument("--cet-report", nargs="?", const="-", default=None, metavar="FILE",
                   help="record every CET violation (#CP) the guest takes, before it is delivered unchanged, "
                        "and at the end report each one symbolized from IMAGE's .symtab and --symbols: kind, RIP, CPL, the "
                        "return addresses on the data and shadow stacks (or the bytes at an ENDBRANCH "
                        "target); on stderr, or to FILE (JSON when it ends in .json, text otherwise). With "
                        "--json the result also gets a \"cet_violations\" list (default off)")
    p.add_argument("--symbols", action="append", default=[], metavar="FILE",
                   help="with --cet-report, also symbolize from FILE: an ELF file's .symtab (a static user "
                        "program the guest runs, a vmlinux) or a System.map / kallsyms text; repeat for more "
                        "(default: IMAGE's own .symtab only)")
    p.add_argument("--progress", action="store_true",
                   help="print a progress line (instructions, MIPS) on stderr about once a second during long "
                        "runs (default: only when stderr is a terminal not shared with the serial output)")
    p.add_argument("--json", action="store_true",
                   help="at the end print the result as one JSON object (status, reason, message, "
                        "instructions, rip, last_exception, and the serial output unless --serial)")
    p.set_defaults(func=run, error_status=STATUS_INTERNAL_ERROR)


def _check_args(args: argparse.Namespace) -> None:
    if args.kernel:
        if args.image:
            raise InputError("give the kernel either as IMAGE or as --kernel, not both")
        args.image = args.kernel
    if args.restore_state:
        if args.image:
            raise InputError("give either IMAGE or --restore-state, not both")
        given = [f"--{name.replace('_', '-')}" for name in ("cpu", "cet", "memory", "force_emulation_prefix",
                                                             "wall_clock")
                 if getattr(args, name) is not None]
        if given or args.append or args.initrd:
            raise InputError(f"{', '.join(given + (['--append'] if args.append else []) + (['--initrd'] if args.initrd else []))}"
                             " cannot be combined with --restore-state (the snapshot holds the machine config)")
    elif not args.image:
        raise InputError("missing IMAGE (a kernel to boot) or --restore-state FILE")
    if args.save_at is not None and not args.save_state:
        raise InputError("--save-at needs --save-state FILE")
    if args.save_state:
        check_output_path(args.save_state, "--save-state")
    if args.cet_report not in (None, "-"):
        check_output_path(args.cet_report, "--cet-report")
    check_distinct(_outputs(args), _inputs(args))


def _inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(option, path) of every file the run reads."""
    inputs = [("IMAGE", args.image)] if args.image else []
    inputs += [("--initrd", path) for path in args.initrd]
    inputs += [("--symbols", path) for path in args.symbols]
    if args.cpu and args.cpu not in model_names() and os.path.exists(args.cpu):
        inputs.append(("--cpu", args.cpu))  # a model name wins over a file of that name
    if args.restore_state:
        inputs.append(("--restore-state", args.restore_state))
    return inputs


def _outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(option, path) of every file the run writes. ``--save-state`` may name the snapshot it
    restores (continue and save again: the file is replaced atomically, after it was read)."""
    outputs = [("--serial", args.serial)] if args.serial else []
    if args.cet_report not in (None, "-"):
        outputs.append(("--cet-report", args.cet_report))
    if args.save_state and not (args.restore_state and same_file(args.save_state, args.restore_state)):
        outputs.append(("--save-state", args.save_state))
    return outputs


class SerialOutput:
    """Where COM1's bytes go: ``--serial FILE`` (opened by :meth:`open` only after every input has
    been read, so a failed load never truncates it), the ``--json`` capture, or stdout.

    stdout that nobody reads any more (a closed pipe, e.g. ``| head -c1``; or closed outright) is
    not an error: the rest of the output is discarded and the guest runs on, so the exit status
    stays the guest's. A destination that refuses data (``/dev/full``: ENOSPC, EIO) is: the run
    stops with one ``cetvm: error:`` line, exit status 2 (the output would be lost)."""

    def __init__(self, path: str | None, captured: bytearray | None) -> None:
        self.path, self.captured = path, captured
        self.handle: BinaryIO | None = None
        self.discarding = False

    def open(self) -> None:
        if self.path:
            self.handle = open_output_stream(self.path, "--serial")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def write(self, data: bytes) -> None:
        if self.captured is not None and not self.path:
            self.captured.extend(data)
        elif self.handle is not None:
            self._write_file(data)
        elif not self.path:
            self._write_stdout(data)

    def _write_file(self, data: bytes) -> None:
        assert self.handle is not None
        try:
            self.handle.write(data)
        except OSError as exc:
            raise InputError(f"--serial '{self.path}': cannot write: {exc.strerror or exc}") from None

    def _write_stdout(self, data: bytes) -> None:
        if self.discarding:
            return
        try:
            out = stdout_binary()
            if out is None:
                self.discarding = True
                return
            out.write(data)
            out.flush()
        except BrokenPipeError:
            self.discarding = True
            discard_stdout()
        except OSError as exc:
            discard_stdout()
            raise InputError(f"cannot write the serial output to stdout: {exc.strerror or exc}") from None


def build_machine(args: argparse.Namespace, sink: Callable[[bytes], None]) -> Machine:
    """The machine to run: booted from IMAGE or restored; a host that cannot back the guest RAM
    is bad input for --memory (an InputError), not a crash."""
    try:
        if args.restore_state:
            return Machine.restore(args.restore_state, serial_sink=sink, smp=args.smp)
        config = MachineConfig(cpu=args.cpu or DEFAULT_CPU_MODEL, memory=args.memory or DEFAULT_MEMORY,
                               cet=args.cet or "on", cmdline=args.append, modules=tuple(args.initrd),
                               force_emulation_prefix=bool(args.force_emulation_prefix), smp=args.smp or 1,
                               wall_clock=args.wall_clock or "fixed", serial_sink=sink)
        return Machine.boot(args.image, config)
    except MemoryError:
        raise InputError(f"{_memory_option(args)}: this host cannot allocate the guest RAM") from None
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        raise InputError(f"{_memory_option(args)}: this host cannot allocate the guest RAM "
                         f"({exc.strerror})") from None


def _memory_option(args: argparse.Namespace) -> str:
    if args.restore_state:
        return f"snapshot '{args.restore_state}'"
    return f"--memory {args.memory or DEFAULT_MEMORY}"


def run_machine(machine: Machine, args: argparse.Namespace) -> tuple[RunResult, bool]:
    """(result, whether the run completed). A CetvmError raised by cetvm during the run (not the
    guest's doing: e.g. an instruction it cannot emulate) becomes an internal-error result
    (status 126, see the module docstring) instead of escaping as exit status 1."""
    try:
        return machine.run(timeout=args.timeout, max_instructions=args.max_instructions, save_at=args.save_at,
                           progress=_progress_printer(args)), True
    except InputError:
        raise
    except CetvmError as exc:
        return RunResult(STATUS_INTERNAL_ERROR, StopReason.INTERNAL_ERROR, str(exc), _safe_instructions(machine),
                         _safe_rip(machine)), False


def _wants_progress(args: argparse.Namespace) -> bool:
    """--progress, or automatically when stderr is a terminal that the guest's serial output does
    not share (--serial FILE, or stdout redirected) and no --json result is expected."""
    if getattr(args, "progress", False):
        return True
    if args.json or not sys.stderr.isatty():
        return False
    return bool(args.serial) or not sys.stdout.isatty()


def _progress_printer(args: argparse.Namespace) -> Callable[[int, float], None] | None:
    if not _wants_progress(args):
        return None

    def show(instructions: int, seconds: float) -> None:
        mips = instructions / seconds / 1e6 if seconds > 0 else 0.0
        print(f"cetvm: running: {instructions / 1e6:.1f} M instructions in {seconds:.0f} s ({mips:.1f} MIPS)",
              file=sys.stderr, flush=True)
    return show


def _safe_instructions(machine: Machine) -> int:
    try:
        return machine.instructions
    except CetvmError:
        return 0


def _safe_rip(machine: Machine) -> int:
    try:
        return machine.vcpu.get_regs().rip
    except CetvmError:
        return 0


def cet_symbols(args: argparse.Namespace) -> Symbolizer | None:
    """The symbols for --cet-report: IMAGE's .symtab when it is an ELF file (a bzImage has none),
    and every --symbols file (ELF or System.map); None when there are none."""
    if args.cet_report is None:
        return None
    parts = [Symbolizer.from_file(path) for path in args.symbols]
    if args.image and read_input_head(args.image, f"kernel file '{args.image}'", 4) == ELF_MAGIC:
        parts.insert(0, Symbolizer.from_elf(args.image))
    return Symbolizer.merged(parts) if parts else None


def write_cet_report(violations: list[CetViolation], symbols: Symbolizer | None, target: str) -> None:
    """--cet-report: text on stderr ("-"), JSON to a ``.json`` FILE, text to any other FILE."""
    if target == "-":
        sys.stderr.write(format_report(violations, symbols))
        return
    text = (json.dumps({"cet_violations": report_json(violations, symbols)}, indent=2) + "\n"
            if target.endswith(".json") else format_report(violations, symbols))
    write_atomically(target, "--cet-report", lambda out: out.write(text.encode("utf-8", "surrogateescape")))


def report(result: RunResult, args: argparse.Namespace, captured: bytearray | None, saved: bool,
           cet: tuple[list[CetViolation], Symbolizer | None] | None = None) -> None:
    if result.reason.is_failure:
        print(f"cetvm: {result.diagnosis()}", file=sys.stderr)
    if cet is not None:
        write_cet_report(cet[0], cet[1], args.cet_report)
    if args.json:
        doc = result.to_json()
        if cet is not None:
            doc["cet_violations"] = report_json(cet[0], cet[1])
        if captured is not None:
            doc["serial"] = captured.decode("utf-8", errors="replace")
        if saved:
            doc["snapshot"] = args.save_state
        print(json.dumps(doc, indent=2))


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    captured = bytearray() if args.json and not args.serial else None
    symbols = cet_symbols(args)
    serial = SerialOutput(args.serial, captured)
    cet = None
    console = None
    try:
        machine = build_machine(args, serial.write)
        serial.open()  # every input has been read: only now may --serial FILE be truncated
        if sys.stdin is not None and sys.stdin.isatty():  # interactive: the terminal is COM1's input
            console = machine.attach_console_input(sys.stdin.fileno())
        if args.cet_report is not None:
            cet = (machine.record_cet_violations().violations, symbols)
        result, completed = run_machine(machine, args)
        if args.save_state and not completed:
            result = dataclasses.replace(result, message=f"{result.message}; no snapshot written")
        elif args.save_state:
            machine.save(args.save_state)
            print(f"cetvm: snapshot written to {args.save_state} after {result.instructions} instructions "
                  f"(continue with: cetvm boot --restore-state {args.save_state})", file=sys.stderr)
    finally:
        if console is not None:
            console.close()
        serial.close()
    try:
        report(result, args, captured, saved=bool(args.save_state) and completed, cet=cet)
        flush_stdout()
    except BrokenPipeError:
        discard_stdout()  # the reader is gone (| head): the exit status stays the guest's
    return result.exit_code
