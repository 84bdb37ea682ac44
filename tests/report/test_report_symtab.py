"""The .symtab reader and Symbolizer on hand-built ELF64 and ELF32 files."""

from __future__ import annotations

import struct

import pytest

from cetvm import InputError
from cetvm.report import Symbolizer, read_symbols

STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION = 0, 1, 2, 3
LOCAL, GLOBAL = 0, 1


def build_elf(symbols: list[tuple[str, int, int, int, int, int]], bits: int = 64) -> bytes:
    """An ELF with sections [null, .text, .symtab, .strtab]; symbols: (name, value, size, type,
    bind, shndx)."""
    strtab = b"\0"
    names = []
    for name, *_ in symbols:
        names.append(len(strtab))
        strtab += name.encode() + b"\0"
    entries = []
    for off, (_, value, size, typ, bind, shndx) in zip(names, symbols):
        info = bind << 4 | typ
        if bits == 64:
            entries.append(struct.pack("<IBBHQQ", off, info, 0, shndx, value, size))
        else:
            entries.append(struct.pack("<IIIBBH", off, value, size, info, 0, shndx))
    symsize = 24 if bits == 64 else 16
    symtab = b"\0" * symsize + b"".join(entries)
    ehsize = 64 if bits == 64 else 52
    sym_off = ehsize
    str_off = sym_off + len(symtab)
    sh_off = str_off + len(strtab)
    sh_off += (-sh_off) % 8

    def sh(name, typ, offset, size, link, entsize):
        if bits == 64:
            return struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, offset, size, link, 0, 8, entsize)
        return struct.pack("<IIIIIIIIII", name, typ, 0, 0, offset, size, link, 0, 4, entsize)

    headers = (sh(0, 0, 0, 0, 0, 0) + sh(0, 1, 0, 0, 0, 0) + sh(0, 2, sym_off, len(symtab), 3, symsize)
               + sh(0, 3, str_off, len(strtab), 0, 0))
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + b"\0" * 9
    if bits == 64:
        header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, sh_off, 0, 64, 56, 0, 64, 4, 0)
    else:
        header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0, 0, sh_off, 0, 52, 32, 0, 40, 4, 0)
    body = header + symtab + strtab
    return body + b"\0" * (sh_off - len(body)) + headers


SYMS = [
    ("main_user", 0x401000, 0x20, STT_FUNC, GLOBAL, 1),
    ("__text_start", 0x401000, 0, STT_NOTYPE, GLOBAL, 1),
    ("win", 0x401040, 0x10, STT_FUNC, LOCAL, 1),
    ("label", 0x401080, 0, STT_NOTYPE, LOCAL, 1),
    ("table", 0x402000, 0x8, STT_OBJECT, GLOBAL, 1),
    (".text", 0x401000, 0, STT_SECTION, LOCAL, 1),
    ("absolute", 0x100, 0, STT_NOTYPE, LOCAL, 0xFFF1),
    ("undefined", 0x0, 0, STT_FUNC, GLOBAL, 0),
    (".Llocal", 0x401050, 0, STT_NOTYPE, LOCAL, 1),
    ("end_marker", 0x403000, 0, STT_NOTYPE, GLOBAL, 1),
]


@pytest.mark.parametrize("bits", [64, 32])
def test_symbolize_names_function_offsets(bits):
    sym = Symbolizer(read_symbols(build_elf(SYMS, bits)))
    assert sym.symbolize(0x401000) == "main_user"          # FUNC preferred over a NOTYPE marker
    assert sym.symbolize(0x40101C) == "main_user+0x1c"
    assert sym.symbolize(0x401048) == "win+0x8"             # .Llocal is not a symbol
    assert sym.symbolize(0x401030) == "0x401030"            # past main_user's size: unnamed
    assert sym.symbolize(0x401090) == "label+0x10"          # unsized label reaches the next symbol
    assert sym.symbolize(0x402004) == "table+0x4"
    assert sym.symbolize(0x403000) == "end_marker"
    assert sym.symbolize(0x403008) == "0x403008"            # last unsized label: only itself
    assert sym.symbolize(0x100) == "0x100"                  # SHN_ABS dropped
    assert sym.symbolize(0x400FFF) == "0x400fff"


def test_section_and_undefined_symbols_are_not_kept():
    names = {s.name for s in read_symbols(build_elf(SYMS))}
    assert names == {"main_user", "__text_start", "win", "label", "table", "end_marker"}


def test_file_without_sections_has_no_symbols():
    data = build_elf([])[:64]
    data = data[:0x28] + b"\0" * 8 + data[0x30:]  # e_shoff = 0
    assert Symbolizer(read_symbols(data)).symbolize(0x1234) == "0x1234"


@pytest.mark.parametrize("data, message", [
    (b"MZ" + b"\0" * 100, "not an ELF file"),
    (b"\x7fELF\x03\x01" + b"\0" * 100, "ELF class 3"),
])
def test_bad_files_are_input_errors(data, message):
    with pytest.raises(InputError, match=message):
        read_symbols(data)


def test_truncated_section_headers_are_input_errors():
    data = build_elf(SYMS)
    with pytest.raises(InputError, match="section header"):
        read_symbols(data[:-10])


def test_from_elf_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.elf"):
        Symbolizer.from_elf(tmp_path / "nope.elf")
