"""The Linux x86 boot protocol, 64-bit entry: a bzImage, its initrd and command line → BootPlan.

cetvm is the boot loader (as QEMU's ``-kernel`` / Firecracker / cloud-hypervisor are): it reads
the bzImage's setup header [Linux boot protocol, "The Real-Mode Kernel Header"], builds the
zero page (``struct boot_params``) with an E820 map, places the protected-mode kernel, the
command line and the initrd, and enters the kernel's 64-bit entry point ``startup_64``
(load address + 0x200) as the protocol's "64-bit Boot Protocol" section requires:

- 64-bit mode with paging on; the loaded kernel (``init_size`` bytes from its load address), the
  zero page and the command line identity-mapped (cetvm maps the whole low 4 GiB with 2 MiB
  pages, :func:`~cetvm.vmm.loader.longmode.build_identity_page_tables`);
- a GDT with flat 4 GiB descriptors at ``__BOOT_CS`` (0x10, 64-bit code) and ``__BOOT_DS``
  (0x18, data); CS = 0x10, DS = ES = SS = 0x18; interrupts off;
- RSI = the zero page's physical address.

Why the 64-bit entry and not PVH: the input is the bzImage Debian ships (PVH needs the
uncompressed ELF ``vmlinux`` with its Xen ELF note), and the 64-bit entry is what every VMM
that boots a bzImage directly uses. Protocol 2.12 or newer with ``XLF_KERNEL_64`` is required
(every x86-64 kernel since 3.8); anything else is refused with the reason.

Placement (decisions, documented in :func:`linux_layout`): the zero page at 0x8000 and the
command line at 0x9000 (inside the boot information area, :mod:`cetvm.vmm.layout`); the kernel
at its ``pref_address`` (16 MiB for a default x86-64 build), aligned to ``kernel_alignment``
when that is not; the initrd page-aligned at the top of low RAM below ``initrd_addr_max``, as
QEMU places it. The E820 map is the PC map of :func:`cetvm.vmm.layout.e820_map`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cetvm import InputError
from cetvm.vmm.layout import (
    BOOT_GDT_ADDR,
    BOOT_INFO_AREA_START,
    E820Entry,
    PAGE_SIZE,
    e820_map,
    guest_string_bytes,
    low_ram_end,
)
from cetvm.vmm.loader.bootplan import BootPlan, LoadedModule, Long64Entry, MemoryImage
from cetvm.vmm.loader.longmode import build_identity_page_tables, build_linux_boot_gdt

#: "HdrS" at offset 0x202 of a bzImage.
SETUP_HEADER_MAGIC = b"HdrS"
SETUP_HEADER_MAGIC_OFFSET = 0x202
#: The setup header starts at 0x1F1 in the file and in the zero page.
SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG_OFFSET, BOOT_FLAG = 0x1FE, 0xAA55
#: Protocol 2.12 introduced ``xloadflags`` (XLF_KERNEL_64).
MIN_PROTOCOL_VERSION = 0x020C
ZERO_PAGE_SIZE = 0x1000
ZERO_PAGE_ADDR = BOOT_INFO_AREA_START
CMDLINE_ADDR = BOOT_INFO_AREA_START + ZERO_PAGE_SIZE
#: The offset of startup_64 from the load address of the protected-mode kernel.
STARTUP_64_OFFSET = 0x200
#: ``type_of_loader`` 0xFF: "undefined" boot loader (QEMU uses 0xB0, others 0xFF).
LOADER_TYPE_UNDEFINED = 0xFF
E820_MAX_ENTRIES_ZEROPAGE = 128
#: The 64-bit boot protocol's segment selectors.
BOOT_CS, BOOT_DS = 0x10, 0x18
LINUX_BOOT_STACK_SIZE = 0x1000


class LoadFlag(enum.IntFlag):
    """``loadflags`` (setup header offset 0x211)."""

    LOADED_HIGH = 1 << 0
    KASLR_FLAG = 1 << 1
    QUIET_FLAG = 1 << 5
    KEEP_SEGMENTS = 1 << 6
    CAN_USE_HEAP = 1 << 7


class XLoadFlag(enum.IntFlag):
    """``xloadflags`` (setup header offset 0x236, protocol 2.12+)."""

    KERNEL_64 = 1 << 0
    CAN_BE_LOADED_ABOVE_4G = 1 << 1
    EFI_HANDOVER_32 = 1 << 2
    EFI_HANDOVER_64 = 1 << 3
    EFI_KEXEC = 1 << 4


class ZeroPage(enum.IntEnum):
    """Offsets in ``struct boot_params`` (the zero page) cetvm writes or reads."""

    ACPI_RSDP_ADDR = 0x070
    EXT_RAMDISK_IMAGE = 0x0C0
    EXT_RAMDISK_SIZE = 0x0C4
    EXT_CMD_LINE_PTR = 0x0C8
    E820_ENTRIES = 0x1E8
    SENTINEL = 0x1EF
    SETUP_SECTS = 0x1F1
    HEADER_LENGTH_BYTE = 0x201
    VERSION = 0x206
    TYPE_OF_LOADER = 0x210
    LOADFLAGS = 0x211
    CODE32_START = 0x214
    RAMDISK_IMAGE = 0x218
    RAMDISK_SIZE = 0x21C
    HEAP_END_PTR = 0x224
    CMD_LINE_PTR = 0x228
    INITRD_ADDR_MAX = 0x22C
    KERNEL_ALIGNMENT = 0x230
    RELOCATABLE_KERNEL = 0x234
    XLOADFLAGS = 0x236
    CMDLINE_SIZE = 0x238
    PREF_ADDRESS = 0x258
    INIT_SIZE = 0x260
    E820_TABLE = 0x2D0


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header the loader needs."""

    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part (boot sector + setup), which precede the kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(head: bytes) -> bool:
    """True when ``head`` (the file's first bytes) carries the boot protocol's "HdrS" magic."""
    end = SETUP_HEADER_MAGIC_OFFSET + len(SETUP_HEADER_MAGIC)
    return len(head) >= end and head[SETUP_HEADER_MAGIC_OFFSET:end] == SETUP_HEADER_MAGIC


def _field(data: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, data, offset)[0]


def parse_setup_header(data: bytes, name: str = "kernel") -> SetupHeader:
    """Read and check the setup header [boot protocol "Details of Header Fields"]."""
    if len(data) < ZeroPage.INIT_SIZE + 4 or not is_bzimage(data):
        raise InputError(f"{name}: not a Linux bzImage (no 'HdrS' setup header at 0x202)")
    if _field(data, BOOT_FLAG_OFFSET, "H") != BOOT_FLAG:
        raise InputError(f"{name}: bzImage boot_flag is not 0xAA55")
    version = _field(data, ZeroPage.VERSION, "H")
    setup_sects = data[ZeroPage.SETUP_SECTS] or 4
    header = SetupHeader(
        setup_sects=setup_sects, version=version, loadflags=data[ZeroPage.LOADFLAGS],
        initrd_addr_max=_field(data, ZeroPage.INITRD_ADDR_MAX, "I"),
        kernel_alignment=_field(data, ZeroPage.KERNEL_ALIGNMENT, "I"),
        relocatable=bool(data[ZeroPage.RELOCATABLE_KERNEL]),
        xloadflags=_field(data, ZeroPage.XLOADFLAGS, "H"),
        cmdline_size=_field(data, ZeroPage.CMDLINE_SIZE, "I"),
        pref_address=_field(data, ZeroPage.PREF_ADDRESS, "Q"),
        init_size=_field(data, ZeroPage.INIT_SIZE, "I"),
        header_end=SETUP_HEADER_MAGIC_OFFSET + data[ZeroPage.HEADER_LENGTH_BYTE])
    check_boot_protocol(header, len(data), name)
    return header


def check_boot_protocol(header: SetupHeader, file_size: int, name: str) -> None:
    """What cetvm's 64-bit entry needs of a bzImage, each refusal naming the reason."""
    if header.version < MIN_PROTOCOL_VERSION:
        raise InputError(f"{name}: boot protocol {header.version_text} is too old: the 64-bit entry "
                         f"needs 2.12 or newer")
    if not header.xloadflags & XLoadFlag.KERNEL_64:
        raise InputError(f"{name}: bzImage has no 64-bit entry point (XLF_KERNEL_64 clear): a 32-bit "
                         f"kernel, which cetvm does not boot")
    if not header.loadflags & LoadFlag.LOADED_HIGH:
        raise InputError(f"{name}: a zImage (loaded at 0x10000) is not supported; use a bzImage")
    if header.setup_size >= file_size:
        raise InputError(f"{name}: bzImage is truncated: setup ({header.setup_size} bytes) fills the file")
    if header.kernel_alignment == 0 or header.kernel_alignment & (header.kernel_alignment - 1):
        raise InputError(f"{name}: kernel_alignment {header.kernel_alignment:#x} is not a power of two")


@dataclass(frozen=True)
class LinuxLayout:
    """Where each part goes in guest-physical memory."""

    kernel_addr: int
    kernel_end: int
    initrd_addr: int
    initrd_size: int
    cmdline_addr: int
    zero_page_addr: int


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def kernel_load_address(header: SetupHeader) -> int:
    """``pref_address`` when it satisfies ``kernel_alignment`` (a relocatable kernel may go
    anywhere aligned; a non-relocatable one must go exactly there)."""
    if header.pref_address % header.kernel_alignment == 0 or not header.relocatable:
        return header.pref_address
    return _align_up(header.pref_address, header.kernel_alignment)


def linux_layout(header: SetupHeader, kernel_size: int, initrd_size: int, cmdline_size: int,
                 ram_size: int, name: str = "kernel") -> LinuxLayout:
    """Place the kernel, its decompression area, the initrd and the command line; refuse what
    does not fit in low RAM (every part must lie below 4 GiB for the 64-bit entry's mappings)."""
    low_end = low_ram_end(ram_size)
    kernel_addr = kernel_load_address(header)
    kernel_end = kernel_addr + max(kernel_size, header.init_size)
    if kernel_end > low_end:
        raise InputError(f"{name}: the kernel needs RAM up to {kernel_end:#x} (loaded at {kernel_addr:#x}, "
                         f"init_size {header.init_size:#x}) but low RAM ends at {low_end:#x}; give more --memory")
    if cmdline_size > min(header.cmdline_size, PAGE_SIZE - 1):
        raise InputError(f"kernel command line is {cmdline_size} bytes; this kernel accepts at most "
                         f"{min(header.cmdline_size, PAGE_SIZE - 1)}")
    initrd_addr = 0
    if initrd_size:
        initrd_top = min(low_end, header.initrd_addr_max + 1) - LINUX_BOOT_STACK_SIZE
        initrd_addr = (initrd_top - initrd_size) & ~(PAGE_SIZE - 1)
        if initrd_addr < kernel_end:
            raise InputError(f"initrd ({initrd_size} bytes) does not fit between the kernel (ends at "
                             f"{kernel_end:#x}) and {initrd_top:#x}; give more --memory")
    return LinuxLayout(kernel_addr=kernel_addr, kernel_end=kernel_end, initrd_addr=initrd_addr,
                       initrd_size=initrd_size, cmdline_addr=CMDLINE_ADDR, zero_page_addr=ZERO_PAGE_ADDR)


def e820_table(entries: tuple[E820Entry, ...]) -> bytes:
    """``boot_params.e820_table``: 20-byte ``struct boot_e820_entry`` records."""
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise InputError(f"E820 map has {len(entries)} entries; the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")
    return b"".join(struct.pack("<QQI", e.addr, e.size, int(e.type)) for e in entries)


def build_zero_page(data: bytes, header: SetupHeader, layout: LinuxLayout,
                    e820: tuple[E820Entry, ...], rsdp_addr: int = 0) -> bytes:
    """``struct boot_params``: the file's setup header copied to 0x1F1, then the fields a boot
    loader fills [boot protocol "Details of Header Fields", zero-page.rst]."""
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_OFFSET:header.header_end] = data[SETUP_HEADER_OFFSET:header.header_end]
    page[ZeroPage.SENTINEL] = 0
    page[ZeroPage.TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    page[ZeroPage.LOADFLAGS] = (header.loadflags | LoadFlag.CAN_USE_HEAP) & ~LoadFlag.QUIET_FLAG
    struct.pack_into("<I", page, ZeroPage.CODE32_START, layout.kernel_addr)
    struct.pack_into("<H", page, ZeroPage.HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", page, ZeroPage.CMD_LINE_PTR, layout.cmdline_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", page, ZeroPage.EXT_CMD_LINE_PTR, layout.cmdline_addr >> 32)
    struct.pack_into("<I", page, ZeroPage.RAMDISK_IMAGE, layout.initrd_addr & 0xFFFF_FFFF)
    struct.pack_into("<I", page, ZeroPage.RAMDISK_SIZE, layout.initrd_size & 0xFFFF_FFFF)
    struct.pack_into("<I", page, ZeroPage.EXT_RAMDISK_IMAGE, layout.initrd_addr >> 32)
    struct.pack_into("<I", page, ZeroPage.EXT_RAMDISK_SIZE, layout.initrd_size >> 32)
    struct.pack_into("<Q", page, ZeroPage.ACPI_RSDP_ADDR, rsdp_addr)
    page[ZeroPage.E820_ENTRIES] = len(e820)
    table = e820_table(e820)
    page[ZeroPage.E820_TABLE:ZeroPage.E820_TABLE + len(table)] = table
    return bytes(page)


def load_linux_image(data: bytes, ram_size: int, cmdline: str = "", initrd: bytes = b"",
                     initrd_name: str = "initrd", name: str = "kernel", rsdp_addr: int = 0) -> BootPlan:
    """A bzImage (and its initrd) in memory → the BootPlan of the 64-bit boot protocol."""
    header = parse_setup_header(data, name)
    kernel = data[header.setup_size:]
    command = guest_string_bytes(cmdline) + b"\0"
    layout = linux_layout(header, len(kernel), len(initrd), len(command) - 1, ram_size, name)
    e820 = e820_map(ram_size)
    tables = build_identity_page_tables()
    gdt = build_linux_boot_gdt(BOOT_GDT_ADDR)
    images = [MemoryImage(gdt.base, gdt.data, "boot GDT"),
              MemoryImage(tables.base, tables.data, "boot page tables"),
              MemoryImage(layout.zero_page_addr, build_zero_page(data, header, layout, e820, rsdp_addr),
                          "zero page (boot_params)"),
              MemoryImage(layout.cmdline_addr, command, "kernel command line"),
              MemoryImage(layout.kernel_addr, kernel, "protected-mode kernel")]
    modules: tuple[LoadedModule, ...] = ()
    if initrd:
        images.append(MemoryImage(layout.initrd_addr, initrd, "initrd"))
        modules = (LoadedModule(initrd_name, layout.initrd_addr, layout.initrd_addr + len(initrd), ""),)
    stack_top = layout.zero_page_addr  # the kernel sets its own stack before using one
    entry = Long64Entry(rip=layout.kernel_addr + STARTUP_64_OFFSET, rsp=stack_top, rbx=0, rdi=0,
                        cr3=tables.cr3, gdt_base=gdt.base, gdt_limit=gdt.limit, rax=0,
                        rsi=layout.zero_page_addr, cs=BOOT_CS, ds=BOOT_DS)
    return BootPlan(kind="linux", images=tuple(images), zero_fills=(), entry=entry,
                    info_addr=layout.zero_page_addr, kernel_start=layout.kernel_addr,
                    kernel_end=layout.kernel_end, modules=modules, e820=e820)
