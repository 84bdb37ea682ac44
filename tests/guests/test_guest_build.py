"""Build checks for the guest kernels under guests/ (they are booted by the VMM tests).

`make -C guests` must succeed with only gcc/binutils; every kernel must be an x86-64 ELF64 with a
valid multiboot v1 header using the a.out kludge (so multiboot loaders accept an ELF64 file) and
must carry GNU_PROPERTY_X86_FEATURE_1_AND = IBT|SHSTK.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUESTS = REPO / "guests"
BUILD = GUESTS / "build"

MB_MAGIC = 0x1BADB002
MB_AOUT_KLUDGE = 1 << 16
EM_X86_64 = 62
PT_LOAD = 1
PT_GNU_PROPERTY = 0x6474E553

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("gcc") is None, reason="needs make and gcc"
)


def expected_kernels() -> list[Path]:
    tests = sorted(p.stem for p in (GUESTS / "tests").glob("*.c"))
    return [BUILD / "tests" / f"{t}.elf" for t in tests] + [BUILD / "demo.elf"]


@pytest.fixture(scope="module")
def built() -> list[Path]:
    proc = subprocess.run(
        ["make", "-C", str(GUESTS)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return expected_kernels()


def elf_header(data: bytes) -> dict[str, int]:
    assert data[:4] == b"\x7fELF", "not an ELF file"
    (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _eh, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIQQQIHHH", data, 16
    )
    return {
        "class": data[4], "machine": e_machine, "entry": e_entry,
        "phoff": e_phoff, "phentsize": e_phentsize, "phnum": e_phnum,
    }


def program_headers(data: bytes, hdr: dict[str, int]) -> list[tuple[int, int, int, int, int]]:
    out = []
    for i in range(hdr["phnum"]):
        p_type, _flags, off, vaddr, _paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, hdr["phoff"] + i * hdr["phentsize"]
        )
        out.append((p_type, off, vaddr, filesz, memsz))
    return out


def find_multiboot(data: bytes) -> int:
    for off in range(0, min(len(data), 8192) - 12, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MB_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    raise AssertionError("no multiboot v1 header in the first 8 KiB")


def test_every_kernel_is_built(built: list[Path]) -> None:
    missing = [p.name for p in built if not p.is_file()]
    assert not missing
    assert len(built) >= 9


def test_kernels_are_x86_64_elf64(built: list[Path]) -> None:
    for path in built:
        hdr = elf_header(path.read_bytes())
        assert hdr["class"] == 2, path.name
        assert hdr["machine"] == EM_X86_64, path.name


def test_multiboot_header_with_aout_kludge_maps_the_image(built: list[Path]) -> None:
    for path in built:
        data = path.read_bytes()
        off = find_multiboot(data)
        flags, = struct.unpack_from("<I", data, off + 4)
        assert flags & MB_AOUT_KLUDGE, path.name
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data, off + 12)
        load_offset = off - (header_addr - load_addr)
        assert load_offset >= 0 and load_addr <= header_addr
        assert load_addr < load_end <= bss_end
        assert load_offset + (load_end - load_addr) <= len(data), path.name
        assert load_addr <= entry < load_end, path.name
        # The kludge view and the ELF view must agree: every loaded byte sits at the same address.
        hdr = elf_header(data)
        for p_type, p_off, vaddr, filesz, _memsz in program_headers(data, hdr):
            if p_type == PT_LOAD and filesz:
                assert p_off - load_offset == vaddr - load_addr, path.name
        assert load_addr <= hdr["entry"] < load_end, "ELF64 entry outside the image"
        assert entry != hdr["entry"], "multiboot (32-bit) and ELF64 entries must differ"


def test_kernels_carry_ibt_and_shstk_properties(built: list[Path]) -> None:
    readelf = shutil.which("readelf")
    for path in built:
        data = path.read_bytes()
        types = [ph[0] for ph in program_headers(data, elf_header(data))]
        assert PT_GNU_PROPERTY in types, path.name
        if readelf:
            out = subprocess.run([readelf, "-n", str(path)], capture_output=True, text=True).stdout
            assert "x86 feature: IBT, SHSTK" in out, path.name
