"""`cetvm` entry point: one sub-command per module in :data:`COMMAND_MODULES`.

Each command module exposes ``register(subparsers) -> None`` and sets ``func`` on its parser;
``func(args) -> int`` returns the exit status. Every error is one line on stderr starting with
``cetvm:``, never a traceback:

- a malformed command line (unknown option, bad value, missing argument) and every
  :class:`cetvm.InputError`: ``cetvm: error: ...``, exit status 2 (argparse's multi-line usage
  text is replaced by a pointer to ``--help``);
- any other :class:`cetvm.CetvmError` (cetvm or the modeled KVM refuses): exit status 1, or the
  command's own ``error_status`` default (``cetvm boot`` uses 126, because its 1 means "the
  guest exited with isa-debug-exit code 0");
- stdout refusing the output (``>/dev/full``): ``cetvm: error: cannot write to stdout``, exit
  status 2; stdout closed or a reader gone (``| head``): the rest is discarded, the status is
  the command's (:mod:`cetvm.cli.output`);
- an unexpected Python exception is a bug in cetvm: ``cetvm: internal error: ...``, exit status
  :data:`STATUS_INTERNAL_BUG`; ``CETVM_DEBUG=1`` lets the traceback through.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import textwrap
from typing import NoReturn, Sequence

from cetvm import CetvmError, InputError, __version__
from cetvm.cli.output import discard_stdout, flush_stdout

#: Exit status of an unexpected exception (a bug in cetvm), as ``cetvm boot``'s internal error.
STATUS_INTERNAL_BUG = 126
#: errno values of a write that stdout refused (``>/dev/full``): one error line, exit status 2.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.EBADF})
#: Environment variable that shows the traceback of an unexpected exception.
DEBUG_ENV = "CETVM_DEBUG"


class UsageError(InputError):
    """A malformed command line (argparse's complaint, as one line)."""


class WholeWordsHelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, without breaking lines inside hyphenated words: model names such as
    ``sapphire-rapids`` and options such as ``--max-instructions`` stay whole in ``--help``."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line :class:`UsageError` instead of the usage
    text and ``SystemExit(2)`` (sub-command parsers inherit the class), and help text wrapped
    by :class:`WholeWordsHelpFormatter`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", WholeWordsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("cetvm").strip()
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see '{self.prog} --help')")


#: Sub-command modules, in the order `cetvm --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "boot",
    "caps",
    "migrate",
    "cpuid_cmd",
    "bench",
    "qemu",
    "conformance",
    "linux_guest",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
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
    """Run one ``cetvm`` command line; returns the exit status (``--help`` / ``--version``: 0)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except InputError as exc:
        return _report(f"error: {exc}", 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return _report("error: no COMMAND given (see 'cetvm --help')", 2)
    if args.cet_path:
        os.environ["CETVM_CET_PATH"] = args.cet_path
    try:
        status = int(args.func(args) or 0)
        flush_stdout()
        return status
    except InputError as exc:
        return _report(f"error: {exc}", 2)
    except CetvmError as exc:
        return _report(f"error: {exc}", getattr(args, "error_status", 1))
    except KeyboardInterrupt:
        return _report("interrupted", 130)
    except BrokenPipeError:
        discard_stdout()  # the reader is gone (| head): the rest is discarded (cetvm.cli.output)
        return 0
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        discard_stdout()
        return _report(f"error: cannot write to stdout: {exc.strerror or exc}", 2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        if os.environ.get(DEBUG_ENV):
            raise
        return _report(f"internal error: {type(exc).__name__}: {_one_line(str(exc))} (a bug in cetvm; "
                       f"{DEBUG_ENV}=1 shows the traceback)", STATUS_INTERNAL_BUG)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _report(message: str, status: int) -> int:
    print(f"cetvm: {_one_line(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
