"""ACPI facts the VMM's tables and its PM1 device share [ACPI 6.4 §4.8.3 "PM1 Event/Control
Registers", §5.2.9 "Fixed ACPI Description Table", §5.2.12 "Multiple APIC Description Table"]."""

from __future__ import annotations

import enum


class Pm1Status(enum.IntFlag):
    """PM1_STS (write 1 to clear) [ACPI 6.4 Table 4.16]."""

    TMR_STS = 1 << 0
    BM_STS = 1 << 4
    GBL_STS = 1 << 5
    PWRBTN_STS = 1 << 8
    SLPBTN_STS = 1 << 9
    RTC_STS = 1 << 10
    PCIEXP_WAKE_STS = 1 << 14
    WAK_STS = 1 << 15


class Pm1Enable(enum.IntFlag):
    """PM1_EN [ACPI 6.4 Table 4.17]."""

    TMR_EN = 1 << 0
    GBL_EN = 1 << 5
    PWRBTN_EN = 1 << 8
    SLPBTN_EN = 1 << 9
    RTC_EN = 1 << 10


class Pm1Control(enum.IntFlag):
    """PM1_CNT [ACPI 6.4 Table 4.18]; SLP_TYP is the 3-bit field at bits 12:10."""

    SCI_EN = 1 << 0
    BM_RLD = 1 << 1
    GBL_RLS = 1 << 2
    SLP_EN = 1 << 13


PM1_SLP_TYP_SHIFT = 10
PM1_SLP_TYP_MASK = 0x7 << PM1_SLP_TYP_SHIFT


class FadtFlags(enum.IntFlag):
    """FADT Flags [ACPI 6.4 Table 5.10] (the ones cetvm's FADT uses)."""

    WBINVD = 1 << 0
    PROC_C1 = 1 << 2
    PWR_BUTTON = 1 << 4
    SLP_BUTTON = 1 << 5
    RESET_REG_SUP = 1 << 10


class IapcBootArch(enum.IntFlag):
    """FADT IA-PC Boot Architecture Flags [ACPI 6.4 Table 5.11]."""

    LEGACY_DEVICES = 1 << 0
    I8042 = 1 << 1
    VGA_NOT_PRESENT = 1 << 2
    MSI_NOT_SUPPORTED = 1 << 3
    PCIE_ASPM_CONTROLS = 1 << 4
    CMOS_RTC_NOT_PRESENT = 1 << 5


class AddressSpace(enum.IntEnum):
    """Generic Address Structure address space IDs [ACPI 6.4 Table 5.1]."""

    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize(enum.IntEnum):
    """Generic Address Structure access sizes [ACPI 6.4 Table 5.1]."""

    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


class MadtEntry(enum.IntEnum):
    """MADT interrupt controller structure types [ACPI 6.4 Table 5.45]."""

    LOCAL_APIC = 0
    IO_APIC = 1
    INTERRUPT_SOURCE_OVERRIDE = 2
    LOCAL_APIC_NMI = 4
    LOCAL_X2APIC = 9


class MpsIntiFlags(enum.IntFlag):
    """MPS INTI flags of an interrupt source override [ACPI 6.4 Table 5.50]: polarity bits 1:0,
    trigger mode bits 3:2 (00 = conforms to the bus)."""

    ACTIVE_HIGH = 0b01
    ACTIVE_LOW = 0b11
    EDGE = 0b01 << 2
    LEVEL = 0b11 << 2


#: MADT Flags: PCAT_COMPAT, a dual 8259 is present [ACPI 6.4 Table 5.44].
MADT_PCAT_COMPAT = 1
#: Local APIC flags: Enabled [ACPI 6.4 Table 5.47].
LAPIC_ENABLED = 1
