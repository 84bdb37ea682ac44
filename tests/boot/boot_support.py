"""Helpers for the boot acceptance tests: find (or build) the guest kernels, run `cetvm boot`,
read TAP output, and hand-build tiny ELF64 kernels from machine code."""

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
DEMO_ELF = GUESTS / "build" / "demo.elf"
#: Every boot test is capped: the TAP kernels need about 0.3 M instructions.
MAX_INSTRUCTIONS = "5000000"


def guest(name: str) -> Path:
    """guests/build/tests/<name>.elf, built with make when missing (skip without a toolchain)."""
    path = GUEST_TESTS / f"{name}.elf"
    if not path.exists():
        try:
            subprocess.run(["make", "-s", "-C", str(GUESTS)], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot build the guests: {getattr(exc, 'stderr', exc)}")
    return path


@dataclass
class BootRun:
    status: int
    out: str
    err: str

    @property
    def tap(self) -> "Tap":
        return Tap.parse(self.out)


def boot(capsys, *args: str) -> BootRun:
    """`cetvm boot ARGS...` in this process; stdout/stderr captured."""
    status = main(["boot", *args])
    captured = capsys.readouterr()
    return BootRun(status, captured.out, captured.err)


@dataclass
class Tap:
    plan: int | None
    results: list[tuple[bool, int, str]]  # (ok, number, description incl. directive)

    @classmethod
    def parse(cls, text: str) -> "Tap":
        plan, results = None, []
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("1.."):
                plan = int(line[3:])
            elif line.startswith("ok ") or line.startswith("not ok "):
                ok = line.startswith("ok ")
                rest = line[3:] if ok else line[7:]
                number, _, desc = rest.partition(" - ")
                results.append((ok, int(number), desc))
        return cls(plan, results)

    def failures(self) -> list[str]:
        return [desc for ok, _n, desc in self.results if not ok]

    def skipped(self) -> list[str]:
        return [desc for ok, _n, desc in self.results if ok and "# SKIP" in desc]

    def passed(self, name_part: str) -> bool:
        """The test whose description contains ``name_part`` passed without SKIP."""
        matches = [(ok, desc) for ok, _n, desc in self.results if name_part in desc]
        assert matches, f"no TAP line mentions {name_part!r}"
        return all(ok and "# SKIP" not in desc for ok, desc in matches)

    def assert_complete_and_green(self) -> None:
        assert self.plan is not None, "no TAP plan line"
        assert [n for _ok, n, _d in self.results] == list(range(1, self.plan + 1)), "TAP results do not match the plan"
        assert not self.failures(), f"failing TAP lines: {self.failures()}"


# --- tiny ELF64 kernels (cetvm's ELF64 entry: 64-bit mode, identity-mapped low 4 GiB) ---------
KERNEL_BASE = 0x100000


def elf64_kernel(code: bytes, base: int = KERNEL_BASE) -> bytes:
    """An ET_EXEC x86-64 ELF with one RWX PT_LOAD of ``code`` at ``base`` and entry at ``base``
    (no multiboot header, so cetvm's ELF64 protocol boots it)."""
    ehsize, phentsize = 64, 56
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, base, ehsize, 0, 0, ehsize, phentsize, 1, 0, 0, 0)
    offset = 0x1000
    phdr = struct.pack("<IIQQQQQQ", 1, 7, offset, base, base, len(code), len(code), 0x1000)
    image = bytearray(offset + len(code))
    image[: len(header) + len(phdr)] = header + phdr
    image[offset:] = code
    return bytes(image)


def out_imm8(port: int, value: int) -> bytes:
    """mov al, value; out port, al."""
    return bytes([0xB0, value, 0xE6, port])


def outw_dx(port: int, value: int) -> bytes:
    """mov dx, port; mov ax, value; out dx, ax."""
    return b"\x66\xBA" + struct.pack("<H", port) + b"\x66\xB8" + struct.pack("<H", value) + b"\x66\xEF"


def serial_text(text: str) -> bytes:
    """For each byte: mov dx, 0x3F8; mov al, byte; out dx, al (COM1 THR)."""
    return b"".join(b"\x66\xBA\xF8\x03" + bytes([0xB0, b, 0xEE]) for b in text.encode())


def debug_exit(code: int) -> bytes:
    """isa-debug-exit: out 0xF4, code."""
    return out_imm8(0xF4, code)


CLI_HLT = b"\xFA\xF4"          # cli; hlt
JMP_SELF = b"\xEB\xFE"         # jmp $
UD2 = b"\x0F\x0B"
