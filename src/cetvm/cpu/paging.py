"""A paging walker for the accesses cetvm performs itself: 4-level paging [SDM Vol. 3 §4.5,
§4.6], and PAE and 32-bit paging [§4.3, §4.4] (an L2 guest of a nested hypervisor may run in
them; the engine executes them itself).

Used for shadow-stack accesses (the CET rules Unicorn does not know), for guest-virtual reads
and writes of the emulation (IDT, TSS, stacks, instruction bytes), and to derive the #PF error
code Unicorn does not expose.

Decisions (documented simplifications): A/D bits are not updated by our walks (Unicorn's own
walker maintains them for ordinary accesses; shadow-stack pages are D=1 by definition); SMEP/
SMAP/protection keys and reserved-bit checks are not applied to our walks; LA57 is not supported;
PAE paging reads the PDPTEs from memory at each walk instead of the PDPTE registers loaded with
CR3 (the nested VM entry checks them, see :func:`pae_pdptes_valid`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from cetvm.arch import Cr0, Cr4, PfErr, Pte, is_canonical
from cetvm.arch.msr import Efer
from cetvm.arch.regs import PTE_ADDR_MASK
from cetvm.cpu.faults import GuestFault, gp, page_fault

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
        return _translate_legacy(read_phys_u64, mode, linear & 0xFFFF_FFFF, access)
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
    _check_permissions(mode, linear, access, entry, writable_upper, user_all, nx_any)
    frame_mask = ((1 << 52) - 1) & ~((1 << page_shift) - 1)
    return (entry & frame_mask) | (linear & ((1 << page_shift) - 1))


def _check_permissions(mode: PagingMode, linear: int, access: int, leaf: int, writable_upper: bool,
                       user_all: bool, nx_any: bool) -> None:
    """The access-rights checks of a completed walk (see :func:`translate`) [SDM Vol. 3 §4.6]."""
    leaf_writable = bool(leaf & _RW)
    if access & _A_USER and not user_all:
        raise page_fault(linear, pf_error_code(Access(access), present=True))
    if access & _A_SS:
        is_shadow_stack_page = writable_upper and not leaf_writable and bool(leaf & _D)
        if not is_shadow_stack_page or (user_all and not access & _A_USER):
            raise page_fault(linear, pf_error_code(Access(access), present=True))
    elif access & _A_WRITE:
        writable = writable_upper and leaf_writable
        if not writable and (access & _A_USER or mode.cr0 & _CR0_WP):
            raise page_fault(linear, pf_error_code(Access(access), present=True))
    if access & _A_FETCH and nx_any and mode.efer & _EFER_NXE:
        raise page_fault(linear, pf_error_code(Access(access), present=True))


#: PAE paging: CR3 bits 31:5 locate the 4 PDPTEs [SDM Vol. 3 §4.4.1]; entry address bits 51:12.
_PAE_PDPT_MASK = 0xFFFF_FFE0
_PAE_ADDR = ((1 << 52) - 1) & ~0xFFF
_LEGACY_TABLE_MASK = 0xFFFF_F000
_CR4_PSE = int(Cr4.PSE)


def _legacy_walk(read_phys_u64: Callable[[int], int], mode: PagingMode, linear: int, access: int
                 ) -> tuple[int, int, bool, bool, bool]:
    """PAE paging (PDPTE → PDE → PTE, 2 MiB pages with PDE.PS) or 32-bit paging (4-byte PDE →
    PTE, 4 MiB pages with CR4.PSE and PDE.PS, PSE-36 address bits): (leaf entry with the page
    address in bits 51:12, page shift, R/W of the upper levels, U/S of all levels, XD of any).
    A non-present entry raises #PF. PDPTEs carry no R/W, U/S or XD [SDM Vol. 3 §4.3, §4.4]."""
    def missing() -> GuestFault:
        return page_fault(linear, pf_error_code(Access(access), present=False))

    if mode.cr4 & _CR4_PAE:
        pdpte = read_phys_u64((mode.cr3 & _PAE_PDPT_MASK) + ((linear >> 30) & 3) * 8)
        if not pdpte & _P:
            raise missing()
        levels, table, width, index_bits, big_shift = (21, 12), pdpte & _PAE_ADDR, 8, 0x1FF, 21
    else:
        levels, table, width, index_bits, big_shift = (22, 12), mode.cr3 & _LEGACY_TABLE_MASK, 4, 0x3FF, 22
    writable_upper, user_all, nx_any = True, True, False
    for shift in levels:
        entry = read_phys_u64(table + ((linear >> shift) & index_bits) * width)
        if width == 4:
            entry &= 0xFFFF_FFFF
        if not entry & _P:
            raise missing()
        user_all = user_all and bool(entry & _US)
        nx_any = nx_any or (width == 8 and bool(entry & _NX))
        if shift == 12:
            return entry, 12, writable_upper, user_all, nx_any
        if entry & _PS and (width == 8 or mode.cr4 & _CR4_PSE):
            if width == 4:  # PSE-36: PDE bits 20:13 are physical-address bits 39:32
                entry = (entry & 0xFFC0_0FFF) | ((entry >> 13) & 0xFF) << 32
            return entry, big_shift, writable_upper, user_all, nx_any
        writable_upper = writable_upper and bool(entry & _RW)
        table = entry & (_PAE_ADDR if width == 8 else _LEGACY_TABLE_MASK)
    raise AssertionError("unreachable: the last level is a PTE")


def _translate_legacy(read_phys_u64: Callable[[int], int], mode: PagingMode, linear: int, access: Access) -> int:
    """:func:`translate` for PAE and 32-bit paging (32-bit linear addresses)."""
    access = int(access)
    entry, shift, writable_upper, user_all, nx_any = _legacy_walk(read_phys_u64, mode, linear, access)
    _check_permissions(mode, linear, access, entry, writable_upper, user_all, nx_any)
    frame_mask = _PAE_ADDR & ~((1 << shift) - 1)
    return (entry & frame_mask) | (linear & ((1 << shift) - 1))


#: PAE PDPTE bits that must be 0 when present, below MAXPHYADDR: 2:1, 8:5 and 63 [SDM Vol. 3 §4.4.1].
PDPTE_RESERVED = 0x1E6 | 1 << 63


def pae_pdptes_valid(read_phys_u64: Callable[[int], int], cr3: int, maxphyaddr: int) -> bool:
    """load_pdptrs(): every present PDPTE of the table CR3 points at has its reserved bits (and
    the address bits at or above MAXPHYADDR) clear [SDM Vol. 3 §4.4.1, §28.3.1.6]."""
    reserved = PDPTE_RESERVED | (((1 << 64) - 1) & ~((1 << maxphyaddr) - 1) & ~(1 << 63))
    for i in range(4):
        pdpte = read_phys_u64((cr3 & _PAE_PDPT_MASK) + i * 8)
        if pdpte & _P and pdpte & reserved:
            return False
    return True


_G, _CR4_PGE = int(Pte.G), int(Cr4.PGE)


@dataclass(frozen=True)
class Mapping:
    """The translation of a linear address as a TLB would cache it: the page it lies in."""

    page_base: int   # linear address of the page's first byte
    page_size: int   # 4 KiB, 2 MiB or 1 GiB
    global_page: bool  # CR4.PGE and PTE.G of the leaf: survives a MOV to CR3 [SDM Vol. 3 §4.10.2.4]


def mapping_of(read_phys_u64: Callable[[int], int], mode: PagingMode, linear: int) -> Mapping | None:
    """The page ``linear`` lies in, or None when it is not mapped (or paging is off: no TLB entry
    to speak of). No permission checks [SDM Vol. 3 §4.3-4.5]."""
    if mode.paging and not mode.long_paging:
        linear &= 0xFFFF_FFFF
        try:
            entry, shift, *_ = _legacy_walk(read_phys_u64, mode, linear, 0)
        except GuestFault:
            return None
        size = 1 << shift
        return Mapping(linear & ~(size - 1), size, bool(entry & _G) and bool(mode.cr4 & _CR4_PGE))
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

