"""Interrupt lines: the router between devices and the interrupt controllers (the GSI routing
QEMU's pc machine builds in gsi_handler / ioapic_init_gsi, KVM's default irq routing table).

A device holds an :class:`IrqLine` for its ISA IRQ or GSI and drives it: ``set(level)`` for a
level-style output (the 16550's INTR follows its pending interrupts), ``pulse()`` for one edge
(the PIT's channel 0 tick, as KVM's in-kernel PIT injects it: raise, then lower). The router
(:class:`IrqRouter`) forwards a change of level to

- the 8259 pair for ISA IRQs 0-15 (IRQ n on master/slave input n mod 8), and
- the I/O APIC: ISA IRQ n on pin n, except ISA IRQ 0 on pin 2 (the MADT's interrupt source
  override IRQ0 → GSI 2, as on every PC with an I/O APIC); GSIs 16-23 on their own pin.

Unchanged levels are not forwarded (one rising edge per assertion). Everything happens inside
the I/O exit or timer poll that caused it, so an interrupt lands at the same instruction count
on every run.
"""

from __future__ import annotations

from typing import Protocol

from cetvm import InputError
from cetvm.vmm.devices.state import state_int

ISA_IRQS = 16
#: GSIs this router carries (the I/O APIC's pins).
GSI_COUNT = 24
#: The I/O APIC pin of ISA IRQ 0 (the PIT): the MADT's interrupt source override.
ISA_IRQ0_GSI = 2


def isa_irq_to_gsi(irq: int) -> int:
    """The GSI (I/O APIC pin) ISA IRQ ``irq`` is wired to."""
    return ISA_IRQ0_GSI if irq == 0 else irq


class LineSink(Protocol):
    def set_irq(self, pin: int, level: bool) -> None: ...


class IrqRouter:
    """Line levels by GSI-numbered input (0-23; 0-15 are the ISA IRQs), wired to the PIC pair
    and the I/O APIC (either may be None)."""

    def __init__(self, pic: LineSink | None, ioapic: LineSink | None) -> None:
        self.pic = pic
        self.ioapic = ioapic
        #: Bit n: the level of ISA IRQ / GSI input n.
        self.levels = 0

    def set_level(self, line: int, level: bool) -> None:
        """Drive input ``line`` (an ISA IRQ below 16, else a GSI) to ``level``."""
        if not 0 <= line < GSI_COUNT:
            raise InputError(f"interrupt line {line} is not 0..{GSI_COUNT - 1}")
        mask = 1 << line
        if bool(self.levels & mask) == level:
            return
        self.levels ^= mask
        if line < ISA_IRQS and self.pic is not None:
            self.pic.set_irq(line, level)
        if self.ioapic is not None:
            self.ioapic.set_irq(isa_irq_to_gsi(line) if line < ISA_IRQS else line, level)

    def line(self, number: int) -> "IrqLine":
        return IrqLine(self, number)

    def get_state(self) -> dict:
        return {"levels": self.levels}

    def set_state(self, state: dict) -> None:
        self.levels = state_int(state, "levels", "irq lines", GSI_COUNT)


class IrqLine:
    """One device's interrupt output (see the module docstring)."""

    def __init__(self, router: IrqRouter, number: int) -> None:
        self.router = router
        self.number = number

    def set(self, level: bool) -> None:
        self.router.set_level(self.number, level)

    def pulse(self) -> None:
        """One edge: assert, then deassert."""
        self.set(True)
        self.set(False)
