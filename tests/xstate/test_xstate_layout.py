"""XSAVE layouts from CPUID reproduce every size the real dumps report (SDM Vol. 1 ch. 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cetvm import InputError
from cetvm.cpuid import get_model, load_cpuid_file
from cetvm.xstate import XsaveLayout, xcr0_fault

from shared_data import DUMPS, dump_files  # noqa: E402
DUMP_FILES = dump_files()


def test_dumps_are_present():
    assert len(DUMP_FILES) >= 7


@pytest.mark.parametrize("path", DUMP_FILES, ids=lambda p: p.stem)
def test_layout_reproduces_dump_sizes(path):
    model = load_cpuid_file(path)
    layout = XsaveLayout.from_cpuid(model)
    _, std_ebx, std_ecx, _ = model.get(0xD, 0)
    _, cmp_ebx, _, _ = model.get(0xD, 1)
    # 0xD.0 ECX: every supported XCR0 component enabled
    assert layout.max_standard_size() == std_ecx
    # 0xD.0 EBX: the XCR0 the OS had enabled (inferred; see XsaveLayout.infer_os_xcr0)
    xcr0 = layout.infer_os_xcr0(std_ebx)
    assert xcr0 is not None, f"no XCR0 explains 0xD.0 EBX=0x{std_ebx:x}"
    assert xcr0_fault(xcr0, model.xcr0_mask) is None
    assert layout.standard_size(xcr0) == std_ebx
    # 0xD.1 EBX: compacted size of XCR0 | XSS for some XSS the CPU enumerates
    candidates = layout.infer_os_xss(xcr0, cmp_ebx)
    assert candidates, f"no XSS subset explains 0xD.1 EBX=0x{cmp_ebx:x}"
    for xss in candidates:
        assert xss & ~model.xss_mask == 0
        assert layout.compacted_size(xcr0 | xss) == cmp_ebx


@pytest.mark.parametrize("path", DUMP_FILES, ids=lambda p: p.stem)
def test_component_flags_and_offsets_follow_cpuid(path):
    model = load_cpuid_file(path)
    layout = XsaveLayout.from_cpuid(model)
    for comp in layout.components:
        eax, ebx, ecx, _ = model.get(0xD, comp.number)
        assert (comp.size, comp.std_offset) == (eax, ebx)
        assert comp.supervisor == bool(model.xss_mask >> comp.number & 1)
        assert comp.align64 == bool(ecx & 2)
    everything = model.xcr0_mask | model.xss_mask
    end = 576
    for comp in layout.components:
        off = layout.compacted_offset(comp.number, everything)
        assert off >= end and (not comp.align64 or off % 64 == 0)
        end = off + comp.size
    assert layout.compacted_size(everything) == end


def test_reference_worked_examples():
    spr = XsaveLayout.from_cpuid(get_model("sapphire-rapids"))
    assert spr.compacted_size(0x602E7 | 0x100) == 0x2A80
    mask = 0x602E7 | 0x1800
    assert [spr.compacted_offset(n, mask) for n in (11, 12, 17, 18)] == [0x988, 0x998, 0x9C0, 0xA00]
    assert spr.compacted_size(mask) == 0x2A00
    tgl = XsaveLayout.from_cpuid(get_model("tiger-lake"))
    assert tgl.compacted_size(0x2E7 | 0x100 | 0x2000) == 0xA10


def test_offsets_differ_between_vendors():
    zen4 = XsaveLayout.from_cpuid(get_model("zen4"))
    skx = XsaveLayout.from_cpuid(get_model("skylake-sp"))
    assert [zen4.standard_offset(n) for n in (5, 6, 7, 9)] == [0x340, 0x380, 0x580, 0x980]
    assert [skx.standard_offset(n) for n in (3, 4, 5)] == [0x3C0, 0x400, 0x440]


def test_standard_size_minimum_and_legacy():
    tgl = XsaveLayout.from_cpuid(get_model("tiger-lake"))
    assert tgl.standard_size(0x3) == 576
    assert tgl.standard_size(0x7) == 0x340
    assert tgl.component(1).std_offset == 160 and tgl.component(0).size == 160


def test_layout_errors():
    icl = XsaveLayout.from_cpuid(get_model("ice-lake"))
    with pytest.raises(InputError, match="component 11"):
        icl.compacted_size(0x1800 | 0x3)       # no CET state on Ice Lake
    with pytest.raises(InputError, match="supervisor"):
        icl.standard_offset(8)                 # PT has no standard offset
    with pytest.raises(InputError, match="not in XCOMP_BV"):
        icl.compacted_offset(9, 0x7)


@pytest.mark.parametrize("xcr0,ok", [
    (0x3, True), (0x7, True), (0xE7, True), (0x2, False), (0x5, False), (0x27, False),
    (0xE3, False), (0x1F, True), (0xF, False), (0x200E7, False),
])
def test_xcr0_fault_rules(xcr0, ok):
    assert (xcr0_fault(xcr0, 0x602FF) is None) is ok


def test_xcr0_fault_rejects_unsupported_bits():
    assert "not supported" in xcr0_fault(0x207, 0x7)
