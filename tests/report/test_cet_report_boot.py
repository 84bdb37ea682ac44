"""`cetvm boot --cet-report` on the project's CET guests: kinds, counts, symbols checked against
the image (nm / the ELF bytes), stack values consistent with the architecture, and a guest that
behaves exactly as without the option."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cetvm.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
GUESTS = ROOT / "guests" / "build"
DEMO = GUESTS / "demo.elf"
TESTS = GUESTS / "tests"

pytestmark = pytest.mark.skipif(not DEMO.is_file(), reason="guests not built (make -C guests)")


def nm_symbols(image: Path) -> dict[int, set[str]]:
    """Address → names, from binutils' nm (independent of cetvm's reader)."""
    if shutil.which("nm") is None:
        pytest.skip("nm not installed")
    out: dict[int, set[str]] = {}
    for line in subprocess.run(["nm", str(image)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.setdefault(int(parts[0], 16), set()).add(parts[2])
    return out


def base_name(symbol: str | None) -> str | None:
    return None if symbol is None else symbol.split("+")[0]


def symbol_start(symbol: str, rip: int) -> int:
    return rip - (int(symbol.split("+")[1], 16) if "+" in symbol else 0)


def image_bytes(image: Path, vaddr: int, size: int) -> bytes:
    """Bytes of an ELF64 image at a virtual address, through its PT_LOAD headers."""
    data = image.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        typ, _flags, offset, va, _pa, filesz, _memsz, _align = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if typ == 1 and va <= vaddr and vaddr + size <= va + filesz:
            return data[offset + vaddr - va: offset + vaddr - va + size]
    raise AssertionError(f"{vaddr:#x} is not in a PT_LOAD segment of {image}")


def boot(capsys, image: Path, *extra: str) -> tuple[int, str, str]:
    status = main(["boot", str(image), "--memory", "64M", "--max-instructions", "20000000", *extra])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """demo.elf without and with --cet-report (JSON result + JSON report file)."""
    mp = pytest.MonkeyPatch()
    out_dir = tmp_path_factory.mktemp("demo")
    results = {}
    import io
    import sys
    for key, extra in (("plain", ["--json"]),
                       ("report", ["--json", "--cet-report", str(out_dir / "r.json")])):
        stdout, stderr = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)
        status = main(["boot", str(DEMO), "--memory", "64M", "--max-instructions", "20000000", *extra])
        mp.undo()
        results[key] = (status, json.loads(stdout.getvalue()), stderr.getvalue())
    results["file"] = json.loads((out_dir / "r.json").read_text())
    return results


def test_demo_guest_behaves_exactly_as_without_the_report(demo_runs):
    plain_status, plain, _ = demo_runs["plain"]
    status, doc, _ = demo_runs["report"]
    assert status == plain_status == 1
    assert doc["serial"] == plain["serial"]
    assert doc["instructions"] == plain["instructions"]
    assert doc["status"] == plain["status"]
    assert "cet_violations" not in plain


def test_demo_reports_two_rop_and_two_jop_in_order(demo_runs):
    violations = demo_runs["report"][1]["cet_violations"]
    assert [(v["error_code"], v["kind"], v["cpl"]) for v in violations] == [
        (1, "near-ret", 3), (3, "endbranch", 3), (1, "near-ret", 0), (3, "endbranch", 0)]
    assert demo_runs["file"]["cet_violations"] == violations
    counts = [v["instructions"] for v in violations]
    assert counts == sorted(counts) and counts[-1] < demo_runs["report"][1]["instructions"]


def test_demo_violation_sites_are_named_as_nm_names_them(demo_runs):
    names = nm_symbols(DEMO)
    for v in demo_runs["report"][1]["cet_violations"]:
        symbol = v["symbol"]
        assert symbol is not None
        assert base_name(symbol) in names[symbol_start(symbol, v["rip"])]
    sites = [base_name(v["symbol"]) for v in demo_runs["report"][1]["cet_violations"]]
    assert sites[1] == "user_win" and sites[3] == "kernel_win"


def test_near_ret_stacks_disagree_and_shadow_holds_a_real_return_address(demo_runs):
    names = nm_symbols(DEMO)
    for v in demo_runs["report"][1]["cet_violations"]:
        if v["kind"] != "near-ret":
            continue
        assert v["data_stack_top"] != v["shadow_stack_top"]
        # The RET faulted: the byte at RIP is a near RET (C3, or C2 imm16).
        assert image_bytes(DEMO, v["rip"], 1) in (b"\xc3", b"\xc2")
        # The shadow-stack entry was pushed by a CALL rel32 that ends right there.
        assert image_bytes(DEMO, v["shadow_stack_top"] - 5, 1) == b"\xe8"
        # The data-stack value is the attacker's gadget, a symbol of its own.
        assert v["data_stack_top"] in names and v["data_stack_symbol"] in names[v["data_stack_top"]]
        assert "gadget" in v["data_stack_symbol"]


def test_endbranch_target_bytes_are_the_image_bytes_without_endbr(demo_runs):
    for v in demo_runs["report"][1]["cet_violations"]:
        if v["kind"] != "endbranch":
            continue
        target = bytes.fromhex(v["target_bytes"])
        assert target == image_bytes(DEMO, v["rip"], len(target))
        assert target[:4] not in (bytes.fromhex("f30f1efa"), bytes.fromhex("f30f1efb"))


@pytest.mark.parametrize("guest, kinds", [
    ("shstk_user.elf", ["near-ret", "near-ret"]),
    ("ibt.elf", ["endbranch"] * 4),
    ("shstk_farret.elf", ["far-ret/iret"]),
])
def test_test_guests_text_report_on_stderr(capsys, guest, kinds):
    image = TESTS / guest
    plain_status, plain_out, _ = boot(capsys, image)
    status, out, err = boot(capsys, image, "--cet-report")
    assert (status, out) == (plain_status, plain_out)
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("#CP(")]
    assert [line.split()[1] for line in lines] == kinds
    names = nm_symbols(image)
    all_names = set().union(*names.values())
    for line in lines:
        symbol = line.split("<", 1)[1].split(">", 1)[0]
        assert base_name(symbol) in all_names


def test_text_report_file(tmp_path, capsys):
    target = tmp_path / "cet.txt"
    status, _, err = boot(capsys, TESTS / "shstk_user.elf", "--cet-report", str(target))
    assert status == 1 and "#CP(" not in err
    text = target.read_text()
    assert text.startswith("cetvm: 2 CET violations (#CP)")
    assert "data stack [rsp=" in text and "shadow stack [ssp=" in text


def test_unwritable_report_file_is_bad_input(tmp_path, capsys):
    status, _, err = boot(capsys, TESTS / "shstk_user.elf", "--cet-report", str(tmp_path / "no" / "r.json"))
    assert status == 2 and "--cet-report" in err and "Traceback" not in err


def test_symbols_from_a_system_map_name_sites_an_image_without_them_cannot(capsys, tmp_path):
    """Issue 10: a bzImage has no .symtab; --symbols FILE (a System.map / kallsyms text, or a user
    program's ELF) names the violation sites. Here: the demo's sites from an nm-made map of a
    stripped copy of the demo."""
    if shutil.which("strip") is None or shutil.which("nm") is None:
        pytest.skip("binutils strip/nm not installed")
    stripped = tmp_path / "demo-stripped.elf"
    subprocess.run(["strip", "-o", str(stripped), str(DEMO)], check=True)
    system_map = tmp_path / "System.map"
    system_map.write_text(subprocess.run(["nm", "-n", str(DEMO)], capture_output=True, text=True,
                                         check=True).stdout)
    report = tmp_path / "r.json"
    status, _, _ = boot(capsys, stripped, "--cet-report", str(report))
    assert status == 1
    assert {v["symbol"] for v in json.loads(report.read_text())["cet_violations"]} == {None}
    status, _, _ = boot(capsys, stripped, "--cet-report", str(report), "--symbols", str(system_map))
    sites = [base_name(v["symbol"]) for v in json.loads(report.read_text())["cet_violations"]]
    assert sites[1] == "user_win" and sites[3] == "kernel_win"


def test_a_symbols_file_that_is_neither_elf_nor_a_map_is_one_error_line(capsys, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello world\n")
    status, _, err = boot(capsys, DEMO, "--cet-report", "--symbols", str(bad))
    assert status == 2 and "line 1 is not 'address type name'" in err and err.count("\n") == 1
