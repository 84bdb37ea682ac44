"""Reading ACPI tables back: find the RSDP, check every checksum and length, follow the RSDT and
XSDT to the tables, decode the MADT and the FADT fields the VMM sets [ACPI 6.4 §5.2]. An OS does
the same at boot; the tests use it on the VMM's own tables and on guest memory, and a table that
breaks a rule is an :class:`AcpiError` naming it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from cetvm import InputError
from cetvm.arch.acpi import MadtEntry

RSDP_SIGNATURE = b"RSD PTR "
#: Where an OS scans for the RSDP on a PC (16-byte boundaries) [§5.2.5.1].
RSDP_SCAN_START, RSDP_SCAN_END = 0xE_0000, 0x10_0000
HEADER = struct.Struct("<4sIBB6s8sI4sI")


class AcpiError(InputError):
    """A table that breaks an ACPI rule (checksum, length, signature, pointer)."""


#: Reads ``size`` bytes of guest-physical memory at an address.
ReadMemory = Callable[[int, int], bytes]


def sums_to_zero(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


@dataclass(frozen=True)
class Rsdp:
    address: int
    revision: int
    rsdt_address: int
    xsdt_address: int | None


def parse_rsdp(data: bytes, address: int = 0) -> Rsdp:
    """An RSDP's fields after its checksums (the 20-byte one, and for revision 2 the whole)."""
    if data[:8] != RSDP_SIGNATURE or not sums_to_zero(data[:20]):
        raise AcpiError(f"no valid RSDP at {address:#x}")
    revision, rsdt_address = data[15], struct.unpack_from("<I", data, 16)[0]
    if revision < 2:
        return Rsdp(address, revision, rsdt_address, None)
    length, xsdt_address = struct.unpack_from("<IQ", data, 20)
    if length < 36 or len(data) < length or not sums_to_zero(data[:length]):
        raise AcpiError(f"RSDP at {address:#x}: bad length {length} or extended checksum")
    return Rsdp(address, revision, rsdt_address, xsdt_address)


def find_rsdp(read: ReadMemory) -> Rsdp:
    """Scan 0xE0000-0xFFFFF for the RSDP, as an OS does."""
    area = read(RSDP_SCAN_START, RSDP_SCAN_END - RSDP_SCAN_START)
    for offset in range(0, len(area) - 36, 16):
        if area[offset:offset + 8] == RSDP_SIGNATURE and sums_to_zero(area[offset:offset + 20]):
            return parse_rsdp(area[offset:offset + 36], RSDP_SCAN_START + offset)
    raise AcpiError("no RSDP in 0xE0000-0xFFFFF")


def read_table(read: ReadMemory, address: int, signature: bytes | None = None) -> bytes:
    """The whole table at ``address`` (its header's length), checksum checked."""
    head = read(address, HEADER.size)
    sig, length = head[:4], struct.unpack_from("<I", head, 4)[0]
    if signature is not None and sig != signature:
        raise AcpiError(f"table at {address:#x} is {sig!r}, expected {signature!r}")
    if length < HEADER.size:
        raise AcpiError(f"table {sig!r} at {address:#x} has length {length}, shorter than its header")
    table = read(address, length)
    if not sums_to_zero(table):
        raise AcpiError(f"table {sig!r} at {address:#x}: checksum does not sum to 0")
    return table


def root_entries(table: bytes, width: int) -> list[int]:
    body = table[HEADER.size:]
    if len(body) % width:
        raise AcpiError(f"{table[:4]!r}: length leaves a partial {width}-byte entry")
    return list(struct.unpack(f"<{len(body) // width}{'I' if width == 4 else 'Q'}", body))


def read_tables(read: ReadMemory) -> dict[bytes, bytes]:
    """Signature → table for every table the XSDT (RSDT without one) lists, plus the DSDT and
    FACS the FADT points at. The RSDT and the XSDT must list the same tables."""
    rsdp = find_rsdp(read)
    rsdt = read_table(read, rsdp.rsdt_address, b"RSDT")
    addresses = root_entries(rsdt, 4)
    found = {b"RSDT": rsdt}
    if rsdp.xsdt_address is not None:
        xsdt = read_table(read, rsdp.xsdt_address, b"XSDT")
        if root_entries(xsdt, 8) != addresses:
            raise AcpiError("the RSDT and the XSDT list different tables")
        found[b"XSDT"] = xsdt
    for address in addresses:
        table = read_table(read, address)
        found[table[:4]] = table
    fadt = found.get(b"FACP")
    if fadt is not None:
        facs_address, dsdt_address = struct.unpack_from("<II", fadt, 36)
        if len(fadt) >= 148:
            x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
            if (x_facs and facs_address and x_facs != facs_address) or (x_dsdt and dsdt_address
                                                                         and x_dsdt != dsdt_address):
                raise AcpiError("FADT: the 32-bit and X_ FACS/DSDT addresses differ")
        found[b"DSDT"] = read_table(read, dsdt_address, b"DSDT")
        facs = read(facs_address, 64)
        if facs[:4] != b"FACS" or struct.unpack_from("<I", facs, 4)[0] < 64:
            raise AcpiError(f"no FACS at {facs_address:#x}")
        found[b"FACS"] = facs
    return found


@dataclass(frozen=True)
class MadtInfo:
    lapic_address: int
    flags: int
    apic_ids: list[int]
    ioapics: list[tuple[int, int, int]]            # (id, address, GSI base)
    overrides: dict[int, tuple[int, int]]          # ISA IRQ → (GSI, MPS INTI flags)
    nmis: list[tuple[int, int, int]]               # (processor UID, flags, LINT)


def parse_madt(table: bytes) -> MadtInfo:
    """The MADT's interrupt controller structures; each length must fit the table."""
    lapic_address, flags = struct.unpack_from("<II", table, 36)
    info = MadtInfo(lapic_address, flags, [], [], {}, [])
    offset = 44
    while offset < len(table):
        if offset + 2 > len(table):
            raise AcpiError("MADT: a structure header runs past the table")
        kind, length = table[offset], table[offset + 1]
        if length < 2 or offset + length > len(table):
            raise AcpiError(f"MADT: structure at offset {offset} has length {length}")
        entry = table[offset:offset + length]
        if kind == MadtEntry.LOCAL_APIC and length == 8 and struct.unpack_from("<I", entry, 4)[0] & 1:
            info.apic_ids.append(entry[3])
        elif kind == MadtEntry.LOCAL_X2APIC and length == 16 and struct.unpack_from("<I", entry, 8)[0] & 1:
            info.apic_ids.append(struct.unpack_from("<I", entry, 4)[0])
        elif kind == MadtEntry.IO_APIC and length == 12:
            info.ioapics.append((entry[2], *struct.unpack_from("<II", entry, 4)))
        elif kind == MadtEntry.INTERRUPT_SOURCE_OVERRIDE and length == 10:
            gsi, inti = struct.unpack_from("<IH", entry, 4)
            info.overrides[entry[3]] = (gsi, inti)
        elif kind == MadtEntry.LOCAL_APIC_NMI and length == 6:
            info.nmis.append((entry[2], struct.unpack_from("<H", entry, 3)[0], entry[5]))
        offset += length
    return info


def dsdt_s5(dsdt: bytes) -> int:
    """The SLP_TYP of \\_S5 (its package's first element: ZeroOp, OneOp or a BytePrefix)."""
    at = dsdt.find(b"_S5_")
    if at < 0 or dsdt[at + 4] != 0x12:
        raise AcpiError("DSDT has no Name(_S5, Package ...)")
    pkg = at + 5
    pkg_bytes = (dsdt[pkg] >> 6) + 1
    first = pkg + pkg_bytes + 1  # after PkgLength and NumElements
    op = dsdt[first]
    if op in (0x00, 0x01):
        return op
    if op == 0x0A:
        return dsdt[first + 1]
    raise AcpiError(f"\\_S5's first element has opcode {op:#x}")
