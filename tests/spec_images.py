"""Kernel images and guest machine code hand-built from the specifications, independent of
cetvm's own loader and decoder [System V gABI ch. 4-5; Multiboot 0.6.96 §3.1; SDM Vol. 2].

One copy for the loader, boot and command-line tests (each used to build its own ELF).
"""

from __future__ import annotations

import struct

KERNEL_BASE = 0x100000
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
MB_MAGIC = 0x1BADB002


# --- multiboot v1 header ------------------------------------------------------------------
def mb_header(flags: int, kludge: tuple[int, int, int, int, int] | None = None,
              checksum: int | None = None) -> bytes:
    """magic, flags, checksum (by default the one that sums to 0), then the a.out-kludge fields."""
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    head = struct.pack("<III", MB_MAGIC, flags, checksum)
    if kludge is not None:
        head += struct.pack("<5I", *kludge)
    return head


multiboot_header = mb_header


# --- ELF ------------------------------------------------------------------------------------
def elf(bits: int, machine: int, entry: int, segments: list[tuple[int, int, bytes, int]],
        etype: int = 2, extra: bytes = b"", extra_offset: int | None = None) -> bytes:
    """An ELF32/ELF64 file with one RWX PT_LOAD per ``(paddr, vaddr, data, memsz)`` segment, data
    at 0x1000-aligned file offsets from 0x1000. ``extra`` is put at ``extra_offset`` in the file
    (by default right after the program headers), e.g. a multiboot header."""
    is64 = bits == 64
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    phoff = ehsize
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    layout = "<HHIQQQIHHHHHH" if is64 else "<HHIIIIIHHHHHH"
    header = ident + struct.pack(layout, etype, machine, 1, entry, phoff, 0, 0, ehsize, phentsize,
                                 len(segments), 0, 0, 0)
    body = bytearray(header)
    offset = 0x1000
    blobs = []
    for paddr, vaddr, data, memsz in segments:
        if is64:
            body += struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(data), memsz, 0x1000)
        else:
            body += struct.pack("<IIIIIIII", 1, offset, vaddr, paddr, len(data), memsz, 7, 0x1000)
        blobs.append((offset, data))
        offset += (len(data) + 0xFFF) & ~0xFFF or 0x1000
    total = max([o + len(d) for o, d in blobs] + [len(body)])
    image = bytearray(total)
    image[: len(body)] = body
    for o, d in blobs:
        image[o : o + len(d)] = d
    if extra:
        where = extra_offset if extra_offset is not None else len(body)
        image[where : where + len(extra)] = extra
    return bytes(image)


def one_segment_elf(bits: int, machine: int, code: bytes, base: int = KERNEL_BASE,
                    memsz: int | None = None, etype: int = 2, prefix: bytes = b"") -> bytes:
    """An ELF with one RWX PT_LOAD of ``prefix + code`` at ``base`` (file offset 0x1000), entry at
    ``base + len(prefix)``. ``memsz`` defaults to the file size (no bss)."""
    body = prefix + code
    memsz = len(body) if memsz is None else memsz
    return elf(bits, machine, base + len(prefix), [(base, base, body, memsz)], etype=etype)


def elf64_kernel(code: bytes, base: int = KERNEL_BASE, **kw) -> bytes:
    """An x86-64 ET_EXEC of ``code`` at ``base``, entry at ``base`` (no multiboot header, so
    cetvm's ELF64 protocol boots it: 64-bit mode, identity-mapped low 4 GiB)."""
    return one_segment_elf(64, EM_X86_64, code, base=base, **kw)


# --- guest code (64-bit) ----------------------------------------------------------------------
JMP_SELF = b"\xEB\xFE"         # jmp $
UD2 = b"\x0F\x0B"
RET = b"\xC3"
CLI_HLT = b"\xFA\xF4"          # cli; hlt


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
    """isa-debug-exit: mov al, code; out 0xF4, al."""
    return out_imm8(0xF4, code)


def jump_to(addr: int) -> bytes:
    """mov rax, imm64; jmp rax."""
    return b"\x48\xB8" + struct.pack("<Q", addr) + b"\xFF\xE0"
