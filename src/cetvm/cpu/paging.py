"""A 4-level paging walker for the accesses cetvm performs itself [SDM Vol. 3 §4.5, §4.6].

Used for shadow-stack accesses (the CET rules Unicorn does not know), for guest-virtual reads
and writes of the emulation (IDT, TSS, stacks, instruction bytes), and to derive the #PF error
code Unicorn does not expose.

Decisions (documented simplifications): A/D bits are not updated by our walks (Unicorn's own
walker maintains them for ordinary accesses; shadow-stack pages are D=1 by definition); SMEP/
SMAP/protection keys and reserved-bit checks are not applied to our walks; LA57 is not supported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from cetvm import NotSupportedError
from cetvm.arch import Cr0, Cr4, PfErr, Pte, is_canonical
from cetvm.arch.msr import Efer
from cetvm.arch.regs import PTE_ADDR_MASK
from cetvm.cpu.faults import gp, page_fault

_LEVEL_SHIFTS = (39, 30, 21, 12)
# Plain-int copies of the flags for the hot path (IntFlag arithmetic is slow in CPython).
_P, _RW, _US, _PS, _D, _NX = int(Pte.P), int(Pte.RW), int(Pte.US), int(Pte.PS), int(Pte.D), int(Pte.NX)
_ADDR = PTE_ADDR_MASK
_CR0_WP, _CR0_PG, _CR4_PAE, _EFER_LMA, _EFER_NXE = int(Cr0.WP), int(Cr0.PG), int(Cr4.PAE), int(Efer.LMA), int(Efer.NXE)


class Access(enum.IntFlag):
    """What an access does and on whose behalf."""

    READ = 0
    WRITE = 1 << 0
    USER = 1 << 1  # made with user privilege (CPL 3, or WRUSS / a user shadow-stack access)
    FETCH = 1 << 2
    SHADOW_STACK = 1 << 3


_A_WRITE, _A_USER, _A_FETCH, _A_SS = 1, 2, 4, 8


@dataclass(frozen=True)
class PagingMode:
    """The control-register bits that select and govern translation."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & _CR0_PG)

    @property
    def long_paging(self) -> bool:
        return self.paging and bool(self.cr4 & _CR4_PAE) and bool(self.efer & _EFER_LMA)


def pf_error_code(access: Access, present: bool) -> PfErr:
    """The #PF error code of a failed ``access`` [SDM Vol. 3 §4.7]."""
    err = PfErr(0)
    if present:
        err |= PfErr.P
    if access & Access.WRITE:
        err |= PfErr.W
    if access & Access.USER:
        err |= PfErr.U
    if access & Access.FETCH:
        err |= PfErr.I
    if access & Access.SHADOW_STACK:
        err |= PfErr.SS
    return err


def translate(read_phys_u64: Callable[[int], int], mode: PagingMode, linear: int, access: Access) -> int:
    """Translate ``linear`` for ``access``; return the physical address or raise #PF / #GP.

    With paging off the address is physical. In IA-32e paging:
    - non-canonical → #GP(0);
    - a non-present entry at any level → #PF with P=0;
    - user access to a supervisor page (U/S=0 at any level) → #PF(P|U);
    - ordinary write to a page read-only at any level (user always; supervisor with CR0.WP=1) →
      #PF(P|W) — this includes writes to shadow-stack pages, with no SS bit;
    - fetch from an NX page (EFER.NXE) → #PF(P|I);
    - shadow-stack access (CET rule, SDM Vol. 3 §4.6.1): the leaf must be R/W=0 with D=1 and
      every upper level R/W=1; and a supervisor shadow-stack access to a user page faults too;
      on violation #PF(P|SS, plus W/U as applicable).
    """
    linear &= 0xFFFF_FFFF_FFFF_FFFF
    if not mode.paging:
        return linear
    if not mode.long_paging:
        raise _legacy_paging_not_supported()
    if not is_canonical(linear):
        raise gp(0)
    access = int(access)
    table = mode.cr3 & _ADDR
    writable_upper = True
    user_all = True
    nx_any = False
    entry = 0
    page_shift = 12
    for level, shift in enumerate(_LEVEL_SHIFTS):
        entry = read_phys_u64(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & _P:
            raise page_fault(linear, pf_error_code(Access(access), present=False))
        user_all = user_all and bool(entry & _US)
        nx_any = nx_any or bool(entry & _NX)
        if shift == 12 or (level in (1, 2) and entry & _PS):
            page_shift = shift
            break
        writable_upper = writable_upper and bool(entry & _RW)
        table = entry & _ADDR
    leaf_writable = bool(entry & _RW)
    if access & _A_USER and not user_all:
        raise page_fault(linear, pf_error_code(Access(access), present=True))
    if access & _A_SS:
        is_shadow_stack_page = writable_upper and not leaf_writable and bool(entry & _D)
        if not is_shadow_stack_page or (user_all and not access & _A_USER):
            raise page_fault(linear, pf_error_code(Access(access), present=True))
    elif access & _A_WRITE:
        writable = writable_upper and leaf_writable
        if not writable and (access & _A_USER or mode.cr0 & _CR0_WP):
            raise page_fault(linear, pf_error_code(Access(access), present=True))
    if access & _A_FETCH and nx_any and mode.efer & _EFER_NXE:
        raise page_fault(linear, pf_error_code(Access(access), present=True))
    frame_mask = ((1 << 52) - 1) & ~((1 << page_shift) - 1)
    return (entry & frame_mask) | (linear & ((1 << page_shift) - 1))


_G, _CR4_PGE = int(Pte.G), int(Cr4.PGE)


@dataclass(frozen=True)
class Mapping:
    """The translation of a linear address as a TLB would cache it: the page it lies in."""

    page_base: int   # linear address of the page's first byte
    page_size: int   # 4 KiB, 2 MiB or 1 GiB
    global_page: bool  # CR4.PGE and PTE.G of the leaf: survives a MOV to CR3 [SDM Vol. 3 §4.10.2.4]


def mapping_of(read_phys_u64: Callable[[int], int], mode: PagingMode, linear: int) -> Mapping | None:
    """The page ``linear`` lies in under IA-32e paging, or None when it is not mapped (or paging
    is off or not 4-level: no TLB entry to speak of). No permission checks [SDM Vol. 3 §4.5]."""
    if not mode.long_paging or not is_canonical(linear):
        return None
    table = mode.cr3 & _ADDR
    for level, shift in enumerate(_LEVEL_SHIFTS):
        entry = read_phys_u64(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & _P:
            return None
        if shift == 12 or (level in (1, 2) and entry & _PS):
            size = 1 << shift
            return Mapping(linear & ~(size - 1) & 0xFFFF_FFFF_FFFF_FFFF, size,
                           bool(entry & _G) and bool(mode.cr4 & _CR4_PGE))
        table = entry & _ADDR
    return None


def _legacy_paging_not_supported() -> NotSupportedError:
    return NotSupportedError("32-bit (non-PAE) and PAE legacy paging walks are not implemented; "
                            "cetvm walks 4-level IA-32e page tables only")
