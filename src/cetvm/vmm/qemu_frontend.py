"""A ``qemu-system-x86_64`` command line mapped onto the cetvm PC (the VMM's QEMU-compatible
front end; the CLI wrappers are :mod:`cetvm.cli.qemu`).

Accepted: exactly the options kvm-unit-tests' ``x86/run``, ``run_tests.sh`` and
``x86/unittests.cfg`` pass (:data:`OPTIONS`); any other option is refused with one line, as
QEMU refuses an unknown option. What each one does:

==========================  =====================================================================
option                      meaning in cetvm
==========================  =====================================================================
-kernel FILE                multiboot v1 / ELF64 kernel (``cetvm boot IMAGE``)
-append CMDLINE             kernel command line (the multiboot cmdline is "KERNEL CMDLINE", as QEMU's)
-initrd FILE                the first multiboot module (kvm-unit-tests' environment file)
-m SIZE                     RAM; QEMU units (a bare number is MiB; k/M/G/T suffixes)
-smp N[,...]                vCPUs (MachineConfig.smp); more than 8 → QEMU's "Invalid SMP CPUs"
-cpu MODEL[,opts]           guest CPU (:class:`cetvm.vmm.guest_cpu.GuestCpuSpec`); host/max = all
                            that KVM on the modeled host offers and the CPU can execute
-machine / -M [type,]props  accel=kvm|tcg (cetvm is its own KVM either way), pit, vmport,
                            kernel-irqchip, type pc/q35 accepted; ``?`` lists the machine
-enable-kvm, -accel A       accepted (see accel)
-device NAME[,props]        pc-testdev, isa-debug-exit (iobase 0xf4), pci-testdev (accepted, not
                            modelled: no PCI bus); ``?``/help lists them; anything else refused
-serial stdio|none|null     COM1 to stdout, or discarded
-rtc base=B[,clock=C,...]   the CMOS RTC's and kvmclock's wall clock: base=utc (QEMU's default:
                            the host's time now), localtime (the host's local time), or a date
                            YYYY-MM-DD[THH:MM:SS] (UTC); clock= and driftfix= accepted (guest time
                            always advances it)
-display none, -nographic,  accepted (no display)
-nodefaults, -no-reboot,
-global DRV.PROP=VAL,
-overcommit ...
-h/--help, -version         QEMU-style text (first line names QEMU 7.2.0 as kvm-unit-tests parses)
==========================  =====================================================================

Exit status, as QEMU's (kvm-unit-tests' run_tests.sh reads it): isa-debug-exit ``(v << 1) | 1``;
power off, reset (``-no-reboot``) or a triple fault 0 (QEMU exits 0 on a reset with
``-no-reboot``); a timeout or instruction limit 124 (GNU timeout's); a machine cetvm cannot
build or run 1, always with a one-line ``qemu-system-x86_64:`` message on stderr (QEMU's
start-up errors exit 1, and run_tests.sh treats 1 with a non-warning message as failure).

The modeled host CPU comes from ``$CETVM_QEMU_HOST`` (a built-in model or dump file; default
sapphire-rapids), the modeled host kernel's command line from ``$CETVM_QEMU_HOST_CMDLINE`` —
where KVM's module parameters go, as on a real host: ``kvm.force_emulation_prefix=1`` turns on
KVM's force-emulation prefix (kvm-unit-tests' KVM_FEP tests), ``ibt=off`` hides IBT.
"""

from __future__ import annotations

import calendar
import datetime
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

from cetvm import CetvmError, InputError, __version__
from cetvm.cpuid import resolve_model
from cetvm.kvm import Host
from cetvm.vmm.config import DEFAULT_CPU_MODEL, MAX_VCPUS, MachineConfig
from cetvm.vmm.devices.pc_testdev import PcTestdev
from cetvm.vmm.guest_cpu import HOST_MODELS, QEMU_MODELS, GuestCpuSpec
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import StopReason

PROG = "qemu-system-x86_64"
QEMU_VERSION = "7.2.0"
HOST_ENV = "CETVM_QEMU_HOST"
HOST_CMDLINE_ENV = "CETVM_QEMU_HOST_CMDLINE"
#: QEMU's default RAM size (hw/i386/pc.c: 128 MiB).
DEFAULT_RAM = 128 << 20

#: Options taking an argument / taking none (both spellings, -opt and --opt, are accepted).
OPTIONS_WITH_ARG = frozenset({"kernel", "append", "initrd", "m", "smp", "cpu", "machine", "M", "accel",
                              "device", "serial", "display", "global", "overcommit", "rtc"})
OPTIONS_NO_ARG = frozenset({"nodefaults", "no-reboot", "enable-kvm", "nographic", "h", "help", "version"})

#: -device names this machine knows, as ``-device ?`` prints them (QEMU's format, which
#: kvm-unit-tests' x86/run greps for "pc-testdev" and "pci-testdev").
DEVICES: dict[str, str] = {
    "isa-debug-exit": 'name "isa-debug-exit", bus ISA',
    "pc-testdev": 'name "pc-testdev", bus ISA',
    "pci-testdev": 'name "pci-testdev", bus PCI, desc "PCI Test Device"',
}
_MACHINE_TYPES = ("pc", "q35", "cetvm")
_MACHINE_PROPS = ("accel", "pit", "vmport", "kernel-irqchip", "type", "usb", "smm", "hpet")
_ACCELS = ("kvm", "tcg")
_SERIAL = ("stdio", "none", "null")


class QemuUsageError(InputError):
    """A command line the front end refuses (printed as one ``qemu-system-x86_64:`` line)."""


class InfoRequest(Exception):
    """``-h``, ``-version``, ``-device ?``, ``-machine ?``: print ``text`` and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass
class QemuCommand:
    """A parsed command line."""

    kernel: str | None = None
    append: str = ""
    initrd: str | None = None
    memory: int = DEFAULT_RAM
    smp: int = 1
    cpu: str = "host"
    accel: str = "kvm"
    devices: list[str] = field(default_factory=list)
    serial: str = "none"
    #: MachineConfig.wall_clock: QEMU's default RTC base is the host's UTC time.
    wall_clock: str | int = "host"
    warnings: list[str] = field(default_factory=list)

    def machine_config(self, sink: Callable[[bytes], None] | None) -> MachineConfig:
        """The MachineConfig this command line asks for."""
        guest_cpu = "" if self.cpu.split(",")[0] in HOST_MODELS and "," not in self.cpu else self.cpu
        host = os.environ.get(HOST_ENV) or DEFAULT_CPU_MODEL
        # QEMU's multiboot loader gives the kernel "FILE APPEND" (hw/i386/multiboot.c): kernels such
        # as kvm-unit-tests take the first word as argv[0].
        cmdline = f"{self.kernel} {self.append}" if self.append else (self.kernel or "")
        host_cmdline = os.environ.get(HOST_CMDLINE_ENV, "")
        modeled_host = Host(cpu=resolve_model(host), kernel_cmdline=host_cmdline) if host_cmdline else None
        return MachineConfig(cpu=host, memory=self.memory, cet="on", cmdline=cmdline, host=modeled_host,
                             modules=(self.initrd,) if self.initrd else (), smp=self.smp, guest_cpu=guest_cpu,
                             wall_clock=self.wall_clock, serial_sink=sink)


def help_text() -> str:
    return (f"QEMU emulator version {QEMU_VERSION} (cetvm {__version__} front end: a software x86-64 machine "
            "with Intel CET, not QEMU)\n"
            f"usage: {PROG} [options] -kernel FILE\n\n"
            "cetvm accepts the options kvm-unit-tests passes and refuses every other one:\n"
            "-kernel FILE      multiboot v1 or ELF64 kernel\n"
            "-append CMDLINE   kernel command line\n"
            "-initrd FILE      first multiboot module\n"
            "-m SIZE           RAM (a bare number is MiB; k/M/G/T suffixes)\n"
            f"-smp N            vCPUs, 1 to {MAX_VCPUS}\n"
            "-cpu MODEL[,+feat,-feat,vendor=V,phys-bits=N]\n"
            f"                  host, max, {', '.join(QEMU_MODELS)}; features the modeled KVM or the CPU\n"
            "                  engine cannot give are left off with a warning\n"
            "-machine [TYPE,]accel=kvm|tcg[,pit=..,vmport=..,kernel-irqchip=..]   (-M; '?' lists)\n"
            "-enable-kvm       accepted (cetvm is its own modeled KVM)\n"
            "-device NAME[,..] pc-testdev, isa-debug-exit,iobase=0xf4,iosize=N, pci-testdev; '?' lists\n"
            "-serial stdio|none|null   COM1\n"
            "-display none, -nographic, -nodefaults, -no-reboot, -global D.P=V, -overcommit ..: accepted\n\n"
            "Exit status as QEMU: isa-debug-exit (v << 1) | 1; 0 power off/reset/triple fault; 124 timeout;\n"
            f"1 cetvm cannot run the machine. The modeled host CPU is ${HOST_ENV} (default {DEFAULT_CPU_MODEL}).\n")


def device_list() -> str:
    return "Misc devices:\n" + "\n".join(DEVICES.values()) + "\n"


def machine_list() -> str:
    return ("Supported machines are:\n"
            "pc                   cetvm PC (QEMU-compatible legacy devices, multiboot) (default)\n"
            "q35                  alias of pc (cetvm models one PC)\n")


_SIZE_RE = re.compile(r"^(?:size=)?(\d+(?:\.\d+)?)([kKmMgGtT]?)[bB]?$")
_SIZE_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_qemu_memory(text: str) -> int:
    """QEMU ``-m``: a bare number is MiB; k/M/G/T suffixes (binary); ``size=`` prefix allowed."""
    match = _SIZE_RE.match(text.split(",")[0].strip())
    if not match:
        raise QemuUsageError(f"-m {text}: invalid RAM size")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_smp(text: str) -> int:
    """``N`` or ``[cpus=]N[,sockets=..,cores=..,threads=..,maxcpus=..]``."""
    first = text.split(",")[0]
    value = first.split("=", 1)[1] if first.startswith("cpus=") else first
    if not value.isdigit() or int(value) < 1:
        raise QemuUsageError(f"-smp {text}: expected a number of CPUs")
    count = int(value)
    if count > MAX_VCPUS:
        raise QemuUsageError(f"Invalid SMP CPUs {count}. The max CPUs supported by machine 'cetvm' is {MAX_VCPUS}")
    return count


def _parse_machine(cmd: QemuCommand, text: str) -> None:
    if text in ("?", "help"):
        raise InfoRequest(machine_list())
    for n, part in enumerate(p for p in text.split(",") if p):
        if "=" not in part:
            if n == 0 and (part in _MACHINE_TYPES or part.startswith(("pc-", "pc-i440fx", "pc-q35"))):
                continue
            raise QemuUsageError(f"-machine {text}: unsupported machine type or property {part!r}")
        key, value = part.split("=", 1)
        if key not in _MACHINE_PROPS:
            raise QemuUsageError(f"-machine {text}: property {key!r} is not supported by cetvm")
        if key == "accel":
            _set_accel(cmd, value)


def _set_accel(cmd: QemuCommand, value: str) -> None:
    choices = value.split(":")
    for accel in choices:
        if accel not in _ACCELS:
            raise QemuUsageError(f"invalid accelerator {accel} (cetvm accepts {', '.join(_ACCELS)})")
    cmd.accel = choices[0]


def _parse_device(cmd: QemuCommand, text: str) -> None:
    if text in ("?", "help"):
        raise InfoRequest(device_list())
    name, *props = text.split(",")
    if name not in DEVICES:
        raise QemuUsageError(f"-device {text}: '{name}' is not a valid device model name for cetvm "
                             f"(cetvm has {', '.join(DEVICES)})")
    if name == "isa-debug-exit":
        for prop in props:
            key, _, value = prop.partition("=")
            if key == "iobase" and int(value, 0) != 0xF4:
                raise QemuUsageError(f"-device {text}: cetvm's isa-debug-exit is at iobase 0xf4 only")
            if key not in ("iobase", "iosize"):
                raise QemuUsageError(f"-device {text}: property {key!r} is not supported")
    elif props:
        raise QemuUsageError(f"-device {text}: {name} takes no properties in cetvm")
    cmd.devices.append(name)


def parse_command_line(argv: list[str]) -> QemuCommand:
    """argv (without the program name) → QemuCommand; raises QemuUsageError or InfoRequest."""
    cmd = QemuCommand()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            raise QemuUsageError(f"{arg}: cetvm takes no disk image; use -kernel FILE")
        name = arg.lstrip("-")
        value: str | None = None
        if "=" in name and name.split("=", 1)[0] in OPTIONS_WITH_ARG:
            name, value = name.split("=", 1)
        if name in OPTIONS_NO_ARG:
            if name in ("h", "help"):
                raise InfoRequest(help_text())
            if name == "version":
                raise InfoRequest(f"QEMU emulator version {QEMU_VERSION} (cetvm {__version__})\n")
            if name == "nographic":
                cmd.serial = "stdio"
            i += 1
            continue
        if name not in OPTIONS_WITH_ARG:
            raise QemuUsageError(f"{arg}: invalid option (cetvm's front end accepts only the options "
                                 f"kvm-unit-tests uses; see '{PROG} -h')")
        if value is None:
            if i + 1 >= len(argv):
                raise QemuUsageError(f"{arg}: requires an argument")
            value = argv[i + 1]
            i += 2
        else:
            i += 1
        _apply_option(cmd, name, value)
    return cmd


def _apply_option(cmd: QemuCommand, name: str, value: str) -> None:
    if name == "kernel":
        cmd.kernel = value
    elif name == "append":
        cmd.append = value
    elif name == "initrd":
        cmd.initrd = value
    elif name == "m":
        cmd.memory = parse_qemu_memory(value)
    elif name == "smp":
        cmd.smp = parse_smp(value)
    elif name == "cpu":
        GuestCpuSpec.parse(value)  # refuse a bad -cpu before anything is loaded, as QEMU does
        cmd.cpu = value
    elif name in ("machine", "M"):
        _parse_machine(cmd, value)
    elif name == "accel":
        _set_accel(cmd, value.split(",")[0])
    elif name == "device":
        _parse_device(cmd, value)
    elif name == "serial":
        if value not in _SERIAL:
            raise QemuUsageError(f"-serial {value}: cetvm supports {', '.join(_SERIAL)}")
        cmd.serial = "stdio" if value == "stdio" else "none"
    elif name == "display":
        if value.split(",")[0] != "none":
            raise QemuUsageError(f"-display {value}: cetvm has no display (use -display none)")
    elif name == "global":
        if "=" not in value or "." not in value.split("=", 1)[0]:
            raise QemuUsageError(f"-global {value}: expected DRIVER.PROPERTY=VALUE")
    elif name == "overcommit":
        pass  # mem-lock / cpu-pm: host tuning with no guest-visible effect in cetvm
    elif name == "rtc":
        cmd.wall_clock = parse_rtc(value)


_RTC_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}):(\d{2}):(\d{2}))?")


def parse_rtc(value: str) -> str | int:
    """``-rtc base=...,clock=...,driftfix=...`` → MachineConfig.wall_clock (module docstring)."""
    wall: str | int = "host"
    for prop in value.split(","):
        key, _, val = prop.partition("=")
        if key == "base":
            date = _RTC_DATE.fullmatch(val)
            if val == "utc":
                wall = "host"
            elif val == "localtime":
                wall = time.time_ns() + time.localtime().tm_gmtoff * 10**9
            elif date:
                fields = [int(f) for f in date.groups(default="0")]
                try:
                    wall = calendar.timegm(datetime.datetime(*fields).timetuple()) * 10**9
                except ValueError:
                    raise QemuUsageError(f"-rtc {value}: invalid date '{val}'") from None
            else:
                raise QemuUsageError(f"-rtc {value}: invalid base '{val}' (utc, localtime or YYYY-MM-DD[THH:MM:SS])")
        elif key not in ("clock", "driftfix"):
            raise QemuUsageError(f"-rtc {value}: invalid property '{key}'")
    if isinstance(wall, int) and wall < 0:
        raise QemuUsageError(f"-rtc {value}: dates before 1970 are not supported")
    return wall


def _stdout_sink(out) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        out.write(data)
        out.flush()
    return write


def attach_devices(machine, devices: list[str]) -> None:
    """The -device extras: pc-testdev on the port bus (every machine has the ACPI tables, the
    PM timer and the rest of the PC, :class:`~cetvm.vmm.devices.pc.PcDevices`)."""
    if "pc-testdev" in devices:  # its IRQ ports drive the machine's interrupt lines (as QEMU's GSIs)
        PcTestdev(irq_line=machine.devices.irq.set_level).register(machine.pio, machine.mmio)


def _safe_rip(machine) -> str:
    try:
        return hex(machine.vcpu.get_regs().rip)
    except Exception:  # noqa: BLE001
        return "unknown"


def run(argv: list[str], stdout=None, stderr: TextIO | None = None) -> int:
    """Run one command line; returns the exit status (module docstring)."""
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr

    def fail(message: str, status: int = 1) -> int:
        print(f"{PROG}: {' '.join(message.split())}", file=err, flush=True)
        return status

    try:
        cmd = parse_command_line(argv)
    except InfoRequest as info:
        out.write(info.text.encode())
        out.flush()
        return 0
    except InputError as exc:
        return fail(str(exc))
    if cmd.kernel is None:
        return fail("no -kernel given (cetvm boots a kernel, there is no firmware or disk)")
    if not os.path.isfile(cmd.kernel):
        return fail(f"could not load kernel '{cmd.kernel}': No such file or directory")
    if cmd.initrd is not None and not os.path.isfile(cmd.initrd):
        return fail(f"could not load initrd '{cmd.initrd}': No such file or directory")

    sink = _stdout_sink(out) if cmd.serial == "stdio" else (lambda data: None)
    try:
        config = cmd.machine_config(sink)
        machine = Machine(config)
        for warning in (config.guest_cpu_spec.warnings if config.guest_cpu_spec else []):
            print(f"{PROG}: {warning}", file=err, flush=True)
        attach_devices(machine, cmd.devices)
        machine.load_kernel(cmd.kernel)
    except MemoryError:
        return fail(f"cannot set up guest memory 'pc.ram': Cannot allocate memory ({cmd.memory >> 20} MiB)")
    except CetvmError as exc:
        return fail(str(exc))
    try:
        result = machine.run()
    except CetvmError as exc:
        return fail(f"cetvm stopped: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug in cetvm: one line, never a traceback
        if os.environ.get("CETVM_DEBUG"):
            raise
        rip = _safe_rip(machine)
        return fail(f"cetvm internal error (a bug in cetvm; CETVM_DEBUG=1 shows the traceback): "
                    f"{type(exc).__name__}: {exc} (rip={rip})")
    if result.reason in (StopReason.GUEST_EXIT, StopReason.POWER_OFF):
        return result.exit_code
    if result.reason is StopReason.RESET:
        return 0
    if result.reason is StopReason.TRIPLE_FAULT:
        fail(f"guest triple fault (-no-reboot): {result.diagnosis()}")
        return 0
    if result.reason in (StopReason.TIMEOUT, StopReason.INSTRUCTION_LIMIT):
        return fail(result.diagnosis(), 124)
    return fail(result.diagnosis())
