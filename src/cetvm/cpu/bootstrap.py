"""Put a Vcpu straight into 64-bit mode at CPL 0 over an identity map (as an ELF64 loader or a
benchmark needs): page tables, a flat GDT, control registers.

Page policy is the caller's (``page_flags(address) -> PTE flags``): keep data pages NX so guest
stores stay on Unicorn's fast path, and make shadow-stack pages R/W=0,
D=1 [SDM Vol. 3 §4.6].
"""

from __future__ import annotations

import struct
from typing import Callable

from cetvm.arch import Cr0, Cr4, Pte
from cetvm.arch.msr import Efer
from cetvm.cpu.state import DescriptorTable, Segment, Sregs

PAGE = 0x1000
KERNEL_CS = 0x08
KERNEL_DS = 0x10
#: Flat descriptors: null, 64-bit code DPL0, data DPL0, data DPL3, 64-bit code DPL3.
FLAT_GDT = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF)


def code_page_flags() -> int:
    return int(Pte.P | Pte.A)


def data_page_flags() -> int:
    return int(Pte.P | Pte.RW | Pte.NX | Pte.A | Pte.D)


def shadow_stack_page_flags(user: bool = False) -> int:
    """A shadow-stack leaf: present, R/W=0, D=1 (and U/S for a user shadow stack)."""
    return int(Pte.P | Pte.D | Pte.A | Pte.NX | (Pte.US if user else 0))


def build_identity_map(vcpu, tables: int, size: int, page_flags: Callable[[int], int]) -> int:
    """4-level, 4 KiB identity map of [0, size) with tables from ``tables`` (PML4, PDPT, PDs, PTs).

    Returns the CR3 value. ``size`` must be a multiple of 2 MiB and at most 1 GiB.
    """
    if size % (512 * PAGE) or size > (1 << 30):
        raise ValueError("identity map size must be a multiple of 2 MiB, at most 1 GiB")
    pml4, pdpt, pd = tables, tables + PAGE, tables + 2 * PAGE
    upper = int(Pte.P | Pte.RW | Pte.US)
    vcpu.write_phys(pml4, struct.pack("<Q", pdpt | upper))
    vcpu.write_phys(pdpt, struct.pack("<Q", pd | upper))
    n_pts = size // (512 * PAGE)
    for i in range(n_pts):
        pt = tables + (3 + i) * PAGE
        vcpu.write_phys(pd + 8 * i, struct.pack("<Q", pt | upper))
        vcpu.write_phys(pt, b"".join(struct.pack("<Q", addr | page_flags(addr))
                                     for addr in range(i * 512 * PAGE, (i + 1) * 512 * PAGE, PAGE)))
    return pml4


def table_pages(size: int) -> int:
    """Bytes of page tables :func:`build_identity_map` writes for ``size``."""
    return (3 + size // (512 * PAGE)) * PAGE


def enter_long_mode(vcpu, *, cr3: int, gdt: int, cet: bool = False) -> None:
    """64-bit mode, CPL 0, flat segments, paging on with NX and CR0.WP; CR4.CET if ``cet``."""
    vcpu.write_phys(gdt, b"".join(struct.pack("<Q", d) for d in FLAT_GDT))
    cr4 = Cr4.PAE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.OSXSAVE | (Cr4.CET if cet else 0)
    vcpu.set_sregs(Sregs(
        cs=Segment.code64(KERNEL_CS), ss=Segment.data(KERNEL_DS), ds=Segment.data(KERNEL_DS),
        es=Segment.data(KERNEL_DS), fs=Segment.data(0), gs=Segment.data(0),
        gdt=DescriptorTable(gdt, 8 * len(FLAT_GDT) - 1), idt=DescriptorTable(0, 0),
        cr0=Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG, cr3=cr3, cr4=int(cr4),
        efer=Efer.LME | Efer.LMA | Efer.NXE | Efer.SCE))
