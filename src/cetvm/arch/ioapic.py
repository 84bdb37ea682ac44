"""The I/O APIC's programming model [Intel 82093AA I/O APIC data sheet §3.2; ICH/PCH data
sheets "Advanced Programmable Interrupt Controller", which add the EOI register of version 0x20].

Registers are reached indirectly: the guest writes a register index to IOREGSEL and reads or
writes it through IOWIN. The redirection table entry of input pin n is the 64-bit register
pair 0x10 + 2n (low dword) / 0x11 + 2n (high dword).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Default MMIO base of the first I/O APIC [82093AA §3.0; ACPI MADT on every PC].
IOAPIC_DEFAULT_BASE = 0xFEC0_0000
#: Direct registers (offsets in the MMIO window).
IOREGSEL = 0x00
IOWIN = 0x10
IOAPIC_EOI = 0x40
#: Indirect registers.
IOAPICID = 0x00
IOAPICVER = 0x01
IOAPICARB = 0x02
IOREDTBL_BASE = 0x10
#: Bits 27:24 of IOAPICID and IOAPICARB hold the 4-bit ID.
IOAPIC_ID_SHIFT = 24
IOAPIC_ID_MASK = 0xF << IOAPIC_ID_SHIFT
#: IOAPICVER: version bits 7:0, maximum redirection entry bits 23:16.
IOAPICVER_MAX_REDIR_SHIFT = 16


class RedirBits(enum.IntFlag):
    """Single-bit fields of a redirection table entry [82093AA §3.2.4]."""

    DEST_LOGICAL = 1 << 11
    DELIVERY_STATUS = 1 << 12
    POLARITY_LOW = 1 << 13
    REMOTE_IRR = 1 << 14
    TRIGGER_LEVEL = 1 << 15
    MASKED = 1 << 16


REDIR_VECTOR_MASK = 0xFF
REDIR_DELIVERY_MODE_SHIFT = 8
REDIR_DELIVERY_MODE_MASK = 0x7 << REDIR_DELIVERY_MODE_SHIFT
#: The destination field (bits 63:56: an APIC ID or a logical destination set).
REDIR_DEST_SHIFT = 56
#: Bits a guest may write: vector, delivery mode, destination mode, polarity, trigger mode,
#: mask, destination. Delivery status and Remote IRR are read-only.
REDIR_WRITABLE = 0xFF << REDIR_DEST_SHIFT | int(RedirBits.MASKED | RedirBits.TRIGGER_LEVEL | RedirBits.POLARITY_LOW
                                                 | RedirBits.DEST_LOGICAL) | REDIR_DELIVERY_MODE_MASK | REDIR_VECTOR_MASK
#: A redirection entry after reset: masked, everything else 0 [82093AA §3.2.4].
REDIR_RESET = int(RedirBits.MASKED)


@dataclass(frozen=True)
class RedirectionEntry:
    """One decoded redirection table entry."""

    raw: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", int(self.raw))

    @property
    def vector(self) -> int:
        return self.raw & REDIR_VECTOR_MASK

    @property
    def delivery_mode(self) -> int:
        return (self.raw & REDIR_DELIVERY_MODE_MASK) >> REDIR_DELIVERY_MODE_SHIFT

    @property
    def logical(self) -> bool:
        return bool(self.raw & RedirBits.DEST_LOGICAL)

    @property
    def level(self) -> bool:
        return bool(self.raw & RedirBits.TRIGGER_LEVEL)

    @property
    def masked(self) -> bool:
        return bool(self.raw & RedirBits.MASKED)

    @property
    def remote_irr(self) -> bool:
        return bool(self.raw & RedirBits.REMOTE_IRR)

    @property
    def destination(self) -> int:
        return self.raw >> REDIR_DEST_SHIFT
