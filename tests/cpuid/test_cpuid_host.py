"""The "host" model reads this machine's CPUID; check it against /proc/cpuinfo."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from cetvm.cpuid import get_model
from cetvm.cpuid.host import host_subleaves

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not Path("/proc/cpuinfo").exists(),
    reason="needs an x86-64 Linux host",
)


def cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if not line.strip():
            break  # first processor only
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def test_host_vendor_matches_cpuinfo():
    assert get_model("host").vendor_string == cpuinfo()["vendor_id"]


@pytest.mark.parametrize("flag", ["fpu", "sse2", "xsave", "avx", "lm", "nx", "hypervisor", "avx512f", "pku", "fsgsbase"])
def test_host_flags_match_cpuinfo(flag):
    # The kernel can clear flags it does not use (e.g. pku, shstk), but never shows a flag the
    # CPU lacks: so a cpuinfo flag implies the CPUID bit; for the rest, check the usual equality
    # for flags the kernel passes through unchanged.
    flags = set(cpuinfo()["flags"].split())
    host = get_model("host")
    if flag in flags:
        assert host.has(flag)
    elif flag in ("fpu", "sse2", "lm", "hypervisor"):
        assert not host.has(flag)


def test_host_model_is_consistent():
    host = get_model("host")
    assert host.max_basic_leaf >= 1
    assert host.contains(0, 0) and host.contains(1, 0)
    if host.has("xsave"):
        assert host.xcr0_mask & 0x3 == 0x3


def test_subleaf_rules_on_a_fake_cpu():
    regs = {(4, 0): (0x121, 0, 0, 0), (4, 1): (0x122, 0, 0, 0), (4, 2): (0, 0, 0, 0),
            (7, 0): (1, 0, 0, 0), (0xB, 0): (1, 2, 0x100, 0), (0xB, 1): (4, 8, 0x201, 0),
            (0xD, 0): (0x207, 0, 0, 0), (0xD, 2): (0x100, 0x240, 0, 0), (0xD, 9): (8, 0xA80, 0, 0)}

    def fake(leaf: int, sub: int = 0):
        return regs.get((leaf, sub), (0, 0, 0, 0))

    assert host_subleaves(fake, 4) == [0, 1]
    assert host_subleaves(fake, 7) == [0, 1]
    assert host_subleaves(fake, 0xB) == [0, 1]
    assert host_subleaves(fake, 0xD) == [0, 1, 2, 9]
