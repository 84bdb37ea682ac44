"""`cetvm demo`: attacks blocked by #CP with CET on, successful with CET hidden; the report."""

import re

from cetvm.cli.demo import parse_outcomes, report_table
from cetvm.cli.main import main

from boot_support import DEMO_ELF, demo_kernel


def test_demo_blocks_every_attack_with_cet_and_not_without(capsys):
    demo_kernel()  # builds the guests if needed
    assert DEMO_ELF.exists()
    status = main(["demo"])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = {m.group(1): (m.group(2), m.group(3)) for m in
            re.finditer(r"^([RJ]OP \(ring [03]\))\s+(blocked by #CP\(\d\)|succeeded)\s+(blocked by #CP\(\d\)|succeeded)\s*$",
                        out, re.M)}
    assert rows == {
        "ROP (ring 3)": ("blocked by #CP(1)", "succeeded"),
        "JOP (ring 3)": ("blocked by #CP(3)", "succeeded"),
        "ROP (ring 0)": ("blocked by #CP(1)", "succeeded"),
        "JOP (ring 0)": ("blocked by #CP(3)", "succeeded"),
    }
    # each run's serial output is shown, indented
    assert "    cetvm CET demo: CPUID SHSTK=1 IBT=1" in out
    assert "    cetvm CET demo: CPUID SHSTK=0 IBT=0" in out


def test_report_flags_an_attack_that_got_through_with_cet_on():
    on = parse_outcomes("ROP (ring 3): attack SUCCEEDED, gadget ran\n"
                        "JOP (ring 3): x -> blocked by #CP(3) endbranch at rip=0x1\n"
                        "ROP (ring 0): x -> blocked by #CP(2) near-ret at rip=0x1\n")
    off = parse_outcomes("ROP (ring 3): attack SUCCEEDED, gadget ran\n")
    table, good = report_table(on, off)
    assert not good
    assert re.search(r"^ROP \(ring 3\)\s+succeeded  <- UNEXPECTED\s+succeeded$", table, re.M)
    assert re.search(r"^ROP \(ring 0\)\s+blocked by #CP\(2\)  <- UNEXPECTED", table, re.M)  # wrong #CP code
    assert re.search(r"^JOP \(ring 0\)\s+no result  <- UNEXPECTED", table, re.M)
