"""Minimal ELF reader for kernels: header, PT_LOAD program headers, precise errors.

Only what a boot loader needs [System V gABI ch. 4-5]: identification, machine, type, entry and
the loadable segments. Every malformed input is an :class:`~cetvm.InputError` naming the field.
"""

from __future__ import annotations

import struct
from types import MappingProxyType
from typing import Mapping
from dataclasses import dataclass

from cetvm import InputError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
ET_DYN = 3
PT_LOAD = 1
EM_386 = 3
EM_X86_64 = 62

#: e_machine names used in error messages.
MACHINE_NAMES: Mapping[int, str] = MappingProxyType({
    0: "none", 2: "SPARC", 3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "S390",
    40: "ARM", 42: "SuperH", 43: "SPARC V9", 50: "IA-64", 62: "x86-64", 183: "AArch64",
    243: "RISC-V", 258: "LoongArch",
})
ELF_TYPE_NAMES: Mapping[int, str] = MappingProxyType(
    {0: "ET_NONE", 1: "ET_REL (object file)", 2: "ET_EXEC", 3: "ET_DYN (position-independent)", 4: "ET_CORE"})


def machine_name(machine: int) -> str:
    return f"{MACHINE_NAMES.get(machine, 'unknown')} ({machine})"


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD program header."""

    index: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class ElfFile:
    elf_class: int
    machine: int
    type: int
    entry: int
    segments: tuple[ElfSegment, ...]

    @property
    def bits(self) -> int:
        return 64 if self.elf_class == ELFCLASS64 else 32

    def entry_physical(self) -> int:
        """The entry address translated through the segment that holds it (vaddr -> paddr),
        as GRUB does for kernels linked at a virtual address but loaded by physical address."""
        for seg in self.segments:
            if seg.vaddr <= self.entry < seg.vaddr + seg.memsz:
                return self.entry - seg.vaddr + seg.paddr
        return self.entry


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def elf_class_of(data: bytes) -> int | None:
    """EI_CLASS of an ELF file, or None if ``data`` is not ELF."""
    return data[4] if is_elf(data) and len(data) > 4 else None


def _unpack(fmt: str, data: bytes, offset: int, what: str, name: str):
    size = struct.calcsize(fmt)
    if offset + size > len(data):
        raise InputError(f"{name}: truncated ELF: {what} at offset {offset:#x} needs {size} bytes, "
                         f"the file has {len(data)}")
    return struct.unpack_from(fmt, data, offset)


def parse_elf(data: bytes, name: str = "kernel") -> ElfFile:
    """Read the ELF header and PT_LOAD segments of a little-endian x86 ELF."""
    if not is_elf(data):
        raise InputError(f"{name}: not an ELF file (starts with {data[:4]!r})")
    if len(data) < 16:
        raise InputError(f"{name}: truncated ELF: {len(data)} bytes, the identification alone is 16")
    elf_class, data_enc = data[4], data[5]
    if elf_class not in (ELFCLASS32, ELFCLASS64):
        raise InputError(f"{name}: ELF class {elf_class} is neither 32-bit (1) nor 64-bit (2)")
    if data_enc != ELFDATA2LSB:
        raise InputError(f"{name}: ELF data encoding {data_enc} is not little-endian (1)")
    is64 = elf_class == ELFCLASS64
    if is64:
        e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_sh = _unpack(
            "<HHIQQQIHHHHHH", data, 16, "ELF header", name)
    else:
        e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_sh = _unpack(
            "<HHIIIIIHHHHHH", data, 16, "ELF header", name)
    ph_fmt = "<IIQQQQQQ" if is64 else "<IIIIIIII"
    if phnum and phentsize < struct.calcsize(ph_fmt):
        raise InputError(f"{name}: ELF program header size {phentsize} is smaller than {struct.calcsize(ph_fmt)}")
    segments = []
    for index in range(phnum):
        offset = phoff + index * phentsize
        fields = _unpack(ph_fmt, data, offset, f"program header {index}", name)
        if is64:
            p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _align = fields
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, _align = fields
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise InputError(f"{name}: ELF segment {index} has file size {p_filesz:#x} larger than "
                             f"its memory size {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise InputError(f"{name}: truncated ELF: segment {index} needs file bytes "
                             f"{p_offset:#x}-{p_offset + p_filesz:#x}, the file has {len(data):#x}")
        segments.append(ElfSegment(index, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags))
    return ElfFile(elf_class, machine, e_type, entry, tuple(segments))


def check_executable(elf: ElfFile, machine: int, name: str = "kernel") -> None:
    """The ELF must be an executable for ``machine`` with something to load."""
    if elf.machine != machine:
        raise InputError(f"{name}: ELF machine is {machine_name(elf.machine)}, expected {machine_name(machine)}")
    if elf.type != ET_EXEC:
        kind = ELF_TYPE_NAMES.get(elf.type, f"type {elf.type}")
        raise InputError(f"{name}: ELF is {kind}, expected an executable (ET_EXEC); "
                         "link the kernel with -static -no-pie at a fixed address")
    if not any(seg.memsz for seg in elf.segments):
        raise InputError(f"{name}: ELF has no loadable (PT_LOAD) segment")
