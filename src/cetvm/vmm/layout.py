"""The guest-physical memory map of a cetvm PC (pure facts: the loaders and the VMM share them).

RAM below 4 GiB runs from 0 to ``min(ram_size, LOW_RAM_LIMIT)``; the rest of the RAM is mapped at
4 GiB, leaving 3 GiB..4 GiB for MMIO (local APIC at 0xFEE00000), as QEMU's ``pc`` machine does
with its below/above-4G split. The E820 map reports the legacy holes a BIOS would leave: the
EBDA below 640 KiB and the BIOS area 0xF0000..0xFFFFF (QEMU+SeaBIOS publish the same).

Boot-time structures the loaders place in low memory (all inside usable RAM, which the guest
may reuse once it has read them):

=================  ===================  ============================================
0x1000 - 0x1FFF    BOOT_GDT_ADDR        flat GDT for the 64-bit entry
0x2000 - 0x7FFF    BOOT_PAGE_TABLES     PML4, PDPT and four page directories (2 MiB pages)
0x8000 - 0x9EFFF   BOOT_INFO_AREA       multiboot information, command lines, memory map
=================  ===================  ============================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cetvm import InputError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

PAGE_SIZE = 0x1000
#: RAM above this goes to HIGH_RAM_BASE (the 3..4 GiB window is MMIO).
LOW_RAM_LIMIT = 0xC000_0000
HIGH_RAM_BASE = 4 * GiB
MIN_RAM_SIZE = 2 * MiB
MAX_RAM_SIZE = 1 << 46

EBDA_START = 0x9_FC00
VGA_HOLE_START = 0xA_0000
BIOS_AREA_START = 0xF_0000
HIGH_MEMORY_START = 0x10_0000

BOOT_GDT_ADDR = 0x1000
BOOT_PAGE_TABLES_ADDR = 0x2000
BOOT_PAGE_TABLES_END = 0x8000
BOOT_INFO_AREA_START = 0x8000
BOOT_INFO_AREA_END = 0x9_F000


class E820Type(enum.IntEnum):
    RAM = 1
    RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class RamRegion:
    """A contiguous guest-physical RAM range the VMM must back with memory."""

    addr: int
    size: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def check_ram_size(ram_size: int) -> None:
    """RAM must be a whole number of pages, at least 2 MiB (room for a kernel at 1 MiB)."""
    if ram_size < MIN_RAM_SIZE:
        raise InputError(f"RAM size {ram_size:#x} is too small: at least {MIN_RAM_SIZE // MiB} MiB")
    if ram_size % PAGE_SIZE:
        raise InputError(f"RAM size {ram_size:#x} is not a multiple of 4 KiB")
    if ram_size > MAX_RAM_SIZE:
        raise InputError(f"RAM size {ram_size:#x} is larger than {MAX_RAM_SIZE:#x}")


def low_ram_end(ram_size: int) -> int:
    return min(ram_size, LOW_RAM_LIMIT)


def ram_regions(ram_size: int) -> tuple[RamRegion, ...]:
    """The RAM ranges for ``ram_size`` bytes of guest memory."""
    check_ram_size(ram_size)
    low = low_ram_end(ram_size)
    regions = [RamRegion(0, low)]
    if ram_size > low:
        regions.append(RamRegion(HIGH_RAM_BASE, ram_size - low))
    return tuple(regions)


def e820_map(ram_size: int) -> tuple[E820Entry, ...]:
    """The memory map handed to the guest (multiboot mmap, later E820 for Linux)."""
    regions = ram_regions(ram_size)
    low = regions[0].end
    entries = [
        E820Entry(0, EBDA_START, E820Type.RAM),
        E820Entry(EBDA_START, VGA_HOLE_START - EBDA_START, E820Type.RESERVED),
        E820Entry(BIOS_AREA_START, HIGH_MEMORY_START - BIOS_AREA_START, E820Type.RESERVED),
        E820Entry(HIGH_MEMORY_START, low - HIGH_MEMORY_START, E820Type.RAM),
    ]
    entries += [E820Entry(r.addr, r.size, E820Type.RAM) for r in regions[1:]]
    return tuple(entries)


def in_ram(addr: int, size: int, ram_size: int) -> bool:
    """True if ``[addr, addr + size)`` lies inside one RAM region."""
    return any(r.addr <= addr and addr + size <= r.end for r in ram_regions(ram_size))


def page_align_up(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def guest_string_bytes(text: str) -> bytes:
    """The bytes a guest receives for a command line or module string: UTF-8, with the bytes
    of a non-UTF-8 argument or path passed through unchanged (Python holds them as lone
    surrogates, ``surrogateescape``), as a C boot loader would copy ``argv``."""
    return text.encode("utf-8", "surrogateescape")
