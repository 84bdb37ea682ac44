"""Multiboot v1 [Multiboot Specification 0.6.96]: header search, the a.out kludge, and the
multiboot information structure.

Header (§3.1): within the first 8192 bytes, 32-bit aligned, ``magic = 0x1BADB002``, ``flags``,
``checksum`` with ``magic + flags + checksum = 0 (mod 2^32)``. Flags bits 15:0 are requirements
a loader must honour or refuse: bit 0 (page-align modules; cetvm always does) and bit 1 (memory
information; always given) are supported, bit 2 (video mode) is refused, bits 15:3 are unknown
and refused. Bit 16 selects the a.out kludge: the header carries ``header_addr``, ``load_addr``,
``load_end_addr`` (0 = to the end of the file), ``bss_end_addr`` (0 = no bss) and
``entry_addr``; the file offset of ``load_addr`` is ``header_offset - (header_addr - load_addr)``.
Without bit 16 the file must be an ELF32 i386 executable, loaded by program headers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Sequence

from cetvm import InputError
from cetvm.vmm.layout import EBDA_START, HIGH_MEMORY_START, KiB, E820Entry, E820Type, guest_string_bytes
from cetvm.vmm.loader.bootplan import LoadedModule, MemoryImage, ZeroFill

MULTIBOOT_HEADER_MAGIC = 0x1BAD_B002
MULTIBOOT_SEARCH_LIMIT = 8192
MULTIBOOT_HEADER_ALIGN = 4
BOOT_LOADER_NAME = "cetvm"


class MultibootFlag(enum.IntFlag):
    """Multiboot header flags (§3.1.2)."""

    PAGE_ALIGN = 1 << 0
    MEMORY_INFO = 1 << 1
    VIDEO_MODE = 1 << 2
    AOUT_KLUDGE = 1 << 16


SUPPORTED_REQUIRED_FLAGS = MultibootFlag.PAGE_ALIGN | MultibootFlag.MEMORY_INFO
REQUIRED_FLAGS_MASK = 0xFFFF


class InfoFlag(enum.IntFlag):
    """Multiboot information ``flags`` (§3.3)."""

    MEMORY = 1 << 0
    BOOT_DEVICE = 1 << 1
    CMDLINE = 1 << 2
    MODS = 1 << 3
    MMAP = 1 << 6
    BOOT_LOADER_NAME = 1 << 9


#: The information structure up to and including the framebuffer fields is 116 bytes; we
#: reserve 120 so what follows stays 8-byte aligned.
INFO_STRUCT_SIZE = 120
MMAP_ENTRY_SIZE = 24  # u32 size (=20) + u64 base + u64 length + u32 type
MODULE_ENTRY_SIZE = 16


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def has_aout_kludge(self) -> bool:
        return bool(self.flags & MultibootFlag.AOUT_KLUDGE)


def find_multiboot_header(data: bytes, name: str = "kernel") -> MultibootHeader | None:
    """The first valid header in the first 8192 bytes, or None if there is no magic at all.

    A magic number whose checksum does not add up, with no valid header anywhere, is an error
    (a kernel that meant to be multiboot but is broken), not "no header"."""
    limit = min(len(data), MULTIBOOT_SEARCH_LIMIT)
    bad_checksum: list[tuple[int, int, int]] = []
    for offset in range(0, limit - 11, MULTIBOOT_HEADER_ALIGN):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic != MULTIBOOT_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFF_FFFF:
            bad_checksum.append((offset, flags, checksum))
            continue
        return _read_header(data, offset, flags, name)
    if bad_checksum:
        offset, flags, checksum = bad_checksum[0]
        expected = -(MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFF_FFFF
        raise InputError(f"{name}: multiboot header at offset {offset:#x} has checksum {checksum:#010x}, "
                         f"expected {expected:#010x} for flags {flags:#x}")
    return None


def _read_header(data: bytes, offset: int, flags: int, name: str) -> MultibootHeader:
    if not flags & MultibootFlag.AOUT_KLUDGE:
        return MultibootHeader(offset, flags)
    if offset + 32 > len(data):
        raise InputError(f"{name}: truncated multiboot header at offset {offset:#x}: the a.out kludge "
                         f"fields need 32 bytes, the file ends at {len(data):#x}")
    fields = struct.unpack_from("<5I", data, offset + 12)
    return MultibootHeader(offset, flags, *fields)


def check_required_flags(header: MultibootHeader, name: str = "kernel") -> None:
    """Refuse requirement bits (15:0) cetvm cannot honour (§3.1.2)."""
    required = header.flags & REQUIRED_FLAGS_MASK
    if required & MultibootFlag.VIDEO_MODE:
        raise InputError(f"{name}: multiboot header flags {header.flags:#x} require a video mode "
                         "(bit 2); cetvm has no framebuffer")
    unknown = required & ~(SUPPORTED_REQUIRED_FLAGS | MultibootFlag.VIDEO_MODE)
    if unknown:
        raise InputError(f"{name}: multiboot header flags {header.flags:#x} require unknown "
                         f"features (bits {unknown:#x})")


def aout_kludge_image(header: MultibootHeader, data: bytes, name: str = "kernel"
                      ) -> tuple[MemoryImage, ZeroFill | None, int]:
    """Image, bss and entry point described by the a.out kludge fields (§3.1.3)."""
    h = header
    if h.header_addr < h.load_addr:
        raise InputError(f"{name}: multiboot header_addr {h.header_addr:#x} is below load_addr {h.load_addr:#x}")
    load_offset = h.offset - (h.header_addr - h.load_addr)
    if load_offset < 0:
        raise InputError(f"{name}: multiboot load_addr {h.load_addr:#x} would start "
                         f"{-load_offset:#x} bytes before the beginning of the file")
    if h.load_end_addr == 0:
        load_size = len(data) - load_offset
    elif h.load_end_addr < h.load_addr:
        raise InputError(f"{name}: multiboot load_end_addr {h.load_end_addr:#x} is below load_addr {h.load_addr:#x}")
    else:
        load_size = h.load_end_addr - h.load_addr
    if load_offset + load_size > len(data):
        raise InputError(f"{name}: truncated kernel: the multiboot header loads file bytes "
                         f"{load_offset:#x}-{load_offset + load_size:#x}, the file has {len(data):#x}")
    load_end = h.load_addr + load_size
    bss = None
    if h.bss_end_addr:
        if h.bss_end_addr < load_end:
            raise InputError(f"{name}: multiboot bss_end_addr {h.bss_end_addr:#x} is below the end of "
                             f"the loaded image {load_end:#x}")
        if h.bss_end_addr > load_end:
            bss = ZeroFill(load_end, h.bss_end_addr - load_end, "kernel bss")
    image_end = bss.end if bss else load_end
    if not h.load_addr <= h.entry_addr < image_end:
        raise InputError(f"{name}: multiboot entry_addr {h.entry_addr:#x} is outside the loaded image "
                         f"{h.load_addr:#x}-{image_end:#x}")
    image = MemoryImage(h.load_addr, bytes(data[load_offset : load_offset + load_size]), "kernel image")
    return image, bss, h.entry_addr


# --- multiboot information (§3.3) ---------------------------------------------------------------

def _strings(cmdline: str, modules: Sequence[LoadedModule]) -> list[bytes]:
    return [BOOT_LOADER_NAME.encode() + b"\0", guest_string_bytes(cmdline) + b"\0"] + [
        guest_string_bytes(m.cmdline) + b"\0" for m in modules
    ]


def multiboot_info_size(cmdline: str, modules: Sequence[LoadedModule], e820: Sequence[E820Entry]) -> int:
    """Bytes :func:`build_multiboot_info` will produce (to choose where it goes first)."""
    return (INFO_STRUCT_SIZE + MMAP_ENTRY_SIZE * len(e820) + MODULE_ENTRY_SIZE * len(modules)
            + sum(len(s) for s in _strings(cmdline, modules)))


def mem_upper_kib(e820: Sequence[E820Entry]) -> int:
    """KiB of RAM contiguous from 1 MiB (§3.3 mem_upper)."""
    for entry in e820:
        if entry.type == E820Type.RAM and entry.addr <= HIGH_MEMORY_START < entry.end:
            return (entry.end - HIGH_MEMORY_START) // KiB
    return 0


def build_multiboot_info(addr: int, cmdline: str, modules: Sequence[LoadedModule],
                         e820: Sequence[E820Entry]) -> bytes:
    """The information structure at ``addr`` followed by the memory map, module list and strings.

    Flags: MEMORY (mem_lower = 639 KiB below the EBDA, mem_upper from 1 MiB), CMDLINE, MODS
    (possibly 0 modules), MMAP, BOOT_LOADER_NAME ("cetvm"). No boot device, symbols, drives,
    APM or video information."""
    mmap_addr = addr + INFO_STRUCT_SIZE
    mods_addr = mmap_addr + MMAP_ENTRY_SIZE * len(e820)
    cursor = mods_addr + MODULE_ENTRY_SIZE * len(modules)
    string_addrs = []
    strings = _strings(cmdline, modules)
    for s in strings:
        string_addrs.append(cursor)
        cursor += len(s)
    loader_name_addr, cmdline_addr, *module_string_addrs = string_addrs

    info = bytearray(INFO_STRUCT_SIZE)
    flags = InfoFlag.MEMORY | InfoFlag.CMDLINE | InfoFlag.MODS | InfoFlag.MMAP | InfoFlag.BOOT_LOADER_NAME
    struct.pack_into("<III", info, 0, flags, EBDA_START // KiB, mem_upper_kib(e820))
    struct.pack_into("<III", info, 16, cmdline_addr, len(modules), mods_addr)
    struct.pack_into("<II", info, 44, MMAP_ENTRY_SIZE * len(e820), mmap_addr)
    struct.pack_into("<I", info, 64, loader_name_addr)

    mmap = b"".join(struct.pack("<IQQI", MMAP_ENTRY_SIZE - 4, e.addr, e.size, int(e.type)) for e in e820)
    mods = b"".join(struct.pack("<IIII", m.start, m.end, s, 0) for m, s in zip(modules, module_string_addrs))
    blob = bytes(info) + mmap + mods + b"".join(strings)
    assert len(blob) == multiboot_info_size(cmdline, modules, e820)
    return blob
