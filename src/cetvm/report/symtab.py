"""ELF .symtab reader and address symbolizer [System V gABI ch. 4 "Sections", "Symbol Table"].

Pure: bytes in, symbols out (report → arch only; the boot loader keeps its own header reader).

Decisions (what a symbol is, for naming code addresses):
- Symbols come from the SHT_SYMTAB section (a stripped file has none: every address stays hex).
- Kept: STT_NOTYPE, STT_OBJECT, STT_FUNC with a real section index (not SHN_UNDEF, not
  SHN_ABS or other reserved indices >= 0xff00) and a non-empty name not starting with ".L"
  (assembler-local labels). Sections and file symbols are dropped.
- At one address, the preferred name is a FUNC, then an OBJECT, then a NOTYPE label; among
  equals a sized one, then one whose name does not start with "__" (linker-defined markers such
  as ``__utext_start`` share an address with the first function), then a GLOBAL one, then the
  first in the table.
- ``symbolize(addr)`` uses the preferred symbol with the highest address <= addr; if that symbol
  has a size and ``addr`` lies past its end (padding, data after code) the address is unnamed;
  an unsized label reaches up to the next symbol, and the last one (an end marker such as
  ``__kernel_end``) names only its own address.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from pathlib import Path

from cetvm import InputError
from cetvm.files import read_input

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
SHT_SYMTAB = 2
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2
STB_GLOBAL = 1

#: Preference of a symbol type when several share an address (higher wins).
_TYPE_RANK = {STT_FUNC: 2, STT_OBJECT: 1, STT_NOTYPE: 0}


@dataclass(frozen=True)
class Symbol:
    """One Elf32_Sym / Elf64_Sym kept for symbolization."""

    name: str
    value: int
    size: int
    type: int
    bind: int

    def contains(self, addr: int) -> bool:
        return self.size == 0 or self.value <= addr < self.value + self.size

    def rank(self) -> tuple[int, int, int, int]:
        return (_TYPE_RANK.get(self.type, -1), 1 if self.size else 0, 0 if self.name.startswith("__") else 1,
                1 if self.bind == STB_GLOBAL else 0)


@dataclass(frozen=True)
class _Layout:
    """Offsets of the ELF header fields and structure formats for one class."""

    shoff: str
    shoff_at: int
    shentsize_at: int
    section: str
    symbol: str


_LAYOUT = {
    ELFCLASS64: _Layout("<Q", 0x28, 0x3A, "<IIQQQQIIQQ", "<IBBHQQ"),
    ELFCLASS32: _Layout("<I", 0x20, 0x2E, "<IIIIIIIIII", "<IIIBBH"),
}


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise InputError(f"ELF {what} at offset {offset:#x} runs past the end of the file ({len(data):#x} bytes)")
    return struct.unpack_from(fmt, data, offset)


def _c_string(table: bytes, offset: int) -> str:
    if not 0 <= offset < len(table):
        return ""
    end = table.find(b"\0", offset)
    return table[offset: end if end >= 0 else len(table)].decode("utf-8", errors="replace")


def read_symbols(data: bytes) -> list[Symbol]:
    """The code/data symbols of an ELF32 or ELF64 little-endian file (module docstring);
    InputError for a file that is not ELF or whose section headers or symbol table are truncated."""
    if data[:4] != ELF_MAGIC or len(data) < 0x34:
        raise InputError("not an ELF file (no \\x7fELF header)")
    if data[4] not in _LAYOUT:
        raise InputError(f"ELF class {data[4]} is neither ELFCLASS32 nor ELFCLASS64")
    if data[5] != ELFDATA2LSB:
        raise InputError("big-endian ELF files are not supported (x86 is little-endian)")
    lay = _LAYOUT[data[4]]
    (shoff,) = _unpack(lay.shoff, data, lay.shoff_at, "e_shoff")
    shentsize, shnum = _unpack("<HH", data, lay.shentsize_at, "e_shentsize")
    if shoff == 0 or shnum == 0:
        return []
    if shentsize < struct.calcsize(lay.section):
        raise InputError(f"ELF e_shentsize {shentsize} is smaller than a section header")
    sections = [_unpack(lay.section, data, shoff + i * shentsize, f"section header {i}") for i in range(shnum)]
    for sh in sections:
        if sh[1] == SHT_SYMTAB:
            return _symbols_of(data, lay, sh, sections)
    return []


def _section_bytes(data: bytes, header: tuple, what: str) -> bytes:
    offset, size = header[4], header[5]
    if offset + size > len(data):
        raise InputError(f"ELF {what} ({offset:#x}+{size:#x}) runs past the end of the file")
    return data[offset: offset + size]


def _symbols_of(data: bytes, lay: _Layout, symtab: tuple, sections: list[tuple]) -> list[Symbol]:
    link = symtab[6]
    if not 0 <= link < len(sections):
        raise InputError(f"ELF .symtab sh_link {link} names no section")
    strings = _section_bytes(data, sections[link], ".strtab")
    table = _section_bytes(data, symtab, ".symtab")
    entsize = struct.calcsize(lay.symbol)
    out: list[Symbol] = []
    for off in range(entsize, len(table) - entsize + 1, entsize):  # entry 0 is the null symbol
        fields = struct.unpack_from(lay.symbol, table, off)
        if lay is _LAYOUT[ELFCLASS64]:
            name_off, info, _other, shndx, value, size = fields
        else:
            name_off, value, size, info, _other, shndx = fields
        kind, bind = info & 0xF, info >> 4
        name = _c_string(strings, name_off)
        if kind not in _TYPE_RANK or shndx == SHN_UNDEF or shndx >= SHN_LORESERVE:
            continue
        if not name or name.startswith(".L"):
            continue
        out.append(Symbol(name, value, size, kind, bind))
    return out


#: Largest ELF file read for its symbols (a kernel with debug info is well below this).
MAX_SYMBOL_FILE_BYTES = 1 << 30


#: System.map type letters of code (t/T) and data (d/D, b/B, r/R) symbols; others are dropped.
_MAP_TYPES = {"t": STT_FUNC, "d": STT_OBJECT, "b": STT_OBJECT, "r": STT_OBJECT}


def read_system_map(data: bytes) -> list[Symbol]:
    """Symbols of ``nm``-format text (System.map, /proc/kallsyms): unsized, so each reaches up to
    the next one (module docstring). A line that is not ``hex-address type name`` is an error
    naming the line."""
    symbols = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) < 3 or len(fields[1]) != 1:
                raise ValueError
            value = int(fields[0], 16)
        except ValueError:
            raise InputError(f"line {number} is not 'address type name' (neither ELF nor System.map): "
                             f"{line[:60]!r}") from None
        kind = _MAP_TYPES.get(fields[1].lower())
        if kind is not None:
            bind = STB_GLOBAL if fields[1].isupper() else 0
            symbols.append(Symbol(fields[2], value, 0, kind, bind))
    return symbols


class Symbolizer:
    """Address → ``name+0xoff`` from a symbol list (see the module docstring for the rules)."""

    def __init__(self, symbols: list[Symbol]) -> None:
        best: dict[int, Symbol] = {}
        for sym in symbols:
            held = best.get(sym.value)
            if held is None or sym.rank() > held.rank():
                best[sym.value] = sym
        self._addrs = sorted(best)
        self._symbols = [best[a] for a in self._addrs]

    @classmethod
    def from_elf(cls, path: str | Path) -> "Symbolizer":
        """The symbolizer of an ELF file's .symtab (InputError if it cannot be read)."""
        data = read_input(path, f"'{path}'", MAX_SYMBOL_FILE_BYTES)
        try:
            return cls(read_symbols(data))
        except InputError as err:
            raise InputError(f"'{path}': {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Symbolizer":
        """An ELF file's .symtab, or a System.map (``nm`` output: ``address type name`` lines,
        the format ``/proc/kallsyms`` and a kernel build's System.map use)."""
        data = read_input(path, f"'{path}'", MAX_SYMBOL_FILE_BYTES)
        try:
            return cls(read_symbols(data) if data[:4] == ELF_MAGIC else read_system_map(data))
        except InputError as err:
            raise InputError(f"'{path}': {err}") from None

    @classmethod
    def merged(cls, parts: "list[Symbolizer]") -> "Symbolizer":
        """One symbolizer over several files' symbols (a kernel and the user programs it runs)."""
        return cls([sym for part in parts for sym in part._symbols])

    def __len__(self) -> int:
        return len(self._symbols)

    def lookup(self, addr: int) -> tuple[Symbol, int] | None:
        """(symbol, offset) naming ``addr``, or None."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        sym = self._symbols[i]
        if not sym.contains(addr):
            return None
        if sym.size == 0 and i == len(self._symbols) - 1 and addr != sym.value:
            return None
        return sym, addr - sym.value

    def name_of(self, addr: int) -> str | None:
        """``func`` or ``func+0x1c``, None when no symbol names ``addr``."""
        found = self.lookup(addr)
        if found is None:
            return None
        sym, off = found
        return sym.name if off == 0 else f"{sym.name}+{off:#x}"

    def symbolize(self, addr: int) -> str:
        """``func+0x1c`` (``func`` at offset 0), or the hex address when unnamed."""
        return self.name_of(addr) or f"{addr:#x}"
