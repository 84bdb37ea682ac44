"""The I/O APIC (82093AA programming model, version 0x20 with the EOI register — the ICH-style
I/O APIC QEMU models by default), at 0xFEC00000 with 24 input pins.

Modelled on KVM's in-kernel ioapic.c (ioapic_set_irq, ioapic_service, ioapic_write_indirect,
kvm_ioapic_update_eoi) and the data sheet [82093AA §3.2; facts in :mod:`cetvm.arch.ioapic`]:

- MMIO: IOREGSEL (+0x00) selects an indirect register, IOWIN (+0x10) reads/writes it, EOI
  (+0x40) takes a vector. Indirect registers: ID (bits 27:24 writable), version (0x170020: 24
  entries, version 0x20), arbitration ID (= ID, read-only), redirection entries 0x10..0x3F; any
  other index reads all ones and ignores writes (KVM).
- Input pins (:meth:`IoApic.set_irq`, driven by :mod:`cetvm.vmm.devices.irq_lines`) carry the
  asserted/deasserted state of the line, whatever the entry's polarity bit says (decision, as
  KVM and QEMU: the polarity the OS programs matches the one the ACPI tables announce).
- An edge-triggered entry sends its message on a rising edge of the line; a level-triggered
  entry sends it while the line is asserted and Remote IRR is clear, then sets Remote IRR (if
  an APIC accepted it). The EOI of that vector — broadcast by a local APIC (TMR set) or written
  to the EOI register — clears Remote IRR, and a line still asserted sends the message again.
- A masked entry sends nothing: an edge while masked is lost; a level still asserted when the
  entry is unmasked is sent then. Writing an entry preserves Delivery Status and Remote IRR;
  making it edge-triggered clears Remote IRR (KVM: Linux relies on it to simulate an EOI).
- Delivery is immediate (Delivery Status reads 0): ``deliver`` (the machine's APIC bus) gets an
  :class:`~cetvm.arch.apic.InterruptMessage` and answers whether an APIC accepted it.
"""

from __future__ import annotations

from typing import Callable

from cetvm import InputError
from cetvm.arch.apic import DeliveryMode, InterruptMessage
from cetvm.arch.ioapic import (
    IOAPIC_DEFAULT_BASE,
    IOAPIC_EOI,
    IOAPIC_ID_MASK,
    IOAPIC_ID_SHIFT,
    IOAPICARB,
    IOAPICID,
    IOAPICVER,
    IOAPICVER_MAX_REDIR_SHIFT,
    IOREDTBL_BASE,
    IOREGSEL,
    IOWIN,
    REDIR_RESET,
    REDIR_WRITABLE,
    RedirBits,
    RedirectionEntry,
)
from cetvm.vmm.devices.state import state_field, state_int

IOAPIC_PINS = 24
IOAPIC_VERSION = 0x20
IOAPIC_MMIO_SIZE = 0x1000
_ALL_ONES = 0xFFFF_FFFF


def _no_apic(message: InterruptMessage) -> bool:
    return False


class IoApic:
    """One I/O APIC; ``deliver(message) -> accepted`` reaches the local APICs."""

    def __init__(self, deliver: Callable[[InterruptMessage], bool] = _no_apic, ioapic_id: int = 0,
                 base: int = IOAPIC_DEFAULT_BASE) -> None:
        self.deliver = deliver
        self.base = base
        self.reset_id = ioapic_id
        self.reset()

    def reset(self) -> None:
        self.id = self.reset_id
        self.regsel = 0
        #: Line levels of the input pins (bit n: pin n asserted).
        self.irr = 0
        self.redirtbl = [REDIR_RESET] * IOAPIC_PINS
        #: Messages of delivery modes the APIC bus does not carry (ExtINT, SMI, NMI).
        self.dropped = 0

    @property
    def version(self) -> int:
        return IOAPIC_VERSION | (IOAPIC_PINS - 1) << IOAPICVER_MAX_REDIR_SHIFT

    def entry(self, pin: int) -> RedirectionEntry:
        return RedirectionEntry(self.redirtbl[pin])

    # --- input pins -----------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` (module docstring: edge on a rising edge, level while asserted)."""
        if not 0 <= pin < IOAPIC_PINS:
            raise InputError(f"I/O APIC has pins 0..{IOAPIC_PINS - 1}, not {pin}")
        mask = 1 << pin
        if not level:
            self.irr &= ~mask
            return
        was_high = bool(self.irr & mask)
        self.irr |= mask
        if self.entry(pin).level or not was_high:
            self._service(pin)

    def _service(self, pin: int) -> None:
        """Send pin's message if the entry allows it (KVM ioapic_service)."""
        entry = self.entry(pin)
        if entry.masked or (entry.level and entry.remote_irr):
            return
        try:
            mode = DeliveryMode(entry.delivery_mode)
        except ValueError:  # mode 3 and 6 are reserved for an I/O APIC entry
            self.dropped += 1
            return
        message = InterruptMessage(entry.vector, mode, entry.destination, entry.logical, entry.level)
        if self.deliver(message) and entry.level:
            self.redirtbl[pin] |= int(RedirBits.REMOTE_IRR)

    def eoi(self, vector: int) -> None:
        """End of interrupt for ``vector`` (a local APIC's broadcast or the EOI register)."""
        for pin in range(IOAPIC_PINS):
            entry = self.entry(pin)
            if entry.vector != vector or not entry.level:
                continue
            self.redirtbl[pin] &= ~int(RedirBits.REMOTE_IRR)
            if self.irr & (1 << pin):
                self._service(pin)

    # --- registers ------------------------------------------------------------------------
    def read_indirect(self, index: int) -> int:
        if index == IOAPICID or index == IOAPICARB:
            return (self.id << IOAPIC_ID_SHIFT) & IOAPIC_ID_MASK
        if index == IOAPICVER:
            return self.version
        pin, high = divmod(index - IOREDTBL_BASE, 2)
        if index < IOREDTBL_BASE or pin >= IOAPIC_PINS:
            return _ALL_ONES
        return (self.redirtbl[pin] >> (32 * high)) & _ALL_ONES

    def write_indirect(self, index: int, value: int) -> None:
        if index == IOAPICID:
            self.id = (value & IOAPIC_ID_MASK) >> IOAPIC_ID_SHIFT
            return
        pin, high = divmod(index - IOREDTBL_BASE, 2)
        if index < IOREDTBL_BASE or pin >= IOAPIC_PINS:
            return
        old = self.redirtbl[pin]
        written = (old & _ALL_ONES) | value << 32 if high else (old & ~_ALL_ONES) | value
        kept = old & int(RedirBits.REMOTE_IRR | RedirBits.DELIVERY_STATUS)
        new = (written & REDIR_WRITABLE) | kept
        if not RedirectionEntry(new).level:
            new &= ~int(RedirBits.REMOTE_IRR)
        self.redirtbl[pin] = new
        if RedirectionEntry(new).level and self.irr & (1 << pin):
            self._service(pin)

    def mmio_read(self, offset: int, size: int) -> int:
        if offset == IOREGSEL:
            value = self.regsel
        elif offset == IOWIN:
            value = self.read_indirect(self.regsel)
        else:
            return 0
        return value & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        value &= _ALL_ONES
        if offset == IOREGSEL:
            self.regsel = value & 0xFF
        elif offset == IOWIN:
            self.write_indirect(self.regsel, value)
        elif offset == IOAPIC_EOI:
            self.eoi(value & 0xFF)

    # --- snapshot -------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"id": self.id, "regsel": self.regsel, "irr": self.irr, "redirtbl": list(self.redirtbl)}

    def set_state(self, state: dict) -> None:
        name = "ioapic"
        ioapic_id = state_int(state, "id", name, 4)
        regsel = state_int(state, "regsel", name, 8)
        irr = state_int(state, "irr", name, IOAPIC_PINS)
        table = state_field(state, "redirtbl", name)
        if not isinstance(table, list) or len(table) != IOAPIC_PINS:
            raise InputError(f"{name} state 'redirtbl' must be a list of {IOAPIC_PINS} entries")
        entries = [state_int({"entry": e}, "entry", f"{name} redirtbl[{i}]") for i, e in enumerate(table)]
        for i, e in enumerate(entries):
            if e & ~(REDIR_WRITABLE | int(RedirBits.REMOTE_IRR | RedirBits.DELIVERY_STATUS)):
                raise InputError(f"{name} state redirtbl[{i}] = {e:#x} sets reserved bits")
        self.id, self.regsel, self.irr, self.redirtbl = ioapic_id, regsel, irr, entries
