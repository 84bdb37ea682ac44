"""`cetvm qemu ARGS...` and the `cetvm-qemu-system-x86_64` console script: a drop-in
``qemu-system-x86_64`` for test runners such as kvm-unit-tests (``QEMU=cetvm-qemu-system-x86_64
./run_tests.sh``). The mapping of options, devices and exit statuses is
:mod:`cetvm.vmm.qemu_frontend`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cetvm.vmm import qemu_frontend


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "qemu", help="run a qemu-system-x86_64 command line on the cetvm PC (for kvm-unit-tests)",
        description="Take a qemu-system-x86_64 command line (the options kvm-unit-tests' x86/run and "
                    "run_tests.sh pass: -kernel, -append, -initrd, -m, -smp, -cpu, -machine, -device, "
                    "-serial, -display, -nodefaults, -no-reboot, -enable-kvm, -global) and run it on the "
                    "cetvm PC; any other option is refused with one line. The same front end is installed "
                    "as the console script cetvm-qemu-system-x86_64. Exit status as QEMU's: isa-debug-exit "
                    "(v << 1) | 1, 0 power off/reset, 124 timeout, 1 error. 'cetvm qemu -h' shows QEMU-style "
                    "help. Example: cetvm qemu -nodefaults -serial stdio -device pc-testdev -device "
                    "isa-debug-exit,iobase=0xf4,iosize=0x4 -kernel x86/msr.flat -cpu max")
    p.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="QEMU-OPTION",
                   help="qemu-system-x86_64 options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return qemu_frontend.run(list(args.qemu_args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cetvm-qemu-system-x86_64``."""
    try:
        return qemu_frontend.run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
