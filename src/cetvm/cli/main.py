"""`cetvm` entry point: one sub-command per module in :data:`COMMAND_MODULES`.

Each command module exposes ``register(subparsers) -> None`` and sets ``func`` on its parser;
``func(args) -> int`` returns the exit status. Errors derived from :class:`cetvm.CetvmError`
are printed as one line (``cetvm: error: ...``), never as a traceback: exit status 2 for bad
input, 1 for anything else cetvm refuses.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from cetvm import CetvmError, InputError, __version__

#: Sub-command modules, in the order `cetvm --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "boot",
    "caps",
    "cpuid_cmd",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cetvm",
        description=(
            "A software x86-64 machine with Intel CET (shadow stacks and indirect branch "
            "tracking), virtualized the way Linux KVM does it. Runs CET guests on hosts "
            "without CET hardware."
        ),
        epilog="Run 'cetvm COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"cetvm {__version__}")
    parser.add_argument(
        "--cet-path", choices=("auto", "native", "python"),
        help="how CET is enforced: the native C block hook, the Python reference layer, or auto "
             "(native when built, else Python with a notice); default $CETVM_CET_PATH or auto",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cetvm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cetvm.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.cet_path:
        os.environ["CETVM_CET_PATH"] = args.cet_path
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"cetvm: error: {exc}", file=sys.stderr)
        return 2
    except CetvmError as exc:
        print(f"cetvm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cetvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
