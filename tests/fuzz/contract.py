"""The contract every fuzzed input must keep, checked by running ``cetvm`` in this process."""

from __future__ import annotations

import io
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from hypothesis import event

from cetvm.cli.main import main

#: Wall-clock seconds one example may take before it counts as a hang.
HANG_SECONDS = 30


class Hang(AssertionError):
    """An example ran longer than HANG_SECONDS."""


@dataclass
class Outcome:
    status: int
    out: str
    err: str


@contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def expire(_signum, _frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cetvm(argv: Sequence[str]) -> Outcome:
    """``cetvm ARGV`` in this process with stdout/stderr captured (a text stream over bytes, as
    a real stdout: ``cetvm boot`` writes serial output to ``sys.stdout.buffer``)."""
    out, err = io.BytesIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    wrapper = io.TextIOWrapper(out, encoding="utf-8", errors="replace", write_through=True)
    sys.stdout, sys.stderr = wrapper, err
    try:
        with _alarm(HANG_SECONDS):
            status = main(list(argv))
        wrapper.flush()
        printed = out.getvalue()
    finally:
        sys.stdout, sys.stderr = saved
        wrapper.detach()
    return Outcome(status, printed.decode("utf-8", "replace"), err.getvalue())


def check_contract(outcome: Outcome, ok_statuses: frozenset[int] | None = None) -> None:
    """Status 2: exactly one ``cetvm: error:`` line. Any other status must be one the caller allows
    (None: any, e.g. a guest's own exit status), with at most one ``cetvm:`` line (a run's
    diagnosis). Never a traceback, never cetvm's internal-error bug report."""
    event(f"exit status {outcome.status}")
    text = outcome.err + outcome.out
    assert "Traceback" not in text, text[-2000:]
    assert "a bug in cetvm" not in outcome.err, outcome.err
    lines = [line for line in outcome.err.splitlines() if line.startswith("cetvm:")]
    if outcome.status == 2:
        assert len(outcome.err.splitlines()) == 1 and outcome.err.startswith("cetvm: error:"), outcome.err
        return
    if ok_statuses is not None:
        assert outcome.status in ok_statuses, (outcome.status, outcome.err)
    assert len(lines) <= 1, outcome.err
