"""Helpers for the command-line tests: run `cetvm` in this process, check the one-line error
contract; tiny kernels hand-built from the ELF and multiboot specifications come from
:mod:`spec_images` (independent of cetvm's own loader)."""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.cli.main import main
from guest_build import GUEST_BUILD
from guest_build import tap_kernel as guest  # noqa: F401  (re-exported)
from spec_images import (  # noqa: F401  (re-exported: the CLI tests' image toolkit)
    EM_386,
    EM_AARCH64,
    EM_X86_64,
    JMP_SELF,
    KERNEL_BASE,
    MB_MAGIC,
    RET,
    UD2,
    debug_exit,
    elf64_kernel,
    jump_to,
    multiboot_header,
)
from spec_images import one_segment_elf as elf  # noqa: F401

GUEST_TESTS = GUEST_BUILD / "tests"


@dataclass
class CliRun:
    status: int
    out: str
    err: str


def cetvm(capsys, *argv: str) -> CliRun:
    """`cetvm ARGV...` in this process; stdout/stderr captured."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return CliRun(status, captured.out, captured.err)


def assert_one_line_error(run: CliRun, status: int = 2, *fragments: str) -> str:
    """The contract for bad input: exit ``status``, stderr exactly one line starting with
    ``cetvm: error:`` (or ``cetvm:`` for a failed run), no traceback, no cetvm bug report, and
    every fragment present (case-insensitive). Returns the line."""
    assert "Traceback" not in run.err + run.out
    lines = run.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {run.err!r}"
    line = lines[0]
    assert line.startswith("cetvm:"), line
    assert "a bug in cetvm" not in line, line
    assert run.status == status, (run.status, line)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), (fragment, line)
    return line
