"""cetvm conformance: the report it writes, re-reading a QEMU table, the QEMU TCG wrapper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cetvm import InputError
from cetvm.conformance import (EntryResult, check_kut, list_entries, qemu_tcg_wrapper, read_report_table, totals,
                               write_report)


def test_report_tables_totals_and_qemu_only_passes(tmp_path):
    cetvm = [EntryResult("a", "PASS", 1.0, "(3 tests)"), EntryResult("b", "FAIL", 2.5, "", ["FAIL: x | y"]),
             EntryResult("c", "SKIP", 0.5, "(0 tests)")]
    qemu = [EntryResult("a", "PASS", 1.0), EntryResult("b", "PASS", 1.0), EntryResult("c", "FAIL", 1.0)]
    out = tmp_path / "conformance.md"
    write_report(out, cetvm, qemu, "# title\n", notes={"b": "because"})
    text = out.read_text()
    assert "| b | FAIL | 2.5 | FAIL: x \\| y |" in text
    assert "| **total** | 1 PASS, 1 FAIL, 1 SKIP |" in text
    assert "- **b** (cetvm FAIL): because (observed: FAIL: x \\| y)" in text and "**a**" not in text.split("does not")[1]
    again = read_report_table(out, "QEMU TCG")
    assert [(r.name, r.verdict) for r in again] == [("a", "PASS"), ("b", "PASS"), ("c", "FAIL")]
    assert totals(read_report_table(out, "cetvm")) == {"PASS": 1, "FAIL": 1, "SKIP": 1}
    with pytest.raises(InputError):
        read_report_table(out, "nothing")


def test_qemu_wrapper_turns_cpu_host_into_max_and_drops_enable_kvm(tmp_path):
    echo = tmp_path / "echo-args"
    echo.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    echo.chmod(0o755)
    wrapper = qemu_tcg_wrapper(str(echo), tmp_path)
    out = subprocess.run([str(wrapper), "-enable-kvm", "-cpu", "host,+x2apic", "-m", "2048", "-cpu", "qemu64"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:6] == ["-cpu", "max,+x2apic", "-m", "2048", "-cpu", "qemu64"]


def test_kut_directory_is_checked(tmp_path):
    with pytest.raises(InputError, match="not a configured kvm-unit-tests tree"):
        check_kut(tmp_path)
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text("[one]\nfile = a.flat\n\n[two]\nfile = b.flat\n")
    assert list_entries(Path(tmp_path)) == ["one", "two"]
