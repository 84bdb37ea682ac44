"""`cetvm cpuid` through the real entry point."""

from __future__ import annotations

import json

from cetvm.cli.main import main

from shared_data import dump  # noqa: E402


def test_cpuid_command_on_a_dump(capsys):
    assert main(["cpuid", str(dump("sapphire-rapids.txt"))]) == 0
    out = capsys.readouterr().out
    assert "SHSTK yes  IBT yes" in out
    assert "MISMATCH" not in out
    assert "0x2a80 / 0x2a80  ok" in out
    cet_u = next(line for line in out.splitlines() if "CET_U" in line and line.strip().startswith("11"))
    assert " 16 " in cet_u


def test_cpuid_command_json_for_a_model(capsys):
    assert main(["cpuid", "zen4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["vendor"] == "amd"
    assert doc["features"]["shstk"] is True and doc["features"]["ibt"] is False
    assert doc["xss_mask"] == "0x1800" and doc["xss_components"] == ["CET_U", "CET_S"]
    assert all(size["ok"] for size in doc["sizes"]) and len(doc["sizes"]) == 3
    assert [c["number"] for c in doc["components"]] == [2, 5, 6, 7, 9, 11, 12]


def test_cpuid_command_malformed_file(tmp_path, capsys):
    bad = tmp_path / "broken.txt"
    bad.write_text("# dump\nCPUID 00000000: 0000000D-756E6547-6C65746E-49656E69\nCPUID 00000001: 0000-zz\n")
    assert main(["cpuid", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cetvm: error: broken.txt line 3: expected 4 hex words 'EAX-EBX-ECX-EDX', got '0000-zz'"


def test_cpuid_command_unknown_model(capsys):
    assert main(["cpuid", "tigerlake"]) == 2
    assert "tiger-lake" in capsys.readouterr().err


def test_cpuid_export_round_trips_through_a_file(tmp_path, capsys):
    assert main(["cpuid", "tiger-lake", "--export"]) == 0
    exported = tmp_path / "tgl.json"
    exported.write_text(capsys.readouterr().out)
    assert main(["cpuid", str(exported), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "tiger-lake" and doc["features"]["ibt"] is True
    assert doc["xss_mask"] == "0x3900"
