"""The VM-entry checks of the guest segment registers [SDM Vol. 3 §28.3.1.2], made on vmcs12's
guest-state area before L2 runs. On hardware they are the CPU's checks of vmcs02 (KVM copies
the fields and the failure comes back as exit reason 33 | bit 31, which KVM reflects to L1);
cetvm's CPU loads segments without checking them, so KVM's nested entry makes them here.

Unrestricted guest is not offered to L1, so the protected-mode rules apply; with RFLAGS.VM = 1
the virtual-8086 rules (base = selector << 4, limit 0xFFFF, access rights 0xF3).
"""

from __future__ import annotations

from typing import Callable

from cetvm.arch import is_canonical
from cetvm.arch.vmx import (
    AR_DB, AR_DPL_SHIFT, AR_G, AR_L, AR_P, AR_RESERVED_11_8, AR_RESERVED_31_17, AR_S, AR_TYPE, AR_TYPE_ACCESSED,
    AR_TYPE_CODE, AR_TYPE_READABLE, AR_UNUSABLE, VmcsField as F,
)

SELECTOR_TI = 1 << 2
#: Code-segment types VM entry accepts for CS outside unrestricted guest: execute-only or
#: execute/read, accessed, non-conforming (9, 11) or conforming (13, 15).
CS_TYPES = frozenset({9, 11, 13, 15})
CS_CONFORMING_TYPES = frozenset({13, 15})
#: SS: read/write data, accessed, expand-up or expand-down.
SS_TYPES = frozenset({3, 7})
TSS_BUSY_16, TSS_BUSY_64 = 3, 11
LDT_TYPE = 2
VM86_AR = 0xF3
DATA_SEGMENTS = ("DS", "ES", "FS", "GS")


def _dpl(ar: int) -> int:
    return (ar >> AR_DPL_SHIFT) & 3


def ar_format_valid(ar: int, limit: int) -> bool:
    """Reserved bits 11:8 and 31:17 clear; G consistent with the limit (limit bits 11:0 not all
    ones → G = 0; any of limit bits 31:20 set → G = 1)."""
    if ar & (AR_RESERVED_11_8 | AR_RESERVED_31_17):
        return False
    if limit & 0xFFF != 0xFFF and ar & AR_G:
        return False
    return not (limit >> 20 and not ar & AR_G)


class _Segments:
    """vmcs12's guest segment fields by name (ES, CS, SS, DS, FS, GS, LDTR, TR)."""

    def __init__(self, read: Callable[[F], int]) -> None:
        self.read = read

    def field(self, name: str, part: str) -> int:
        """GUEST_<name>_<part>: SELECTOR, BASE, LIMIT or AR_BYTES."""
        return self.read(getattr(F, f"GUEST_{name}_{part}"))

    def sel(self, name: str) -> int:
        return self.field(name, "SELECTOR")

    def base(self, name: str) -> int:
        return self.field(name, "BASE")

    def limit(self, name: str) -> int:
        return self.field(name, "LIMIT")

    def ar(self, name: str) -> int:
        return self.field(name, "AR_BYTES")

    def usable(self, name: str) -> bool:
        return not self.ar(name) & AR_UNUSABLE


def vm86_segments_valid(seg: _Segments) -> bool:
    """Virtual-8086 guest: base = selector << 4, limit 0xFFFF, access rights 0xF3 for CS, SS,
    DS, ES, FS, GS."""
    return all(seg.base(n) == seg.sel(n) << 4 and seg.limit(n) == 0xFFFF and seg.ar(n) == VM86_AR
               for n in ("CS", "SS") + DATA_SEGMENTS)


def system_selectors_valid(seg: _Segments) -> bool:
    """TR.TI = 0; LDTR.TI = 0 when usable."""
    return not (seg.sel("TR") & SELECTOR_TI or (seg.usable("LDTR") and seg.sel("LDTR") & SELECTOR_TI))


def bases_valid(seg: _Segments) -> bool:
    """TR, FS, GS canonical, LDTR when usable; CS bits 63:32 zero, SS/DS/ES when usable."""
    if not all(is_canonical(seg.base(n)) for n in ("TR", "FS", "GS")):
        return False
    if seg.usable("LDTR") and not is_canonical(seg.base("LDTR")):
        return False
    return all(not seg.base(n) >> 32 for n in ("CS", "SS", "DS", "ES") if n == "CS" or seg.usable(n))


def cs_ar_valid(seg: _Segments, ia32e: bool) -> bool:
    """CS: an accessed code type, S = 1, P = 1, DPL = SS.DPL (non-conforming) or ≤ SS.DPL
    (conforming), D/B = 0 for a 64-bit code segment of an IA-32e guest."""
    ar, ss_dpl = seg.ar("CS"), _dpl(seg.ar("SS"))
    if ar & AR_UNUSABLE or ar & AR_TYPE not in CS_TYPES or not ar & AR_S or not ar & AR_P:
        return False
    conforming = ar & AR_TYPE in CS_CONFORMING_TYPES
    if (_dpl(ar) > ss_dpl) if conforming else (_dpl(ar) != ss_dpl):
        return False
    if ia32e and ar & AR_L and ar & AR_DB:
        return False
    return ar_format_valid(ar, seg.limit("CS"))


def ss_ar_valid(seg: _Segments) -> bool:
    """SS when usable: read/write accessed data, S = 1, P = 1, DPL = SS.RPL."""
    ar = seg.ar("SS")
    if ar & AR_UNUSABLE:
        return True
    if ar & AR_TYPE not in SS_TYPES or not ar & AR_S or not ar & AR_P or _dpl(ar) != seg.sel("SS") & 3:
        return False
    return ar_format_valid(ar, seg.limit("SS"))


def data_ar_valid(seg: _Segments, name: str) -> bool:
    """DS, ES, FS, GS when usable: accessed; a code segment readable; S = 1, P = 1; DPL ≥ RPL
    for data and non-conforming code (types 0-11)."""
    ar = seg.ar(name)
    if ar & AR_UNUSABLE:
        return True
    kind = ar & AR_TYPE
    if not kind & AR_TYPE_ACCESSED or (kind & AR_TYPE_CODE and not kind & AR_TYPE_READABLE):
        return False
    if not ar & AR_S or not ar & AR_P or (kind <= 11 and _dpl(ar) < seg.sel(name) & 3):
        return False
    return ar_format_valid(ar, seg.limit(name))


def system_ar_valid(seg: _Segments, ia32e: bool) -> bool:
    """TR: usable, a busy TSS (type 11; outside IA-32e mode also the 16-bit type 3), S = 0,
    P = 1. LDTR when usable: type 2 (LDT), S = 0, P = 1."""
    tr = seg.ar("TR")
    tr_types = {TSS_BUSY_64} if ia32e else {TSS_BUSY_16, TSS_BUSY_64}
    if tr & AR_UNUSABLE or tr & AR_TYPE not in tr_types or tr & AR_S or not tr & AR_P:
        return False
    if not ar_format_valid(tr, seg.limit("TR")):
        return False
    ldtr = seg.ar("LDTR")
    if ldtr & AR_UNUSABLE:
        return True
    if ldtr & AR_TYPE != LDT_TYPE or ldtr & AR_S or not ldtr & AR_P:
        return False
    return ar_format_valid(ldtr, seg.limit("LDTR"))


def guest_segments_valid(read: Callable[[F], int], ia32e: bool, vm86: bool) -> bool:
    """Every check of SDM Vol. 3 §28.3.1.2 for a guest without unrestricted guest; ``read``
    reads a vmcs12 field."""
    seg = _Segments(read)
    if not (system_selectors_valid(seg) and bases_valid(seg) and system_ar_valid(seg, ia32e)):
        return False
    if vm86:
        return vm86_segments_valid(seg)
    return (seg.sel("SS") & 3 == seg.sel("CS") & 3 and cs_ar_valid(seg, ia32e) and ss_ar_valid(seg)
            and all(data_ar_valid(seg, n) for n in DATA_SEGMENTS))
