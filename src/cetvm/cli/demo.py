"""`cetvm demo`: the same attacks with CET on and with CET hidden from the guest.

Boots guests/build/demo.elf twice on a modeled Sapphire Rapids host: once with the guest CPUID
showing SHSTK and IBT (the demo kernel turns on kernel IBT and supervisor shadow stacks, and user
shadow stacks + IBT in ring 3), once with ``--cet off``. Each run's serial output is shown
indented; a table then gives, per attack, what happened in each run. The exit status is 0 when
every attack was blocked by the expected #CP with CET on, succeeded with CET off, and both guests
exited cleanly.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from cetvm import InputError
from cetvm.files import input_size
from cetvm.report import CetViolation, Symbolizer
from cetvm.report.violation import ENDBR32, ENDBR64
from cetvm.vmm.config import DEFAULT_CPU_MODEL, CetMode, MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import RunResult

DEMO_IMAGE = Path("guests") / "build" / "demo.elf"
#: Instruction cap per run (the demo needs about 0.3 M).
DEMO_MAX_INSTRUCTIONS = 50_000_000
DEMO_MEMORY = "64M"

#: Attack → the #CP error code that must stop it [SDM Vol. 1 §18.2: 1 NEAR_RET, 3 ENDBRANCH].
EXPECTED_CP = {"ROP (ring 3)": 1, "JOP (ring 3)": 3, "ROP (ring 0)": 1, "JOP (ring 0)": 3}
#: #CP kind → the attack class it stops [SDM Vol. 1 §18.1: NEAR_RET stops ROP, ENDBRANCH stops JOP].
ATTACK_OF_KIND = {"near-ret": "ROP", "endbranch": "JOP"}
#: Columns of the violation blocks (readable in a 100-column terminal).
REPORT_WIDTH = 100
REPORT_INDENT = "    "

_ATTACK_LINE = re.compile(r"^(?P<attack>[RJ]OP \(ring [03]\)): (?P<text>.*)$")
_BLOCKED = re.compile(r"blocked by #CP\((?P<code>\d+)\)")


@dataclass(frozen=True)
class Outcome:
    """What the guest reported for one attack."""

    blocked_by: int | None  # #CP error code, when blocked
    succeeded: bool
    text: str

    def describe(self) -> str:
        if self.blocked_by is not None:
            return f"blocked by #CP({self.blocked_by})"
        if self.succeeded:
            return "succeeded"
        return "unexpected: " + self.text


def parse_outcomes(serial: str) -> dict[str, Outcome]:
    """Attack name → outcome, from the demo kernel's serial lines."""
    found: dict[str, Outcome] = {}
    for line in serial.splitlines():
        match = _ATTACK_LINE.match(line.strip())
        if not match:
            continue
        text = match.group("text")
        blocked = _BLOCKED.search(text)
        found[match.group("attack")] = Outcome(int(blocked.group("code")) if blocked else None,
                                               "attack SUCCEEDED" in text, text)
    return found


def expected(outcome: Outcome | None, attack: str, cet_on: bool) -> bool:
    if outcome is None:
        return False
    if cet_on:
        return outcome.blocked_by == EXPECTED_CP[attack]
    return outcome.succeeded


def find_demo_image(start: Path | None = None) -> Path:
    """guests/build/demo.elf of this source tree (the package lives in src/cetvm)."""
    for root in ([start] if start else []) + [Path(__file__).resolve().parents[3], Path.cwd()]:
        candidate = root / DEMO_IMAGE
        if candidate.is_file():
            return candidate
    raise InputError(f"the demo guest {DEMO_IMAGE} is missing: build it with 'make -C guests' "
                     "(needs gcc and binutils)")


def run_once(image: Path, cet: CetMode, cpu: str,
             record: bool = False) -> tuple[RunResult, str, list[CetViolation]]:
    """One boot of the demo: (result, serial text, the #CP violations when ``record``)."""
    serial = bytearray()
    config = MachineConfig(cpu=cpu, memory=DEMO_MEMORY, cet=cet, serial_sink=serial.extend)
    machine = Machine.boot(image, config)
    violations = machine.record_cet_violations().violations if record else []
    result = machine.run(max_instructions=DEMO_MAX_INSTRUCTIONS, timeout=120)
    return result, serial.decode("utf-8", errors="replace").replace("\r\n", "\n"), violations


def demo_symbols(image: Path) -> Symbolizer | None:
    """The image's .symtab for naming addresses, or None when it has none cetvm can read (e.g. a
    multiboot a.out-kludge image): the report then shows bare addresses. Decision: an image that
    cannot be booted is reported by the loader's own error, so symbols never fail the demo."""
    try:
        return Symbolizer.from_elf(image)
    except InputError:
        return None


def attack_name(v: CetViolation) -> str:
    """The demo attack a #CP stopped: ROP for near-ret, JOP for endbranch, ring = CPL
    (any other kind is named by the kind itself)."""
    return f"{ATTACK_OF_KIND.get(v.kind, '#CP ' + v.kind)} (ring {v.cpl})"


def _named(addr: int | None, symbols: Symbolizer | None) -> str:
    """``name+0xoff (0xaddr)``, the hex alone when unnamed, ``<unreadable>`` for None."""
    if addr is None:
        return "<unreadable>"
    name = symbols.name_of(addr) if symbols is not None else None
    return f"{name} ({addr:#x})" if name else f"{addr:#x}"


def _target_note(target: bytes | None) -> str:
    """ENDBRANCH: whether the branch target starts with ENDBR64/ENDBR32 (SDM Vol. 1 §18.3)."""
    if target is None:
        return "bytes unreadable"
    verdict = "starts with ENDBR" if target[:4] in (ENDBR64, ENDBR32) else "no ENDBR"
    return f"{verdict} (bytes {target[:4].hex(' ')} ...)"


def violation_lines(v: CetViolation, symbols: Symbolizer | None) -> list[str]:
    """The unwrapped lines of one violation's block: headline, then the evidence."""
    lines = [f"{attack_name(v)} stopped: #CP({v.error_code}) {v.kind} at {_named(v.rip, symbols)}"]
    if v.kind == "endbranch":
        lines.append(f"branch target {_named(v.rip, symbols)}: {_target_note(v.target_bytes)}")
    else:
        lines.append(f"data stack says   {_named(v.data_top, symbols)}")
        lines.append(f"shadow stack says {_named(v.shadow_top, symbols)}")
    return lines


def _fit(line: str, prefix: str, width: int) -> list[str]:
    """``prefix + line`` wrapped to ``width`` columns, continuation lines indented 8 more. Words
    (symbol names) are never split: a single name longer than a line stays whole."""
    return textwrap.wrap(line, width=width, initial_indent=prefix, subsequent_indent=prefix + " " * 8,
                         break_long_words=False, break_on_hyphens=False) or [prefix]


def violation_report(violations: list[CetViolation], symbols: Symbolizer | None,
                     width: int = REPORT_WIDTH) -> str:
    """The CET report shown under the CET-on run: a count line, then a block per violation."""
    count = f"{len(violations)} violation{'s' if len(violations) != 1 else ''}"
    out = _fit(f"CET report: {count} (each #CP recorded before delivery, as by cetvm boot --cet-report)",
               REPORT_INDENT[:-1], width)
    for v in violations:
        headline, *evidence = violation_lines(v, symbols)
        out += _fit(headline, REPORT_INDENT, width)
        for line in evidence:
            out += _fit(line, REPORT_INDENT + "    ", width)
    return "\n".join(out)


def indented(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").splitlines())


def report_table(on: dict[str, Outcome], off: dict[str, Outcome]) -> tuple[str, bool]:
    """The attack × {CET on, CET off} table and whether every cell is as expected."""
    header = ("attack", "CET on", "CET off")
    rows, all_good = [], True
    for attack in EXPECTED_CP:
        cells = []
        for outcomes, cet_on in ((on, True), (off, False)):
            outcome = outcomes.get(attack)
            good = expected(outcome, attack, cet_on)
            all_good &= good
            cells.append((outcome.describe() if outcome else "no result") + ("" if good else "  <- UNEXPECTED"))
        rows.append((attack, *cells))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    text = [("  ".join(h.ljust(w) for h, w in zip(header, widths))).rstrip(), line]
    text += [("  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip() for row in rows]
    return "\n".join(text), all_good


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="ROP/JOP attacks on a guest kernel with CET on and off",
        description="Boot the demo kernel twice on a modeled Sapphire Rapids: with CET (the attacks are "
                    "stopped by #CP) and with CET hidden from the guest (the attacks succeed).")
    p.add_argument("--cpu", default=DEFAULT_CPU_MODEL, metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--image", default=None, metavar="FILE", help="demo kernel (default: guests/build/demo.elf of this checkout, built by make)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    image = Path(args.image) if args.image else find_demo_image()
    input_size(image, f"kernel file '{image}'")  # a missing or special file: one error, nothing printed
    symbols = demo_symbols(image)
    outcomes, clean = {}, True
    for cet, title in ((CetMode.ON, "CET on (guest CPUID shows SHSTK and IBT)"),
                       (CetMode.OFF, "CET off (--cet off: CET hidden from the guest)")):
        print(f"== {title}: cetvm boot {image} --cet {cet.value}")
        result, serial, violations = run_once(image, cet, args.cpu, record=cet is CetMode.ON)
        print(indented(serial))
        if cet is CetMode.ON:
            print(violation_report(violations, symbols))
        print(f"   -> {result.reason.value}, exit status {result.exit_code}, {result.instructions} instructions")
        if result.exit_code != 1:
            clean = False
            print(f"cetvm: {result.diagnosis()}", file=sys.stderr)
        outcomes[cet] = parse_outcomes(serial)
        print()
    table, all_good = report_table(outcomes[CetMode.ON], outcomes[CetMode.OFF])
    print(table)
    ok = all_good and clean
    print()
    print("result: every attack was stopped by #CP with CET on and succeeded without it" if ok
          else "result: UNEXPECTED behaviour (see the rows marked above)")
    return 0 if ok else 1
