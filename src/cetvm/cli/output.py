"""stdout as the commands use it, with the two ways it can fail handled once.

- Nobody reads any more (EPIPE: ``cetvm ... | head -c1``) or stdout was closed (``>&-``): the
  rest of the output is discarded, quietly; the command's exit status is unchanged (for
  ``cetvm boot``, the guest's). :func:`discard_stdout` points file descriptor 1 at /dev/null so
  that Python's final flush cannot fail again at exit.
- The destination refuses the data (``>/dev/full``: ENOSPC, EIO): one ``cetvm: error: cannot
  write to stdout: ...`` line, exit status 2 (see :mod:`cetvm.cli.main`).
"""

from __future__ import annotations

import os
import sys
from typing import BinaryIO


def stdout_binary() -> BinaryIO | None:
    """The binary stdout, or None when the process has none (stdout closed at start)."""
    stream = sys.stdout
    return None if stream is None else getattr(stream, "buffer", None)


def discard_stdout() -> None:
    """From now on, whatever is written to stdout goes to /dev/null (pending bytes included)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        if sys.stdout is not None:
            try:
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
    finally:
        os.close(devnull)


def flush_stdout() -> None:
    """Flush what the command printed (errors reach the caller: BrokenPipeError, OSError)."""
    if sys.stdout is not None:
        sys.stdout.flush()
