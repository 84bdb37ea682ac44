"""Control-register, paging and exception facts [SDM Vol. 3 ch. 2, 4, 6]."""

from __future__ import annotations

import enum


class Cr0(enum.IntFlag):
    PE = 1 << 0
    MP = 1 << 1
    EM = 1 << 2
    TS = 1 << 3
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    AM = 1 << 18
    NW = 1 << 29
    CD = 1 << 30
    PG = 1 << 31


class Cr4(enum.IntFlag):
    VME = 1 << 0
    PVI = 1 << 1
    TSD = 1 << 2
    DE = 1 << 3
    PSE = 1 << 4
    PAE = 1 << 5
    MCE = 1 << 6
    PGE = 1 << 7
    PCE = 1 << 8
    OSFXSR = 1 << 9
    OSXMMEXCPT = 1 << 10
    UMIP = 1 << 11
    LA57 = 1 << 12
    VMXE = 1 << 13
    SMXE = 1 << 14
    FSGSBASE = 1 << 16
    PCIDE = 1 << 17
    OSXSAVE = 1 << 18
    SMEP = 1 << 20
    SMAP = 1 << 21
    PKE = 1 << 22
    CET = 1 << 23
    PKS = 1 << 24
    LAM_SUP = 1 << 28


#: CR8's defined bits: the task-priority class, bits 3:0; bits 63:4 are reserved (MOV to CR8
#: writing a 1 there is #GP(0)) [SDM Vol. 3 §2.5 "CR8"]. The local APIC's TPR[7:4] is CR8[3:0].
CR8_TPR = 0xF


class Pte(enum.IntFlag):
    """Page-table entry bits (4-level paging)."""

    P = 1 << 0
    RW = 1 << 1
    US = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5
    D = 1 << 6
    PS = 1 << 7
    G = 1 << 8
    NX = 1 << 63


PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000


class PfErr(enum.IntFlag):
    """#PF error-code bits; SS (bit 6) marks a shadow-stack access [SDM Vol. 3 4.7]."""

    P = 1 << 0
    W = 1 << 1
    U = 1 << 2
    RSVD = 1 << 3
    I = 1 << 4
    PK = 1 << 5
    SS = 1 << 6


class Vector(enum.IntEnum):
    """Exception vectors."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21


#: Vectors that push an error code in protected/long mode.
VECTORS_WITH_ERROR_CODE = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC, Vector.CP})
#: Exception vectors that are not faults: #DB and #BP/#OF are traps (instruction-breakpoint #DBs
#: aside), #DF and #MC aborts, vector 2 is NMI [SDM Vol. 3 Table 6-1; KVM exception_type()].
NON_FAULT_VECTORS = frozenset({Vector.DB, Vector.NMI, Vector.BP, Vector.OF, Vector.DF, Vector.MC})


def is_fault_exception(vector: int) -> bool:
    """An exception (vector 0-31) of the fault class: the RFLAGS image its delivery pushes has
    RF = 1 [SDM Vol. 3 §18.3.1.1], as KVM sets RF when it injects one (kvm_inject_exception)."""
    return 0 <= vector < 32 and vector not in NON_FAULT_VECTORS


#: RFLAGS status and control bits [SDM Vol. 1 §3.4.3, Figure 3-8] (plain ints: the emulation
#: tests them on every string iteration).
RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_OF = 1 << 11
RFLAGS_IOPL = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
#: x87 FSW.ES, the error-summary status bit: an unmasked floating-point exception is pending (the
#: next waiting x87 instruction, FWAIT or MMX instruction raises #MF) [SDM Vol. 1 §8.1.3.1].
FSW_ES = 1 << 7
#: DR7's local and global enable bits of breakpoints 0-3 (L0 G0 ... L3 G3) [SDM Vol. 3 §18.2.4].
DR7_ENABLE_BITS = 0xFF
#: DR7.GD, general detect: a MOV to or from a debug register is #DB (DR6.BD) [SDM Vol. 3 §18.2.4].
DR7_GD = 1 << 13
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18
RFLAGS_VIF = 1 << 19
RFLAGS_VIP = 1 << 20
#: RFLAGS bit 1 always reads 1 [SDM Vol. 1 §3.4.3].
RFLAGS_FIXED = 1 << 1
#: RFLAGS bits that are reserved (must be 0): 3, 5, 15 and 63:22 [SDM Vol. 1 Figure 3-8].
RFLAGS_RESERVED = (1 << 3) | (1 << 5) | (1 << 15) | (0xFFFF_FFFF_FFFF_FFFF & ~((1 << 22) - 1))


def is_canonical(addr: int, va_bits: int = 48) -> bool:
    """True if ``addr`` (a 64-bit value) is canonical for ``va_bits``-bit linear addresses."""
    addr &= 0xFFFF_FFFF_FFFF_FFFF
    top = addr >> (va_bits - 1)
    return top == 0 or top == (1 << (65 - va_bits)) - 1


def canonicalize(addr: int, va_bits: int = 48) -> int:
    """``addr`` (64-bit) with bits 63:va_bits copied from bit va_bits-1 (Linux's
    __canonical_address()): the canonical address a non-canonical one stands for."""
    shift = 64 - va_bits
    value = (addr << shift) & 0xFFFF_FFFF_FFFF_FFFF
    if value >> 63:
        value -= 1 << 64
    return (value >> shift) & 0xFFFF_FFFF_FFFF_FFFF


#: All 64 bits: a value masked to a 64-bit register's width.
U64_MASK = 0xFFFF_FFFF_FFFF_FFFF


def u64(value: int) -> int:
    """``value`` truncated to 64 bits, as a 64-bit register holds it."""
    return value & U64_MASK
