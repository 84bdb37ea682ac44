"""CpuidModel, the dump loaders and the built-in models against the real InstLatx64 dumps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cetvm import InputError
from cetvm.cpuid import (
    CpuidEntry,
    CpuidModel,
    get_model,
    load_cpuid_file,
    model_names,
    parse_cpuid_raw,
    parse_instlatx64,
    resolve_model,
)

from shared_data import DUMPS, dump_files  # noqa: E402
DUMP_FILES = dump_files()
#: Built-in model → the dump it was transcribed from.
MODEL_DUMPS = {
    "sapphire-rapids": "sapphire-rapids.txt", "emerald-rapids": "emerald-rapids.txt",
    "tiger-lake": "tiger-lake.txt", "alder-lake": "alder-lake.txt", "ice-lake": "ice-lake.txt",
    "skylake-sp": "skylake-sp.txt", "zen4": "zen4-genoa.txt", "zen4-raphael": "zen4-raphael.txt",
}
_LINE = re.compile(r"^CPUID ([0-9A-F]{8}): ([0-9A-F]{8})-([0-9A-F]{8})-([0-9A-F]{8})-([0-9A-F]{8})(?: \[SL ([0-9A-F]{2})\])?")


def dump_lines(path: Path) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(leaf, subleaf, regs) of every line of a dump, read independently of the parser."""
    rows = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((int(m[1], 16), int(m[6] or "0", 16), tuple(int(m[i], 16) for i in range(2, 6))))
    return rows


def test_dumps_are_present():
    assert len(DUMP_FILES) >= 7


@pytest.mark.parametrize("path", DUMP_FILES, ids=lambda p: p.stem)
def test_every_dump_parses_to_every_line(path):
    model = load_cpuid_file(path)
    rows = dump_lines(path)
    assert rows, "dump has CPUID lines"
    for leaf, sub, regs in rows:
        assert model.get(leaf, sub) == regs, (hex(leaf), sub)
    assert len(model.entries()) == len(rows)
    assert model.name == path.stem


@pytest.mark.parametrize("name", sorted(MODEL_DUMPS))
def test_builtin_model_equals_its_dump(name):
    model = get_model(name)
    rows = dump_lines(DUMPS / MODEL_DUMPS[name])
    assert sorted((e.leaf, e.subleaf, e.regs) for e in model.entries()) == sorted(rows)
    # the leaves the brief requires are all there
    for leaf, sub in [(0, 0), (1, 0), (7, 0), (0xD, 0), (0xD, 1), (0x8000_0000, 0), (0x8000_0001, 0), (0x8000_0008, 0)]:
        assert model.contains(leaf, sub), (name, hex(leaf), sub)


@pytest.mark.parametrize("name,shstk,ibt", [
    ("sapphire-rapids", True, True), ("emerald-rapids", True, True), ("tiger-lake", True, True),
    ("alder-lake", True, True), ("ice-lake", False, False), ("skylake-sp", False, False),
    ("zen4", True, False),
])
def test_cet_enumeration(name, shstk, ibt):
    model = get_model(name)
    assert model.has("shstk") is shstk
    assert model.has("ibt") is ibt


def test_vendor_and_named_facts():
    spr = get_model("sapphire-rapids")
    assert spr.vendor == "intel" and spr.vendor_string == "GenuineIntel"
    assert get_model("zen4").vendor == "amd"
    assert spr.max_basic_leaf == 0x20 and spr.max_ext_leaf == 0x8000_0008
    assert spr.xcr0_mask == 0x602E7 and spr.xss_mask == 0xDD00
    assert spr.phys_addr_bits == 52
    assert get_model("tiger-lake").phys_addr_bits == 39


def test_get_ignores_subleaf_only_for_non_indexed_leaves():
    spr = get_model("sapphire-rapids")
    assert spr.get(1, 5) == spr.get(1, 0)
    assert spr.get(7, 1) != spr.get(7, 0)
    assert spr.get(0xD, 3) == (0, 0, 0, 0)  # no MPX on SPR
    assert spr.get(0x4000_0000) == (0, 0, 0, 0)


def test_set_remove_copy_and_features():
    model = get_model("tiger-lake")
    clone = model.copy()
    model.set_feature("shstk", False)
    assert not model.has("shstk") and clone.has("shstk")
    model.set_feature("SHSTK", True)
    assert model == clone
    model.set(0x4000_0000, 0, 1, 2, 3, 4)
    assert model.get(0x4000_0000) == (1, 2, 3, 4)
    model.remove(0xD, 1)
    assert model.xss_mask == 0 and model.contains(0xD, 0)
    model.remove(0xD)
    assert not model.contains(0xD, 0) and not model.contains(0xD, 2)
    assert clone.xss_mask == 0x3900
    entries = model.entries()
    assert entries == sorted(entries) and isinstance(entries[0], CpuidEntry)
    with pytest.raises(InputError):
        model.set(1, 0, 1 << 32, 0, 0, 0)


def test_set_feature_creates_missing_leaf():
    model = CpuidModel("empty")
    model.set_feature("ibt", True)
    assert model.get(7, 0) == (0, 0, 0, 1 << 20)


def test_unknown_feature_lists_close_names():
    with pytest.raises(InputError, match="shstk"):
        get_model("zen4").has("shstck")


def test_json_round_trip_and_hex_or_int_input(tmp_path):
    spr = get_model("sapphire-rapids")
    doc = json.loads(json.dumps(spr.to_json()))
    assert doc["format"] == "cetvm-cpuid/1" and doc["vendor"] == "intel"
    again = CpuidModel.from_json(doc)
    assert again == spr and again.name == "sapphire-rapids"
    mixed = {"format": "cetvm-cpuid/1", "entries": [
        {"leaf": 0, "subleaf": 0, "eax": 13, "ebx": "0x756E6547", "ecx": "6C65746E", "edx": 0x49656E69},
        {"leaf": "0x7", "eax": 0, "ebx": 0, "ecx": 0x80, "edx": 0}]}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(mixed))
    model = load_cpuid_file(path)
    assert model.vendor == "intel" and model.has("shstk") and model.max_basic_leaf == 13


@pytest.mark.parametrize("doc,msg", [
    ({"format": "other"}, "format"),
    ({"format": "cetvm-cpuid/1", "entries": 3}, "entries"),
    ({"format": "cetvm-cpuid/1", "entries": [{"leaf": 1, "eax": 0, "ebx": 0, "ecx": 0}]}, r"entries\[0\].*missing \"edx\""),
    ({"format": "cetvm-cpuid/1", "entries": [{"leaf": "zz", "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}]}, "leaf"),
    ({"format": "cetvm-cpuid/1", "entries": [{"leaf": 1, "eax": -1, "ebx": 0, "ecx": 0, "edx": 0}]}, "eax"),
])
def test_malformed_json(doc, msg):
    with pytest.raises(InputError, match=msg):
        CpuidModel.from_json(doc)


def test_instlatx64_counts_up_repeated_lines_and_takes_cpu0():
    text = """header comment
CPUID 00000000: 0000000D-756E6547-6C65746E-49656E69 [GenuineIntel]
CPUID 00000004: 00000121-00000001-00000002-00000003
CPUID 00000004: 00000122-00000001-00000002-00000003
CPUID 00000004: 00000143-00000001-00000002-00000003 [SL 05]
CPUID 00000004: 00000163-00000001-00000002-00000003
CPU#001 AffMask: 0x2
CPUID 00000000: 0000000D-68747541-444D4163-69746E65
CPUID 00000004: 0000FFFF-00000001-00000002-00000003
"""
    model = parse_instlatx64(text)
    assert [model.get(4, s)[0] for s in (0, 1, 5, 6)] == [0x121, 0x122, 0x143, 0x163]
    assert model.vendor == "intel" and not model.contains(4, 2)


@pytest.mark.parametrize("line,expected", [
    ("CPUID 00000001: 0000-zz", r"line 3: expected 4 hex words 'EAX-EBX-ECX-EDX', got '0000-zz'"),
    ("CPUID 00000001: 1-2-3", r"line 3: expected 4 hex words"),
    ("CPUID 0000G001: 00000000-00000000-00000000-00000000", r"line 3: expected an 8-digit hex leaf"),
    ("CPUID", r"line 3: expected 'CPUID LLLLLLLL: EAX-EBX-ECX-EDX'"),
    ("CPUID 00000001: 0-0-0-0\nCPUID 00000001: 0-0-0-0 [SL 00]", r"line 4: duplicate CPUID leaf 0x00000001"),
])
def test_instlatx64_malformed_lines_name_file_and_line(tmp_path, line, expected):
    path = tmp_path / "sapphire.txt"
    path.write_text("# comment\nCPUID 00000000: 00000001-756E6547-6C65746E-49656E69\n" + line + "\n")
    with pytest.raises(InputError, match="^sapphire.txt " + expected):
        load_cpuid_file(path)


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty.txt: empty file"):
        load_cpuid_file(empty)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x00\x00" * 8)
    with pytest.raises(InputError, match="blob.bin: binary file"):
        load_cpuid_file(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"CPUID \xff")
    with pytest.raises(InputError, match="latin.txt: not UTF-8"):
        load_cpuid_file(latin)
    with pytest.raises(InputError, match="no such file"):
        load_cpuid_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="is a directory"):
        load_cpuid_file(tmp_path)
    prose = tmp_path / "prose.txt"
    prose.write_text("hello\nworld\n")
    with pytest.raises(InputError, match="prose.txt: unrecognized CPUID dump"):
        load_cpuid_file(prose)
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing here\nCPUIDs are nice\n")
    with pytest.raises(InputError, match="comments.txt line 2"):
        load_cpuid_file(comments)


RAW = """CPU 0:
   0x00000000 0x00: eax=0x0000000d ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65
   0x00000001 0x00: eax=0x00a10f11 ebx=0x00200800 ecx=0x7ef8320b edx=0x178bfbff
   0x00000007 0x00: eax=0x00000001 ebx=0xf1bf97a9 ecx=0x00415fce edx=0x10000010
   0x00000007 0x01: eax=0x00000020 ebx=0x00000000 ecx=0x00000000 edx=0x00000000
   0x80000000 0x00: eax=0x80000028 ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65
CPU 1:
   0x00000000 0x00: eax=0x00000001 ebx=0x68747541 ecx=0x444d4163 edx=0x69746e65
"""


def test_cpuid_raw_takes_cpu0(tmp_path):
    model = parse_cpuid_raw(RAW)
    assert model.vendor == "amd" and model.max_basic_leaf == 0xD
    assert model.has("shstk") and not model.has("ibt")
    assert model.get(7, 1)[0] == 0x20
    one = tmp_path / "one.txt"
    one.write_text(RAW.replace("CPU 0:", "CPU:").split("CPU 1:")[0])
    assert load_cpuid_file(one) == model


def test_cpuid_raw_malformed(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text("CPU 0:\n   0x00000000 0x00: eax=0x0000000d ebx=0x6874\n")
    with pytest.raises(InputError, match=r"^raw.txt line 2: expected '0xLEAF 0xSUB: eax="):
        load_cpuid_file(path)


def test_resolve_model_names_and_files(tmp_path):
    assert resolve_model("zen4") == get_model("zen4")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(get_model("ice-lake").to_json()))
    assert resolve_model(str(path)) == get_model("ice-lake")
    with pytest.raises(InputError, match="sapphire-rapids"):
        resolve_model("sapphire")
    assert "host" in model_names()


def test_get_model_gives_fresh_models():
    a = get_model("alder-lake")
    a.set_feature("ibt", False)
    assert get_model("alder-lake").has("ibt")
