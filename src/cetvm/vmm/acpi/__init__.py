"""ACPI tables the VMM writes into guest RAM (no firmware): :mod:`.tables` builds each table,
:mod:`.dsdt` with :mod:`.aml` the DSDT, :mod:`.parse` reads them back (checksums, lengths,
pointers) for tests and tools.

Layout (:data:`ACPI_BASE`, inside the BIOS area 0xF0000-0xFFFFF, which the E820 map reserves and
an OS scans for "RSD PTR " on 16-byte boundaries): the RSDP first, then RSDT, XSDT, FADT, FACS
(64-byte aligned, §5.2.10), MADT and DSDT, each 16-byte aligned.
"""

from __future__ import annotations

from typing import Callable

from cetvm.arch.apic import APIC_DEFAULT_PHYS_BASE
from cetvm.arch.ioapic import IOAPIC_DEFAULT_BASE
from cetvm.vmm.acpi import tables
from cetvm.vmm.acpi.dsdt import dsdt_aml
from cetvm.vmm.devices.acpi_pm import PM1_CNT_BLK, PM1_CNT_LEN, PM1_EVT_BLK, PM1_EVT_LEN, SCI_IRQ, SLP_TYP_S5
from cetvm.vmm.devices.irq_lines import ISA_IRQ0_GSI
from cetvm.vmm.devices.pm_timer import PM_TIMER_PORT, PM_TIMER_PORT_COUNT
from cetvm.vmm.devices.serial import COM1_IRQ, COM1_PORT, UART_PORT_COUNT
from cetvm.vmm.layout import BIOS_AREA_START

ACPI_BASE = BIOS_AREA_START
ACPI_AREA_END = 0x10_0000
PM_PORTS = tables.PmPorts(SCI_IRQ, PM1_EVT_BLK, PM1_EVT_LEN, PM1_CNT_BLK, PM1_CNT_LEN, PM_TIMER_PORT,
                          PM_TIMER_PORT_COUNT)


def _align(address: int, alignment: int = 16) -> int:
    return -(-address // alignment) * alignment


def acpi_tables(nr_cpus: int = 1, ioapic_id: int = 0, base: int = ACPI_BASE) -> dict[int, bytes]:
    """Guest-physical address → bytes of every table, for a machine of ``nr_cpus`` vCPUs with
    APIC IDs 0..nr_cpus-1 (see :mod:`.tables` for the contents)."""
    madt = tables.madt(tables.Madt(tuple(range(nr_cpus)), APIC_DEFAULT_PHYS_BASE, ioapic_id, IOAPIC_DEFAULT_BASE,
                                   SCI_IRQ, ISA_IRQ0_GSI))
    dsdt = tables.dsdt(dsdt_aml(SLP_TYP_S5, COM1_PORT, UART_PORT_COUNT, COM1_IRQ))
    rsdt_at = base + 64
    xsdt_at = rsdt_at + 64
    fadt_at = xsdt_at + 64
    facs_at = _align(fadt_at + tables.FADT_LENGTH, 64)
    madt_at = _align(facs_at + tables.FACS_LENGTH)
    dsdt_at = _align(madt_at + len(madt))
    if dsdt_at + len(dsdt) > ACPI_AREA_END:
        raise AssertionError("the ACPI tables outgrew the BIOS area")
    return {
        base: tables.rsdp(rsdt_at, xsdt_at),
        rsdt_at: tables.rsdt([fadt_at, madt_at]),
        xsdt_at: tables.xsdt([fadt_at, madt_at]),
        fadt_at: tables.fadt(facs_at, dsdt_at, PM_PORTS),
        facs_at: tables.facs(),
        madt_at: madt,
        dsdt_at: dsdt,
    }


def write_acpi_tables(put_memory: Callable[[int, bytes], None], nr_cpus: int = 1, ioapic_id: int = 0,
                      base: int = ACPI_BASE) -> None:
    """Write the tables with ``put_memory(address, data)`` (e.g. ``Vm.put_memory``)."""
    for address, data in acpi_tables(nr_cpus, ioapic_id, base).items():
        put_memory(address, data)
