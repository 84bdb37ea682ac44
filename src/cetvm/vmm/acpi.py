"""Minimal ACPI tables the VMM writes into guest RAM, as Firecracker and cloud-hypervisor
generate theirs (no firmware): an RSDP in the BIOS area, an RSDT, a FADT and a FACS.

Only what cetvm's devices back is described [ACPI 6.4 §5.2]: the FADT (revision 1 layout, 116
bytes) names the PM timer (:mod:`cetvm.vmm.devices.pm_timer`, port 0x608, 4 bytes) and a FACS;
every other block is 0 ("not supported"), no DSDT, no MADT (kvm-unit-tests falls back to its
own defaults without one). Checksums make each table sum to 0 (§5.2.5.3, §5.2.6).

Layout (:data:`ACPI_BASE`, inside the 0xE0000-0xFFFFF area an OS scans for "RSD PTR "): RSDP at
+0, RSDT at +0x40, FADT at +0x80, FACS at +0x100 (64-byte aligned, §5.2.10).
"""

from __future__ import annotations

import struct
from typing import Callable

from cetvm.vmm.devices.pm_timer import PM_TIMER_PORT, PM_TIMER_PORT_COUNT

ACPI_BASE = 0xF_0000
RSDT_OFFSET, FADT_OFFSET, FACS_OFFSET = 0x40, 0x80, 0x100
OEM_ID = b"CETVM "
OEM_TABLE_ID = b"CETVMPC "
FADT_REV1_LENGTH = 116
FACS_LENGTH = 64


def _checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def _header(signature: bytes, length: int, revision: int) -> bytearray:
    """The 36-byte System Description Table header, checksum left 0."""
    return bytearray(struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                                 b"CETV", 1))


def _finish(table: bytearray) -> bytes:
    table[9] = _checksum(table)
    return bytes(table)


def rsdp(rsdt_address: int) -> bytes:
    """ACPI 1.0 RSDP (20 bytes, revision 0)."""
    raw = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, OEM_ID, 0, rsdt_address))
    raw[8] = _checksum(raw)
    return bytes(raw)


def rsdt(entries: list[int]) -> bytes:
    table = _header(b"RSDT", 36 + 4 * len(entries), 1)
    table += struct.pack(f"<{len(entries)}I", *entries)
    return _finish(table)


def fadt(facs_address: int, pm_timer_port: int = PM_TIMER_PORT) -> bytes:
    """FADT revision 1: FIRMWARE_CTRL, PM_TMR_BLK and PM_TMR_LEN; everything else 0."""
    table = _header(b"FACP", FADT_REV1_LENGTH, 1) + bytearray(FADT_REV1_LENGTH - 36)
    struct.pack_into("<I", table, 36, facs_address)
    struct.pack_into("<I", table, 76, pm_timer_port)
    table[91] = PM_TIMER_PORT_COUNT
    return _finish(table)


def facs() -> bytes:
    """FACS (no checksum field): signature, length, hardware signature 0, no waking vector."""
    return struct.pack("<4sII", b"FACS", FACS_LENGTH, 0) + bytes(FACS_LENGTH - 12)


def acpi_tables(base: int = ACPI_BASE) -> dict[int, bytes]:
    """Guest-physical address → bytes of every table."""
    return {
        base: rsdp(base + RSDT_OFFSET),
        base + RSDT_OFFSET: rsdt([base + FADT_OFFSET]),
        base + FADT_OFFSET: fadt(base + FACS_OFFSET),
        base + FACS_OFFSET: facs(),
    }


def write_acpi_tables(put_memory: Callable[[int, bytes], None], base: int = ACPI_BASE) -> None:
    """Write the tables with ``put_memory(address, data)`` (e.g. ``Vm.put_memory``)."""
    for address, data in acpi_tables(base).items():
        put_memory(address, data)
