"""A small AML encoder: the byte encodings of the ACPI Machine Language terms the VMM's DSDT
uses, one function per grammar rule [ACPI 6.4 §20 "ACPI Machine Language (AML) Specification";
the rule names below are the spec's]. Enough to hand-assemble a DSDT without iasl; tests check
the result with ``iasl -d``.
"""

from __future__ import annotations

import re
import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = 0x5C
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
#: PkgLength covers at most 2^28 - 1 bytes (§20.2.4).
MAX_PKG_LENGTH = (1 << 28) - 1

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")


class AmlError(ValueError):
    """A term that cannot be encoded (a bad name, a value out of range)."""


def name_seg(seg: str) -> bytes:
    """NameSeg: a lead character A-Z or _, up to three more of A-Z, 0-9, _, padded with _."""
    if not _NAME_SEG.fullmatch(seg):
        raise AmlError(f"AML name segment {seg!r} must be 1-4 characters of A-Z, 0-9, _ (not a digit first)")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """NameString: an optional root ``\\``, then one or more dot-separated NameSegs."""
    root = path.startswith("\\")
    segs = [name_seg(seg) for seg in (path[1:] if root else path).split(".")]
    prefix = bytes([ROOT_CHAR]) if root else b""
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"AML name {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of ``body_len`` bytes: the encoded length counts itself (§20.2.4)."""
    for extra in range(4):
        total = body_len + 1 + extra
        if (extra == 0 and total < 0x40) or (extra and total < 1 << (4 + 8 * extra)):
            if total > MAX_PKG_LENGTH:
                break
            if extra == 0:
                return bytes([total])
            return bytes([extra << 6 | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"AML package of {body_len} bytes is too long for a PkgLength")


def integer(value: int) -> bytes:
    """ComputationalData for an integer: ZeroOp, OneOp or the narrowest Byte/Word/DWord/QWord
    constant."""
    if not 0 <= value < 1 << 64:
        raise AmlError(f"AML integer {value} is not a 64-bit unsigned value")
    if value in (0, 1):
        return bytes([ZERO_OP if value == 0 else ONE_OP])
    for prefix, fmt in ((BYTE_PREFIX, "<B"), (WORD_PREFIX, "<H"), (DWORD_PREFIX, "<I"), (QWORD_PREFIX, "<Q")):
        if value < 1 << (8 * struct.calcsize(fmt)):
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    """String: ASCII characters 0x01-0x7F, NUL-terminated."""
    data = text.encode("ascii")
    if b"\0" in data:
        raise AmlError("an AML string cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\0"


def name(path: str, data: bytes) -> bytes:
    """DefName := NameOp NameString DataRefObject."""
    return bytes([NAME_OP]) + name_string(path) + data


def package(*elements: bytes) -> bytes:
    """DefPackage := PackageOp PkgLength NumElements PackageElementList."""
    if len(elements) > 255:
        raise AmlError("an AML Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """DefBuffer := BufferOp PkgLength BufferSize ByteList."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope := ScopeOp PkgLength NameString TermList."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice := DeviceOp PkgLength NameString TermList (DeviceOp = 0x5B 0x82)."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def eisa_id(text: str) -> bytes:
    """EisaId("PNPxxxx"): three letters (5 bits each, 'A' = 1) and four hex digits, as the
    32-bit compressed ID (§19.6.35 EISAID macro)."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"EISA ID {text!r} must be three capital letters and four hex digits")
    c1, c2, c3 = (ord(c) - 0x40 for c in text[:3])
    raw = bytes([c1 << 2 | c2 >> 3, (c2 & 7) << 5 | c3, int(text[3:5], 16), int(text[5:7], 16)])
    return integer(int.from_bytes(raw, "little"))


# --- resource descriptors [ACPI 6.4 §6.4 "Resource Data Types for ACPI"] -------------------------
def io_port(base: int, length: int) -> bytes:
    """I/O Port Descriptor (small item 0x08, 16-bit decode): one fixed range."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQ Descriptor without flags (small item 0x04, 2 bytes: edge, active high)."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise AmlError(f"an IRQ descriptor names ISA IRQs 0-15, not {irq}")
        mask |= 1 << irq
    return struct.pack("<BH", 0x22, mask)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(): the descriptors and an End Tag (checksum 0: "treated as correct")."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0x00]))
