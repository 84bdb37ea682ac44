"""cetvm conformance: the report it writes, re-reading a QEMU table, the QEMU TCG wrapper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cetvm import InputError
from cetvm.cli.conformance import selected_entries
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


def test_vmx_subtest_verdicts_and_section(tmp_path):
    """A vmx sub-test passes only with all reports passing and the summary reached; a hang or an
    abort fails it; the vmx section replaces itself at the end of a report."""
    from cetvm.conformance import EntryResult, vmx_subtest_verdict, write_vmx_section

    assert vmx_subtest_verdict("PASS: a\nPASS: b\nSUMMARY: 2 tests\n", True)[0] == "PASS"
    verdict, detail, fails = vmx_subtest_verdict("PASS: a\nFAIL: b\nSUMMARY: 2 tests, 1 unexpected failures\n", True)
    assert (verdict, fails) == ("FAIL", ["FAIL: b"])
    assert vmx_subtest_verdict("PASS: a\n", False)[0] == "FAIL"
    assert "aborted" in vmx_subtest_verdict("PASS: a\n", True)[1]
    assert vmx_subtest_verdict("SKIP: x\nSUMMARY: 1 tests, 1 skipped\n", True)[0] == "SKIP"
    report = tmp_path / "conformance.md"
    report.write_text("# report\n\n## cetvm\n\n| a | PASS | 1.0 | |\n")
    for verdict in ("FAIL", "PASS"):
        write_vmx_section(report, [EntryResult("vmx_cet_test", verdict, 3.0, "3 PASS")], "intro")
    text = report.read_text()
    assert text.count("## vmx sub-tests") == 1 and "| vmx_cet_test | PASS |" in text and "## cetvm" in text


def test_only_takes_commas_and_refuses_unknown_entries(tmp_path):
    (tmp_path / "x86").mkdir()
    (tmp_path / "x86" / "unittests.cfg").write_text("[smptest]\nfile = smptest.flat\n[tsc]\nfile = tsc.flat\n")
    assert selected_entries(tmp_path, None) is None
    assert selected_entries(tmp_path, ["tsc,smptest", "tsc"]) == ["tsc", "smptest", "tsc"]
    with pytest.raises(InputError, match="no entry nosuch .*entries: smptest tsc"):
        selected_entries(tmp_path, ["smptest,nosuch"])
