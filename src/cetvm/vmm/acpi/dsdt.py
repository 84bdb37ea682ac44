"""The DSDT's AML (hand-assembled with :mod:`cetvm.vmm.acpi.aml`):

- ``\\_S5``: Package {SLP_TYP_S5, SLP_TYP_S5, 0, 0} — the S5 (soft-off) sleep type values for
  PM1a_CNT and PM1b_CNT [ACPI 6.4 §7.4.2 "\\_Sx (System States)"]; Linux's poweroff writes
  SLP_TYP = 5 with SLP_EN to PM1a_CNT (:mod:`cetvm.vmm.devices.acpi_pm`).
- ``\\_SB.COM1``: the 16550 at 0x3F8 (8 ports), ISA IRQ 4 — PNP0501, _UID 1 [§6.1.5, §6.2.2], so
  an OS that enumerates ACPI devices finds the console UART.
"""

from __future__ import annotations

from cetvm.vmm.acpi import aml


def sleep_state_s5(slp_typ: int) -> bytes:
    return aml.name("\\_S5", aml.package(aml.integer(slp_typ), aml.integer(slp_typ), aml.integer(0), aml.integer(0)))


def uart_device(name: str, uid: int, port: int, length: int, irq: int) -> bytes:
    return aml.device(name,
                      aml.name("_HID", aml.eisa_id("PNP0501")),
                      aml.name("_UID", aml.integer(uid)),
                      aml.name("_CRS", aml.resource_template(aml.io_port(port, length), aml.irq_no_flags(irq))))


def dsdt_aml(slp_typ_s5: int, com1_port: int, com1_ports: int, com1_irq: int) -> bytes:
    """The DSDT's definition block body."""
    return sleep_state_s5(slp_typ_s5) + aml.scope("\\_SB", uart_device("COM1", 1, com1_port, com1_ports, com1_irq))
