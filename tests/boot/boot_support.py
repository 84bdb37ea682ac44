"""Helpers for the boot acceptance tests: find (or build) the guest kernels, run `cetvm boot`,
read TAP output; tiny ELF64 kernels come from :mod:`spec_images`."""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.cli.main import main
from guest_build import GUEST_BUILD
from guest_build import demo_kernel  # noqa: F401  (re-exported)
from guest_build import tap_kernel as guest  # noqa: F401  (re-exported)
from spec_images import (  # noqa: F401  (re-exported: the boot tests' machine-code toolkit)
    CLI_HLT,
    JMP_SELF,
    KERNEL_BASE,
    UD2,
    debug_exit,
    elf64_kernel,
    out_imm8,
    outw_dx,
    serial_text,
)

GUEST_TESTS = GUEST_BUILD / "tests"
DEMO_ELF = GUEST_BUILD / "demo.elf"
#: Every boot test is capped: the TAP kernels need about 0.3 M instructions.
MAX_INSTRUCTIONS = "5000000"


@dataclass
class BootRun:
    status: int
    out: str
    err: str

    @property
    def tap(self) -> "Tap":
        return Tap.parse(self.out)


def boot(capsys, *args: str) -> BootRun:
    """`cetvm boot ARGS...` in this process; stdout/stderr captured."""
    status = main(["boot", *args])
    captured = capsys.readouterr()
    return BootRun(status, captured.out, captured.err)


@dataclass
class Tap:
    plan: int | None
    results: list[tuple[bool, int, str]]  # (ok, number, description incl. directive)

    @classmethod
    def parse(cls, text: str) -> "Tap":
        plan, results = None, []
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("1.."):
                plan = int(line[3:])
            elif line.startswith("ok ") or line.startswith("not ok "):
                ok = line.startswith("ok ")
                rest = line[3:] if ok else line[7:]
                number, _, desc = rest.partition(" - ")
                results.append((ok, int(number), desc))
        return cls(plan, results)

    def failures(self) -> list[str]:
        return [desc for ok, _n, desc in self.results if not ok]

    def skipped(self) -> list[str]:
        return [desc for ok, _n, desc in self.results if ok and "# SKIP" in desc]

    def passed(self, name_part: str) -> bool:
        """The test whose description contains ``name_part`` passed without SKIP."""
        matches = [(ok, desc) for ok, _n, desc in self.results if name_part in desc]
        assert matches, f"no TAP line mentions {name_part!r}"
        return all(ok and "# SKIP" not in desc for ok, desc in matches)

    def assert_complete_and_green(self) -> None:
        assert self.plan is not None, "no TAP plan line"
        assert [n for _ok, n, _d in self.results] == list(range(1, self.plan + 1)), "TAP results do not match the plan"
        assert not self.failures(), f"failing TAP lines: {self.failures()}"
