"""CPUID feature bits that cetvm queries by name [SDM Vol. 2A CPUID]."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reg(enum.IntEnum):
    """CPUID output registers, in the order they are reported."""

    EAX = 0
    EBX = 1
    ECX = 2
    EDX = 3


@dataclass(frozen=True)
class CpuidBit:
    """One feature flag: CPUID.(leaf, subleaf).reg[bit]."""

    name: str
    leaf: int
    subleaf: int
    reg: Reg
    bit: int

    @property
    def mask(self) -> int:
        return 1 << self.bit


def _b(name: str, leaf: int, subleaf: int, reg: Reg, bit: int) -> CpuidBit:
    return CpuidBit(name, leaf, subleaf, reg, bit)


#: Feature flags by name (lower case, Linux /proc/cpuinfo spelling where one exists).
FEATURES: dict[str, CpuidBit] = {
    b.name: b
    for b in (
        _b("fpu", 1, 0, Reg.EDX, 0),
        _b("pae", 1, 0, Reg.EDX, 6),
        _b("apic", 1, 0, Reg.EDX, 9),
        _b("sep", 1, 0, Reg.EDX, 11),
        _b("pge", 1, 0, Reg.EDX, 13),
        _b("fxsr", 1, 0, Reg.EDX, 24),
        _b("sse", 1, 0, Reg.EDX, 25),
        _b("sse2", 1, 0, Reg.EDX, 26),
        _b("vmx", 1, 0, Reg.ECX, 5),
        _b("pdcm", 1, 0, Reg.ECX, 15),
        _b("pcid", 1, 0, Reg.ECX, 17),
        _b("x2apic", 1, 0, Reg.ECX, 21),
        _b("xsave", 1, 0, Reg.ECX, 26),
        _b("osxsave", 1, 0, Reg.ECX, 27),
        _b("avx", 1, 0, Reg.ECX, 28),
        _b("hypervisor", 1, 0, Reg.ECX, 31),
        _b("fsgsbase", 7, 0, Reg.EBX, 0),
        _b("smep", 7, 0, Reg.EBX, 7),
        _b("rtm", 7, 0, Reg.EBX, 11),
        _b("mpx", 7, 0, Reg.EBX, 14),
        _b("avx512f", 7, 0, Reg.EBX, 16),
        _b("smap", 7, 0, Reg.EBX, 20),
        _b("pku", 7, 0, Reg.ECX, 3),
        _b("shstk", 7, 0, Reg.ECX, 7),
        _b("ibt", 7, 0, Reg.EDX, 20),
        _b("serialize", 7, 0, Reg.EDX, 14),
        _b("arch_capabilities", 7, 0, Reg.EDX, 29),
        _b("amx_tile", 7, 0, Reg.EDX, 24),
        _b("cet_sss", 7, 1, Reg.EDX, 18),
        _b("xsaveopt", 0xD, 1, Reg.EAX, 0),
        _b("xsavec", 0xD, 1, Reg.EAX, 1),
        _b("xgetbv1", 0xD, 1, Reg.EAX, 2),
        _b("xsaves", 0xD, 1, Reg.EAX, 3),
        _b("xfd", 0xD, 1, Reg.EAX, 4),
        _b("svm", 0x8000_0001, 0, Reg.ECX, 2),
        _b("syscall", 0x8000_0001, 0, Reg.EDX, 11),
        _b("nx", 0x8000_0001, 0, Reg.EDX, 20),
        _b("pdpe1gb", 0x8000_0001, 0, Reg.EDX, 26),
        _b("lm", 0x8000_0001, 0, Reg.EDX, 29),
    )
}

#: The CET feature flags.
SHSTK = FEATURES["shstk"]
IBT = FEATURES["ibt"]
CET_SSS = FEATURES["cet_sss"]

#: Leaf numbers with names used across the code.
LEAF_FEATURES = 0x1
LEAF_EXT_FEATURES = 0x7
LEAF_XSTATE = 0xD
LEAF_EXT_BASE = 0x8000_0000
LEAF_EXT_CPU = 0x8000_0001
LEAF_ADDR_SIZES = 0x8000_0008

#: Leaves whose output depends on ECX (subleaf-indexed leaves).
SUBLEAF_INDEXED_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20, 0x23, 0x24, 0x8000_001D, 0x8000_0020, 0x8000_0026})
