"""Helpers for the command-line tests: run `cetvm` in this process, check the one-line error
contract, and hand-build tiny kernels from the ELF and multiboot specifications (independent of
cetvm's own loader)."""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from cetvm.cli.main import main

REPO = Path(__file__).resolve().parents[2]
GUESTS = REPO / "guests"
GUEST_TESTS = GUESTS / "build" / "tests"


@dataclass
class CliRun:
    status: int
    out: str
    err: str


def cetvm(capsys, *argv: str) -> CliRun:
    """`cetvm ARGV...` in this process; stdout/stderr captured."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return CliRun(status, captured.out, captured.err)


def assert_one_line_error(run: CliRun, status: int = 2, *fragments: str) -> str:
    """The contract for bad input: exit ``status``, stderr exactly one line starting with
    ``cetvm: error:`` (or ``cetvm:`` for a failed run), no traceback, no cetvm bug report, and
    every fragment present (case-insensitive). Returns the line."""
    assert "Traceback" not in run.err + run.out
    lines = run.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {run.err!r}"
    line = lines[0]
    assert line.startswith("cetvm:"), line
    assert "a bug in cetvm" not in line, line
    assert run.status == status, (run.status, line)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), (fragment, line)
    return line


def guest(name: str) -> Path:
    """guests/build/tests/<name>.elf, built with make when missing (skip without a toolchain)."""
    path = GUEST_TESTS / f"{name}.elf"
    if not path.exists():
        try:
            subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot build the guests: {getattr(exc, 'stderr', exc)}")
    return path


# --- images built from the specs [System V gABI ch. 4-5; Multiboot 0.6.96 §3.1] ---------------
KERNEL_BASE = 0x100000
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
MB_MAGIC = 0x1BADB002


def elf(bits: int, machine: int, code: bytes, base: int = KERNEL_BASE, memsz: int | None = None,
        etype: int = 2, prefix: bytes = b"") -> bytes:
    """An ELF with one RWX PT_LOAD of ``prefix + code`` at ``base`` (file offset 0x1000), entry at
    ``base + len(prefix)``. ``memsz`` defaults to the file size (no bss)."""
    body = prefix + code
    memsz = len(body) if memsz is None else memsz
    entry = base + len(prefix)
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    if bits == 64:
        header = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
        phdr = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, base, base, len(body), memsz, 0x1000)
    else:
        header = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, 52, 0, 0, 52, 32, 1, 0, 0, 0)
        phdr = struct.pack("<IIIIIIII", 1, 0x1000, base, base, len(body), memsz, 7, 0x1000)
    image = bytearray(0x1000 + len(body))
    image[: len(header) + len(phdr)] = header + phdr
    image[0x1000:] = body
    return bytes(image)


def elf64_kernel(code: bytes, **kw) -> bytes:
    return elf(64, EM_X86_64, code, **kw)


def multiboot_header(flags: int, checksum: int | None = None) -> bytes:
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", MB_MAGIC, flags, checksum)


# --- guest code (64-bit) -----------------------------------------------------------------------
JMP_SELF = b"\xEB\xFE"                      # jmp $
UD2 = b"\x0F\x0B"
RET = b"\xC3"


def jump_to(addr: int) -> bytes:
    """mov rax, imm64; jmp rax."""
    return b"\x48\xB8" + struct.pack("<Q", addr) + b"\xFF\xE0"


def debug_exit(code: int) -> bytes:
    """mov al, code; out 0xF4, al (isa-debug-exit)."""
    return bytes([0xB0, code, 0xE6, 0xF4])
