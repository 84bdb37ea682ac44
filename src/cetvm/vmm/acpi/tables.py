"""The ACPI tables the VMM generates, as Firecracker and cloud-hypervisor generate theirs (no
firmware) [ACPI 6.4 §5.2]. Every table is a pure function of the machine's facts; checksums
make each table sum to 0 (§5.2.5.3, §5.2.6).

=========  ===================================================================================
table      content
=========  ===================================================================================
RSDP       revision 2 (36 bytes): the RSDT and the XSDT (§5.2.5.3)
RSDT/XSDT  FADT, MADT (32- and 64-bit pointers: old and new OSes find the same tables)
FADT       revision 6.4 (276 bytes, §5.2.9): FACS and DSDT (32-bit and X_ fields), SCI_INT 9,
           SMI_CMD 0 (no legacy mode: ACPI is enabled, PM1_CNT.SCI_EN reads 1), PM1a event
           block 0x600 (4 bytes) and control block 0x604 (2), PM timer 0x608 (4, 24-bit), each
           also as an X_ Generic Address; no GPE blocks; C2/C3 not supported (latencies above
           100/1000 µs); century at CMOS 0x32; IA-PC boot flags: legacy devices, no 8042, no
           VGA; flags WBINVD, PROC_C1, SLP_BUTTON (no fixed sleep button; the fixed power
           button exists: :mod:`cetvm.vmm.devices.acpi_pm`); hypervisor vendor "CETVM".
FACS       64 bytes, version 2, no waking vector (no sleep states)
DSDT       :func:`cetvm.vmm.acpi.dsdt.dsdt_aml`: \\_S5 and COM1
MADT       local APIC address 0xFEE00000, PCAT_COMPAT; one Processor Local APIC (x2APIC for IDs
           above 254) per vCPU; the I/O APIC (its ID, 0xFEC00000, GSI base 0); interrupt source
           overrides ISA IRQ 0 → GSI 2 (bus default flags) and IRQ 9 (the SCI) → GSI 9 level,
           active high; LINT1 of every processor is NMI (§5.2.12)
=========  ===================================================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cetvm.arch.acpi import (
    LAPIC_ENABLED,
    MADT_PCAT_COMPAT,
    AccessSize,
    AddressSpace,
    FadtFlags,
    IapcBootArch,
    MadtEntry,
    MpsIntiFlags,
)

OEM_ID = b"CETVM "
OEM_TABLE_ID = b"CETVMPC "
OEM_REVISION = 1
CREATOR_ID = b"CETV"
CREATOR_REVISION = 1
HEADER_LENGTH = 36
RSDP_V2_LENGTH = 36
FADT_LENGTH = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 4
FACS_LENGTH = 64
FACS_VERSION = 2
MADT_REVISION = 5
DSDT_REVISION = 2  # 64-bit AML integers
#: FADT SCI_INT when nothing else is said, and the CMOS index of the century.
CMOS_CENTURY = 0x32
#: FADT P_LVL2_LAT / P_LVL3_LAT values meaning "not supported" (> 100 and > 1000 µs).
C2_NOT_SUPPORTED = 101
C3_NOT_SUPPORTED = 1001
HYPERVISOR_VENDOR = b"CETVM\0\0\0"
#: Local APIC NMI "all processors" UID and the LINT input NMI arrives on.
ALL_PROCESSORS = 0xFF
NMI_LINT = 1
X2APIC_ONLY_ID = 0xFF


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def header(signature: bytes, length: int, revision: int) -> bytearray:
    """The 36-byte System Description Table header (§5.2.6), checksum left 0."""
    return bytearray(struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                                 OEM_REVISION, CREATOR_ID, CREATOR_REVISION))


def finish(table: bytearray) -> bytes:
    """Fill in the length and checksum of a table built on :func:`header`."""
    struct.pack_into("<I", table, 4, len(table))
    table[9] = 0
    table[9] = checksum(table)
    return bytes(table)


def gas(space: AddressSpace, address: int, bit_width: int, access: AccessSize = AccessSize.UNDEFINED) -> bytes:
    """Generic Address Structure (§5.2.3.2), 12 bytes; address 0 = not present."""
    if not address:
        return bytes(12)
    return struct.pack("<BBBBQ", space, bit_width, 0, access, address)


def rsdp(rsdt_address: int, xsdt_address: int) -> bytes:
    """RSDP revision 2: the ACPI 1.0 checksum over 20 bytes, the extended one over 36."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt_address, RSDP_V2_LENGTH,
                                xsdt_address, 0, bytes(3)))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def rsdt(entries: list[int]) -> bytes:
    return finish(header(b"RSDT", 0, 1) + struct.pack(f"<{len(entries)}I", *entries))


def xsdt(entries: list[int]) -> bytes:
    return finish(header(b"XSDT", 0, 1) + struct.pack(f"<{len(entries)}Q", *entries))


@dataclass(frozen=True)
class PmPorts:
    """The fixed-hardware I/O blocks the FADT names."""

    sci_irq: int
    pm1a_evt: int
    pm1_evt_len: int
    pm1a_cnt: int
    pm1_cnt_len: int
    pm_tmr: int
    pm_tmr_len: int


def fadt(facs_address: int, dsdt_address: int, pm: PmPorts) -> bytes:
    """FADT revision 6.4 (see the module table)."""
    table = header(b"FACP", 0, FADT_REVISION) + bytearray(FADT_LENGTH - HEADER_LENGTH)
    struct.pack_into("<II", table, 36, facs_address, dsdt_address)
    struct.pack_into("<H", table, 46, pm.sci_irq)  # 44 reserved, 45 preferred PM profile 0
    # SMI_CMD (48), ACPI_ENABLE/DISABLE, S4BIOS_REQ, PSTATE_CNT: 0 — no legacy mode.
    struct.pack_into("<IIIIIIII", table, 56, pm.pm1a_evt, 0, pm.pm1a_cnt, 0, 0, pm.pm_tmr, 0, 0)
    struct.pack_into("<BBBBBBBB", table, 88, pm.pm1_evt_len, pm.pm1_cnt_len, 0, pm.pm_tmr_len, 0, 0, 0, 0)
    struct.pack_into("<HH", table, 96, C2_NOT_SUPPORTED, C3_NOT_SUPPORTED)
    table[108] = CMOS_CENTURY
    struct.pack_into("<H", table, 109, IapcBootArch.LEGACY_DEVICES | IapcBootArch.VGA_NOT_PRESENT)
    struct.pack_into("<I", table, 112, FadtFlags.WBINVD | FadtFlags.PROC_C1 | FadtFlags.SLP_BUTTON)
    table[131] = FADT_MINOR_REVISION
    struct.pack_into("<QQ", table, 132, facs_address, dsdt_address)
    io = AddressSpace.SYSTEM_IO
    table[148:160] = gas(io, pm.pm1a_evt, 8 * pm.pm1_evt_len)
    table[172:184] = gas(io, pm.pm1a_cnt, 8 * pm.pm1_cnt_len)
    table[208:220] = gas(io, pm.pm_tmr, 8 * pm.pm_tmr_len)
    table[268:276] = HYPERVISOR_VENDOR
    return finish(table)


def facs() -> bytes:
    """FACS (§5.2.10, no checksum): signature, length, hardware signature 0, no waking vector,
    version 2."""
    table = bytearray(FACS_LENGTH)
    struct.pack_into("<4sI", table, 0, b"FACS", FACS_LENGTH)
    table[32] = FACS_VERSION
    return bytes(table)


def dsdt(aml: bytes) -> bytes:
    return finish(header(b"DSDT", 0, DSDT_REVISION) + aml)


@dataclass(frozen=True)
class Madt:
    """What the MADT describes: the vCPUs' APIC IDs, the I/O APIC, the SCI's IRQ."""

    apic_ids: tuple[int, ...]
    lapic_address: int
    ioapic_id: int
    ioapic_address: int
    sci_irq: int
    timer_gsi: int


def madt(m: Madt) -> bytes:
    """MADT revision 5 (see the module table)."""
    table = header(b"APIC", 0, MADT_REVISION) + struct.pack("<II", m.lapic_address, MADT_PCAT_COMPAT)
    for uid, apic_id in enumerate(m.apic_ids):
        if apic_id < X2APIC_ONLY_ID:
            table += struct.pack("<BBBBI", MadtEntry.LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED)
        else:
            table += struct.pack("<BBHIII", MadtEntry.LOCAL_X2APIC, 16, 0, apic_id, LAPIC_ENABLED, uid)
    table += struct.pack("<BBBBII", MadtEntry.IO_APIC, 12, m.ioapic_id, 0, m.ioapic_address, 0)
    table += struct.pack("<BBBBIH", MadtEntry.INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0, m.timer_gsi, 0)
    table += struct.pack("<BBBBIH", MadtEntry.INTERRUPT_SOURCE_OVERRIDE, 10, 0, m.sci_irq, m.sci_irq,
                         MpsIntiFlags.ACTIVE_HIGH | MpsIntiFlags.LEVEL)
    table += struct.pack("<BBBHB", MadtEntry.LOCAL_APIC_NMI, 6, ALL_PROCESSORS,
                         MpsIntiFlags.ACTIVE_HIGH | MpsIntiFlags.EDGE, NMI_LINT)
    return finish(table)
