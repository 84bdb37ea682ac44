"""Reading a Linux guest's console output: what /init (:mod:`cetvm.linux.init_script`) reported
and what each test program printed, as data a test or a report can check.

Test program output is TAP (our guests/linux programs: ``1..N``, ``ok N - what``,
``not ok N - what``, ``... # SKIP why``, ``1..0 # SKIP why``) or the kernel selftests' style
(``[OK]\\twhat``, ``[FAIL]\\twhat``, ``[SKIP]\\twhat``, ``[INFO]`` and ``[RUN]`` are notes).
Lines between ``cetvm-init: run NAME`` and ``cetvm-init: exit NAME STATUS`` belong to NAME;
kernel messages that reach the console anyway (``[    1.234] ...``) are left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from cetvm.linux.init_script import INIT_PREFIX

TAP_PLAN = re.compile(r"^1\.\.(\d+)(?:\s*#\s*SKIP\b\s*(.*))?$", re.IGNORECASE)
TAP_RESULT = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*?)(?:\s*#\s*(SKIP|TODO)\b\s*(.*))?$", re.IGNORECASE)
SELFTEST_RESULT = re.compile(r"^\[(OK|FAIL|SKIP)\]\s*(.*)$")
KERNEL_MESSAGE = re.compile(r"^\[\s*\d+\.\d+\]")


class Outcome(Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    """One result line of a program: its outcome and what it checked (and why, for a skip)."""

    outcome: Outcome
    what: str
    number: int | None = None
    reason: str = ""


@dataclass
class ProgramRun:
    """One test program run by /init: its checks and exit status (None: it never finished —
    the guest stopped, hung or crashed while it ran)."""

    name: str
    checks: list[Check] = field(default_factory=list)
    status: int | None = None
    skip_reason: str = ""
    planned: int | None = None
    output: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> Outcome:
        """SKIP when the program skipped everything (``1..0 # SKIP``, or only [SKIP] lines) and
        failed nothing; PASS when it exited 0 with no failed check and its plan complete; else
        FAIL. The selftest exits 1 after "[SKIP] Could not enable Shadow stack": a skip."""
        failed = any(c.outcome is Outcome.FAIL for c in self.checks)
        if not failed and (self.skip_reason or (self.checks and all(c.outcome is Outcome.SKIP for c in self.checks))):
            return Outcome.SKIP
        if self.status != 0 or failed or not self.checks:
            return Outcome.FAIL
        if self.planned is not None and len(self.checks) != self.planned:
            return Outcome.FAIL
        return Outcome.PASS

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.outcome is Outcome.FAIL]

    @property
    def signal(self) -> int | None:
        """The signal that ended the program (shell status 128 + N), if one did."""
        return self.status - 128 if self.status is not None and self.status > 128 else None


@dataclass
class GuestReport:
    """Everything /init reported in one boot."""

    started: bool = False
    finished: bool = False
    kernel: str = ""
    options: dict[str, str] = field(default_factory=dict)
    dmesg: list[str] = field(default_factory=list)
    cpu_flags: dict[str, bool] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    programs: list[ProgramRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def program(self, name: str) -> ProgramRun | None:
        return next((p for p in self.programs if p.name == name), None)

    @property
    def ibt_enabled(self) -> bool:
        """The kernel said "CET detected: Indirect Branch Tracking enabled"."""
        return any("Indirect Branch Tracking enabled" in line for line in self.dmesg)

    @property
    def all_passed(self) -> bool:
        """Every selected program ran to its end and none failed (skips allowed)."""
        ran = {p.name for p in self.programs}
        return self.finished and set(self.selected) <= ran and all(
            p.outcome is not Outcome.FAIL for p in self.programs)

    def summary(self) -> str:
        """One line per program: ``NAME: pass|fail|skip (N checks, status S)``."""
        lines = []
        for p in self.programs:
            skips = [c.reason or c.what for c in p.checks if c.outcome is Outcome.SKIP]
            detail = (p.skip_reason or ", ".join(c.what for c in p.failures())
                      or (p.outcome is Outcome.SKIP and "; ".join(skips)) or f"{len(p.checks)} checks")
            lines.append(f"{p.name}: {p.outcome.value} ({detail}; status {p.status})")
        if not self.finished:
            lines.append("the guest did not reach 'done' (crashed, hung or stopped early)")
        return "\n".join(lines)


def parse_check(line: str) -> Check | None:
    """A TAP or selftest result line as a :class:`Check` (None for any other line)."""
    tap = TAP_RESULT.match(line)
    if tap:
        word, number, what, directive, reason = tap.groups()
        if directive and directive.upper() == "SKIP":
            outcome = Outcome.SKIP
        elif word.lower() == "ok" or directive:  # TODO: an expected failure, not ours
            outcome = Outcome.PASS
        else:
            outcome = Outcome.FAIL
        return Check(outcome, what.strip(), int(number) if number else None, (reason or "").strip())
    selftest = SELFTEST_RESULT.match(line)
    if selftest:
        word, what = selftest.groups()
        outcome = {"OK": Outcome.PASS, "FAIL": Outcome.FAIL, "SKIP": Outcome.SKIP}[word]
        return Check(outcome, what.strip(), reason=what.strip() if outcome is Outcome.SKIP else "")
    return None


def _program_line(program: ProgramRun, line: str) -> None:
    program.output.append(line)
    plan = TAP_PLAN.match(line)
    if plan:
        program.planned = int(plan.group(1))
        if program.planned == 0:
            program.skip_reason = (plan.group(2) or "skipped").strip()
        return
    check = parse_check(line)
    if check is not None:
        program.checks.append(check)


def parse_program_output(name: str, text: str, status: int | None) -> ProgramRun:
    """One program's output and exit status (run anywhere: in the guest or on a host with user
    shadow stacks) as a :class:`ProgramRun`."""
    program = ProgramRun(name, status=status)
    for line in text.splitlines():
        _program_line(program, line.strip())
    return program


def _init_line(report: GuestReport, current: ProgramRun | None, text: str) -> ProgramRun | None:
    """Apply one /init line; returns the program now running (if any)."""
    word, _, rest = text.partition(" ")
    if word == "start":
        report.started = True
        for item in rest.split():
            key, _, value = item.partition("=")
            if key == "kernel":
                report.kernel = value
            else:
                report.options[key] = value
    elif word == "dmesg:":
        report.dmesg.append(rest)
    elif word == "cpuflag":
        name, _, value = rest.partition(" ")
        report.cpu_flags[name] = value.strip() == "yes"
    elif word == "tests":
        report.selected = rest.split()
    elif word == "run":
        current = ProgramRun(rest.strip())
        report.programs.append(current)
    elif word == "exit":
        name, _, status = rest.partition(" ")
        program = current if current is not None and current.name == name else report.program(name)
        if program is not None and status.strip().lstrip("-").isdigit():
            program.status = int(status)
        return None
    elif word == "done":
        report.finished = True
    else:
        report.notes.append(text)
    return current


def parse_console(text: str | bytes) -> GuestReport:
    """Parse a guest's whole console output (CR/LF line ends, stray kernel messages and bytes
    that are not UTF-8 are all fine)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    report = GuestReport()
    current: ProgramRun | None = None
    for raw in text.splitlines():
        line = raw.rstrip("\r").rstrip()
        stripped = line.lstrip()
        if stripped.startswith(INIT_PREFIX):
            current = _init_line(report, current, stripped[len(INIT_PREFIX):].strip())
        elif current is not None and not KERNEL_MESSAGE.match(stripped):
            _program_line(current, stripped)
    return report
