"""``load_kernel``: pick the boot protocol for a kernel file and lay out guest memory.

Choice (in this order):
1. A valid multiboot v1 header in the first 8192 bytes -> multiboot: the a.out kludge if flags
   bit 16 is set (any file format, ELF64 included), else ELF32 i386 program headers. Entry in
   32-bit protected mode (:class:`Protected32Entry`).
2. Otherwise an ELF64 x86-64 executable -> cetvm's ELF64 protocol (:class:`Long64Entry`, see
   :mod:`cetvm.vmm.loader.bootplan`): segments loaded at their physical addresses (p_paddr), the
   entry translated from virtual to physical through its segment; boot GDT at 0x1000, page
   tables at 0x2000-0x7FFF, a 64 KiB stack ending at the top of low RAM.
3. Anything else is an :class:`~cetvm.InputError` saying why.

Both protocols get the same multiboot information structure (modules, command line, memory
map). Placement: the kernel where it asks; modules page-aligned one after another from the
first page after the kernel (or at an explicit ``ModuleSpec.addr``); the information block in
0x8000-0x9EFFF when free, else after the last module. Nothing may overlap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from cetvm import InputError
from cetvm.files import read_input, read_input_head
from cetvm.vmm.layout import (
    BOOT_GDT_ADDR,
    BOOT_INFO_AREA_END,
    BOOT_INFO_AREA_START,
    BOOT_PAGE_TABLES_END,
    GiB,
    PAGE_SIZE,
    check_ram_size,
    e820_map,
    in_ram,
    low_ram_end,
    page_align_up,
    ram_regions,
)
from cetvm.vmm.loader.bootplan import (
    BootPlan,
    LoadedModule,
    Long64Entry,
    MemoryImage,
    Protected32Entry,
    ZeroFill,
)
from cetvm.vmm.loader.elf import (
    ELFCLASS64,
    EM_386,
    EM_X86_64,
    ElfFile,
    check_executable,
    elf_class_of,
    is_elf,
    machine_name,
    parse_elf,
)
from cetvm.vmm.loader.linux import is_bzimage, load_linux_image
from cetvm.vmm.loader.longmode import build_boot_gdt, build_identity_page_tables
from cetvm.vmm.loader.multiboot import (
    aout_kludge_image,
    build_multiboot_info,
    check_required_flags,
    MULTIBOOT_SEARCH_LIMIT,
    find_multiboot_header,
    multiboot_info_size,
)

BOOT_STACK_SIZE = 64 * 1024
FOUR_GIB = 4 * GiB


@dataclass(frozen=True)
class ModuleSpec:
    """A multiboot module: file, its command line (default: the path) and an optional fixed
    load address."""

    path: str
    cmdline: str | None = None
    addr: int | None = None


@dataclass(frozen=True)
class _Range:
    start: int
    end: int
    what: str


def _describe_ram(ram_size: int) -> str:
    """The RAM ranges and their total, e.g. ``0x0-0x3fffff, 4 MiB of RAM`` (what --memory gave)."""
    total = f"{ram_size >> 20} MiB" if ram_size % (1 << 20) == 0 else f"{ram_size:#x} bytes"
    return ", ".join(f"{r.addr:#x}-{r.end - 1:#x}" for r in ram_regions(ram_size)) + f"; {total} of RAM"


def _check_in_ram(start: int, end: int, what: str, ram_size: int, below_4g: bool) -> None:
    if end > start and (not in_ram(start, end - start, ram_size) or (below_4g and end > FOUR_GIB)):
        where = " below 4 GiB" if below_4g else ""
        raise InputError(f"{what} at {start:#x}-{end - 1:#x} lies outside RAM{where} ({_describe_ram(ram_size)})")


def _check_free(new: _Range, taken: Sequence[_Range]) -> None:
    for other in taken:
        if new.start < other.end and other.start < new.end and new.end > new.start and other.end > other.start:
            raise InputError(f"{new.what} at {new.start:#x}-{new.end - 1:#x} overlaps {other.what} "
                             f"at {other.start:#x}-{other.end - 1:#x}")


def _read_file(path: str, what: str, ram_size: int) -> bytes:
    """The whole file, refused before reading when it is not a regular file or is larger than
    the guest RAM (it could not be loaded anyway)."""
    return bytes(read_input(path, f"{what} file '{path}'", ram_size, "larger than the guest RAM"))


def _check_bootable_head(path: str, name: str) -> bytes:
    """Refuse a file that is neither multiboot nor ELF from its first 8192 bytes, before the
    rest is read (a 2 GiB text file costs 8 KiB of memory to refuse, not 2 GiB)."""
    head = read_input_head(path, f"kernel file '{path}'", MULTIBOOT_SEARCH_LIMIT + 64)
    if find_multiboot_header(head, name) is None and not is_elf(head) and not is_bzimage(head):
        raise InputError(f"{name}: not a Linux bzImage, no multiboot header in the first 8192 bytes and "
                         f"not an ELF file (starts with {head[:4]!r})")
    return head


def _elf_segments(elf: ElfFile, data: bytes) -> tuple[list[MemoryImage], list[ZeroFill]]:
    images, fills = [], []
    for seg in elf.segments:
        if seg.filesz:
            images.append(MemoryImage(seg.paddr, bytes(data[seg.offset : seg.offset + seg.filesz]),
                                      f"kernel segment {seg.index}"))
        if seg.memsz > seg.filesz:
            fills.append(ZeroFill(seg.paddr + seg.filesz, seg.memsz - seg.filesz, f"kernel segment {seg.index} bss"))
    return images, fills


def _check_entry_loaded(elf: ElfFile, name: str) -> None:
    if not any(seg.vaddr <= elf.entry < seg.vaddr + seg.memsz for seg in elf.segments):
        raise InputError(f"{name}: ELF entry point {elf.entry:#x} is not inside any loadable segment")


def _elf_ranges(elf: ElfFile) -> list[_Range]:
    return [_Range(seg.paddr, seg.paddr + seg.memsz, f"ELF segment {seg.index}") for seg in elf.segments if seg.memsz]


def _multiboot_layout(data: bytes, name: str):
    header = find_multiboot_header(data, name)
    if header is None:
        return None
    check_required_flags(header, name)
    if header.has_aout_kludge:
        image, bss, entry = aout_kludge_image(header, data, name)
        ranges = [_Range(image.addr, bss.end if bss else image.end, "kernel image")]
        return "multiboot-aout-kludge", [image], [bss] if bss else [], entry, ranges
    elf_class = elf_class_of(data)
    if elf_class is None:
        raise InputError(f"{name}: multiboot header at offset {header.offset:#x} has no a.out kludge "
                         "(flags bit 16) and the file is not ELF")
    if elf_class == ELFCLASS64:
        raise InputError(f"{name}: 64-bit ELF with a multiboot header but no a.out kludge (flags bit 16): "
                         "multiboot v1 loads only ELF32; add the kludge fields or drop the header "
                         "to boot it as ELF64")
    elf = parse_elf(data, name)
    check_executable(elf, EM_386, name)
    _check_entry_loaded(elf, name)
    images, fills = _elf_segments(elf, data)
    return "multiboot-elf32", images, fills, elf.entry_physical(), _elf_ranges(elf)


def _elf64_layout(data: bytes, name: str):
    elf_class = elf_class_of(data)
    if elf_class is None:
        raise InputError(f"{name}: no multiboot header in the first 8192 bytes and not an ELF file "
                         f"(starts with {data[:4]!r})")
    elf = parse_elf(data, name)
    if elf.elf_class != ELFCLASS64:
        if elf.machine == EM_386:
            raise InputError(f"{name}: 32-bit ELF without a multiboot header: cetvm boots 32-bit "
                             "kernels only through multiboot v1")
        raise InputError(f"{name}: ELF machine is {machine_name(elf.machine)}, expected {machine_name(EM_X86_64)}")
    check_executable(elf, EM_X86_64, name)
    _check_entry_loaded(elf, name)
    images, fills = _elf_segments(elf, data)
    return "elf64", images, fills, elf.entry_physical(), _elf_ranges(elf)


def _place_modules(modules: Sequence[tuple[ModuleSpec, bytes]], taken: list[_Range], start: int,
                   ram_size: int) -> list[LoadedModule]:
    placed = []
    cursor = page_align_up(start)
    for spec, blob in modules:
        what = f"module '{spec.path}'"
        if spec.addr is not None:
            if spec.addr % PAGE_SIZE:
                raise InputError(f"{what}: load address {spec.addr:#x} is not 4 KiB aligned")
            addr = spec.addr
        else:
            addr = cursor
            for other in sorted(taken, key=lambda r: r.start):
                if addr < other.end and other.start < addr + max(len(blob), 1):
                    addr = page_align_up(other.end)
        new = _Range(addr, addr + len(blob), what)
        _check_in_ram(new.start, new.end, what, ram_size, below_4g=True)
        _check_free(new, taken)
        taken.append(new)
        placed.append(LoadedModule(spec.path, addr, addr + len(blob),
                                   spec.cmdline if spec.cmdline is not None else spec.path))
        cursor = max(cursor, page_align_up(new.end))
    return placed


def _place_info(size: int, taken: list[_Range], ram_size: int) -> int:
    candidate = _Range(BOOT_INFO_AREA_START, BOOT_INFO_AREA_START + size, "multiboot information")
    if candidate.end <= BOOT_INFO_AREA_END and not any(
        candidate.start < t.end and t.start < candidate.end for t in taken
    ):
        return candidate.start
    addr = page_align_up(max(t.end for t in taken))
    _check_in_ram(addr, addr + size, "multiboot information", ram_size, below_4g=True)
    return addr


def load_kernel_image(data: bytes, ram_size: int, cmdline: str = "",
                      modules: Sequence[tuple[ModuleSpec, bytes]] = (), name: str = "kernel") -> BootPlan:
    """:func:`load_kernel` for a kernel and modules already in memory."""
    check_ram_size(ram_size)
    layout = _multiboot_layout(data, name) or _elf64_layout(data, name)
    kind, images, fills, entry, kernel_ranges = layout
    long_mode = kind == "elf64"

    taken: list[_Range] = []
    if long_mode:
        taken.append(_Range(BOOT_GDT_ADDR, BOOT_PAGE_TABLES_END, "boot GDT and page tables"))
    for r in kernel_ranges:
        _check_in_ram(r.start, r.end, f"{name}: {r.what}", ram_size, below_4g=True)
        _check_free(r, taken)
        taken.append(r)
    kernel_start = min(r.start for r in kernel_ranges)
    kernel_end = max(r.end for r in kernel_ranges)

    placed = _place_modules(modules, taken, kernel_end, ram_size)
    e820 = e820_map(ram_size)
    info_size = multiboot_info_size(cmdline, placed, e820)
    info_addr = _place_info(info_size, taken, ram_size)
    taken.append(_Range(info_addr, info_addr + info_size, "multiboot information"))
    all_images = list(images) + [MemoryImage(info_addr, build_multiboot_info(info_addr, cmdline, placed, e820),
                                             "multiboot information")]
    all_images += [MemoryImage(m.start, blob, f"module '{m.path}'") for m, (_, blob) in zip(placed, modules) if blob]

    if long_mode:
        stack_top = low_ram_end(ram_size) & ~0xF
        stack = _Range(stack_top - BOOT_STACK_SIZE, stack_top, "64 KiB boot stack")
        _check_free(stack, taken)
        tables = build_identity_page_tables()
        gdt = build_boot_gdt()
        all_images += [MemoryImage(gdt.base, gdt.data, "boot GDT"),
                       MemoryImage(tables.base, tables.data, "boot page tables")]
        boot_entry: Protected32Entry | Long64Entry = Long64Entry(
            rip=entry, rsp=stack_top, rbx=info_addr, rdi=info_addr, cr3=tables.cr3,
            gdt_base=gdt.base, gdt_limit=gdt.limit)
    else:
        boot_entry = Protected32Entry(eip=entry, ebx=info_addr)

    return BootPlan(kind=kind, images=tuple(all_images), zero_fills=tuple(fills), entry=boot_entry,
                    info_addr=info_addr, kernel_start=kernel_start, kernel_end=kernel_end,
                    modules=tuple(placed), e820=e820)


def load_kernel(path: str | os.PathLike, ram_size: int, cmdline: str = "",
                modules: Sequence[ModuleSpec | str] = ()) -> BootPlan:
    """Read a kernel (multiboot v1 or ELF64) and its modules, and plan guest memory and entry."""
    specs = [m if isinstance(m, ModuleSpec) else ModuleSpec(str(m)) for m in modules]
    check_ram_size(ram_size)
    head = _check_bootable_head(os.fspath(path), os.fspath(path))
    if is_bzimage(head):
        return _load_bzimage(os.fspath(path), ram_size, cmdline, specs)
    data = _read_file(os.fspath(path), "kernel", ram_size)
    blobs = [(spec, _read_file(spec.path, "module", ram_size)) for spec in specs]
    return load_kernel_image(data, ram_size, cmdline, blobs, name=os.fspath(path))


def _load_bzimage(path: str, ram_size: int, cmdline: str, specs: Sequence[ModuleSpec]) -> BootPlan:
    """A Linux bzImage: at most one module, the initrd (the boot protocol has one ramdisk)."""
    if len(specs) > 1:
        raise InputError(f"{path}: a Linux kernel takes one initrd; {len(specs)} were given")
    if specs and (specs[0].addr is not None or specs[0].cmdline):
        raise InputError(f"{path}: a Linux initrd has no load address or command line of its own")
    data = _read_file(path, "kernel", ram_size)
    initrd = _read_file(specs[0].path, "initrd", ram_size) if specs else b""
    return load_linux_image(data, ram_size, cmdline, initrd, initrd_name=specs[0].path if specs else "",
                            name=path)
