"""`cetvm demo`: attacks blocked by #CP with CET on, successful with CET hidden; the report, and
under the CET-on run the symbolized #CP record of each blocked attack (names checked with nm)."""

import re
import shutil
import subprocess

import pytest

from cetvm.cli.demo import parse_outcomes, report_table, violation_report
from cetvm.cli.main import main
from cetvm.report import CetViolation, Symbol, Symbolizer

from boot_support import DEMO_ELF, demo_kernel

#: A headline of the CET-on run's report: attack, #CP code and kind, RIP symbol and address.
HEADLINE = re.compile(r"^    (?P<attack>[RJ]OP \(ring [03]\)) stopped: #CP\((?P<code>\d+)\) (?P<kind>[a-z-]+) "
                      r"at (?P<sym>\S+) \((?P<addr>0x[0-9a-f]+)\)$")
STACK = re.compile(r"^        (?P<stack>data|shadow) stack says +(?P<sym>\S+) \((?P<addr>0x[0-9a-f]+)\)$")
TARGET = re.compile(r"^        branch target (?P<sym>\S+) \((?P<addr>0x[0-9a-f]+)\): (?P<verdict>no ENDBR|starts with ENDBR)"
                    r" \(bytes (?P<bytes>[0-9a-f ]+) \.\.\.\)$")


def nm_addresses(image) -> dict[str, int]:
    """Symbol name → address, from binutils' nm (independent of cetvm's ELF reader)."""
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    out = {}
    for line in subprocess.run(["nm", str(image)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.setdefault(parts[2], int(parts[0], 16))
    return out


def resolve(sym: str, names: dict[str, int]) -> tuple[str, int]:
    """``name+0xoff`` → (name, nm address + offset); the name must be one nm knows."""
    name, _, off = sym.partition("+")
    assert name in names, f"{name!r} is not a symbol of {DEMO_ELF} according to nm"
    return name, names[name] + (int(off, 16) if off else 0)


def cet_on_blocks(out: str) -> dict[str, list[str]]:
    """The CET-on run's report: attack → [headline, evidence lines...]."""
    on_run = out.split("== CET off")[0]
    assert "CET report: 4 violations" in on_run, on_run
    section = on_run.split("CET report: ")[1].split("\n   -> ")[0].splitlines()[1:]
    blocks: dict[str, list[str]] = {}
    current = None
    for line in section:
        match = HEADLINE.match(line)
        if match:
            current = match.group("attack")
            assert current not in blocks, f"two blocks for {current}"
            blocks[current] = [line]
        else:
            assert current is not None and line.startswith("        "), line
            blocks[current].append(line)
    return blocks


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

    # under the CET-on run's serial output: one symbolized block per blocked attack
    names = nm_addresses(DEMO_ELF)
    blocks = cet_on_blocks(out)
    assert sorted(blocks) == sorted(rows)
    on_serial = out.split("== CET off")[0]
    assert on_serial.index("    summary:") < on_serial.index("CET report:") < on_serial.index("   -> guest exit")
    assert "CET report" not in out.split("== CET off")[1]  # CET hidden: nothing to record
    # (the guest's own line names the same RIP as the VMM's record)
    serial_rip = {m.group(1): int(m.group(2), 16) for m in
                  re.finditer(r"^    ([RJ]OP \(ring [03]\)): .* at rip=(0x[0-9a-f]+)$", out, re.M)}

    # demo.c: the service routine's RET pops the gadget the request wrote over its return
    # address, while the shadow stack still holds the return into the attack's caller
    for ring, service, gadget, caller in ((3, "user_service_copy", "user_gadget", "user_rop_main"),
                                          (0, "kernel_service_copy", "kernel_gadget", "attack_kernel_rop")):
        head, *evidence = blocks[f"ROP (ring {ring})"]
        h = HEADLINE.match(head)
        assert (h.group("code"), h.group("kind")) == ("1", "near-ret")
        name, addr = resolve(h.group("sym"), names)
        assert name.split(".")[0] == service and addr == int(h.group("addr"), 16) == serial_rip[f"ROP (ring {ring})"]
        stacks = {m.group("stack"): m for m in map(STACK.match, evidence)}
        assert sorted(stacks) == ["data", "shadow"], evidence
        assert stacks["data"].group("sym") == gadget
        assert resolve(gadget, names)[1] == int(stacks["data"].group("addr"), 16)
        name, addr = resolve(stacks["shadow"].group("sym"), names)
        assert name == caller and addr == int(stacks["shadow"].group("addr"), 16) and addr > names[caller]

    # demo.c: the function pointer is redirected past the ENDBR64 of a "win" function
    for ring, win in ((3, "user_win"), (0, "kernel_win")):
        head, *evidence = blocks[f"JOP (ring {ring})"]
        h = HEADLINE.match(head)
        assert (h.group("code"), h.group("kind"), h.group("sym")) == ("3", "endbranch", f"{win}+0x4")
        assert resolve(h.group("sym"), names)[1] == int(h.group("addr"), 16) == serial_rip[f"JOP (ring {ring})"]
        assert len(evidence) == 1
        t = TARGET.match(evidence[0])
        assert t and t.group("sym") == f"{win}+0x4" and t.group("verdict") == "no ENDBR", evidence
        assert bytes.fromhex(t.group("bytes")) != bytes.fromhex("f30f1efa")

    # readable in a 100-column terminal
    report_lines = out.split("CET report: ")[1].split("\n   -> ")[0].splitlines()
    assert all(len(line) <= 100 for line in report_lines), report_lines


def _near_ret(rip: int, data: int | None, shadow: int | None, cpl: int = 3) -> CetViolation:
    return CetViolation(1, rip, cpl, 0x8000, 0x9000, 10, data, shadow)


def test_report_block_wraps_long_names_and_falls_back_to_hex():
    long_name = "a_function_with_a_remarkably_long_name_from_the_compiler.constprop.0"
    symbols = Symbolizer([Symbol(long_name, 0x1000, 0x100, 2, 1), Symbol("gadget", 0x2000, 0x10, 2, 1)])
    text = violation_report([_near_ret(0x1010, 0x2000, 0x5555, cpl=0), _near_ret(0x7777, None, 0x1004)], symbols)
    lines = text.splitlines()
    assert lines[0].strip().startswith("CET report: 2 violations")
    assert all(len(line) <= 100 for line in lines), lines
    joined = re.sub(r"\s+", " ", text)
    assert f" ROP (ring 0) stopped: #CP(1) near-ret at {long_name}+0x10 (0x1010)" in joined
    assert "data stack says gadget (0x2000)" in joined
    assert "shadow stack says 0x5555" in joined  # unnamed: the address alone
    assert "ROP (ring 3) stopped: #CP(1) near-ret at 0x7777" in joined
    assert "data stack says <unreadable>" in joined
    # a wrapped headline continues indented deeper than the evidence lines under it
    assert any(line.startswith(" " * 12) and long_name in line for line in lines), lines


def test_report_block_says_whether_the_branch_target_has_endbr():
    symbols = Symbolizer([Symbol("win", 0x3000, 0x20, 2, 1)])
    bad = CetViolation(3, 0x3004, 3, 0x8000, 0x9000, 5, target_bytes=bytes.fromhex("b83c000000bf0d60"))
    good = CetViolation(3, 0x3000, 0, 0x8000, 0x9000, 6, target_bytes=bytes.fromhex("f30f1efa55"))
    text = violation_report([bad, good], symbols)
    assert "JOP (ring 3) stopped: #CP(3) endbranch at win+0x4 (0x3004)" in text
    assert "branch target win+0x4 (0x3004): no ENDBR (bytes b8 3c 00 00 ...)" in text
    assert "branch target win (0x3000): starts with ENDBR (bytes f3 0f 1e fa ...)" in text
    assert violation_report([], symbols).strip() == \
        "CET report: 0 violations (each #CP recorded before delivery, as by cetvm boot --cet-report)"


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


def test_report_without_symbols_shows_bare_addresses(tmp_path):
    from cetvm.cli.demo import demo_symbols
    not_elf = tmp_path / "kernel.bin"
    not_elf.write_bytes(b"\x02\xb0\xad\x1b" + bytes(60))  # no ELF header: nothing to name addresses with
    assert demo_symbols(not_elf) is None
    text = violation_report([_near_ret(0x1040e2, 0x104000, 0x1040fe)], demo_symbols(not_elf))
    assert "ROP (ring 3) stopped: #CP(1) near-ret at 0x1040e2\n" in text + "\n"
    assert re.search(r"data stack says +0x104000$", text, re.M)
    assert re.search(r"shadow stack says 0x1040fe$", text, re.M)
