"""Boot page tables and GDT for cetvm's 64-bit entry (pure functions: bytes + addresses).

Page tables [SDM Vol. 3 4.5]: PML4 at ``base``, one PDPT at ``base + 0x1000``, one page
directory per GiB after it; every PDE maps a 2 MiB page (PS=1) present, writable, supervisor,
executable, identity-mapped. The whole low 4 GiB is mapped, RAM and the MMIO window alike (the
local APIC page at 0xFEE00000 is reachable), in 6 pages of tables.

GDT [SDM Vol. 3 3.4.5, 5.2.1]: null, 0x08 64-bit code (L=1, DPL 0), 0x10 flat read/write data,
0x18 flat 32-bit code; accessed bits preset so the CPU never writes the table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cetvm import InputError
from cetvm.arch import Pte
from cetvm.vmm.layout import BOOT_GDT_ADDR, BOOT_PAGE_TABLES_ADDR, GiB, MiB, PAGE_SIZE

GDT_NULL = 0
GDT_CODE64 = 0x00AF_9B00_0000_FFFF
GDT_DATA = 0x00CF_9300_0000_FFFF
GDT_CODE32 = 0x00CF_9B00_0000_FFFF


@dataclass(frozen=True)
class PageTables:
    base: int
    data: bytes
    mapped_size: int

    @property
    def cr3(self) -> int:
        return self.base

    @property
    def end(self) -> int:
        return self.base + len(self.data)


@dataclass(frozen=True)
class BootGdt:
    base: int
    data: bytes

    @property
    def limit(self) -> int:
        return len(self.data) - 1


def build_identity_page_tables(base: int = BOOT_PAGE_TABLES_ADDR, map_size: int = 4 * GiB) -> PageTables:
    """Identity map of ``[0, map_size)`` with 2 MiB pages; ``map_size`` a multiple of 1 GiB up to
    512 GiB (one PDPT)."""
    if base % PAGE_SIZE:
        raise InputError(f"page tables base {base:#x} is not 4 KiB aligned")
    if map_size <= 0 or map_size % GiB or map_size > 512 * GiB:
        raise InputError(f"identity map size {map_size:#x} must be 1..512 GiB in whole GiB")
    n_pd = map_size // GiB
    pdpt_addr = base + PAGE_SIZE
    table_flags = int(Pte.P | Pte.RW)
    pml4 = struct.pack("<Q", pdpt_addr | table_flags).ljust(PAGE_SIZE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (pdpt_addr + PAGE_SIZE * (1 + i)) | table_flags) for i in range(n_pd))
    pdpt = pdpt.ljust(PAGE_SIZE, b"\0")
    large = int(Pte.P | Pte.RW | Pte.PS)
    pds = b"".join(struct.pack("<Q", (i * 2 * MiB) | large) for i in range(n_pd * 512))
    return PageTables(base, pml4 + pdpt + pds, map_size)


def build_boot_gdt(base: int = BOOT_GDT_ADDR) -> BootGdt:
    return BootGdt(base, struct.pack("<4Q", GDT_NULL, GDT_CODE64, GDT_DATA, GDT_CODE32))


def build_linux_boot_gdt(base: int = BOOT_GDT_ADDR) -> BootGdt:
    """The GDT the Linux 64-bit boot protocol asks for: flat code at ``__BOOT_CS`` (0x10, here
    64-bit) and flat data at ``__BOOT_DS`` (0x18); 0x08 is unused (null)."""
    return BootGdt(base, struct.pack("<4Q", GDT_NULL, GDT_NULL, GDT_CODE64, GDT_DATA))
