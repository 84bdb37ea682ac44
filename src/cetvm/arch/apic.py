"""IA32_APIC_BASE layout and the rule for writing it [SDM Vol. 3 §11.4.4, §11.12.5].

One copy of these facts serves both the hypervisor (``cetvm.kvm.msr``: KVM's own
``vcpu->arch.apic_base`` without an in-kernel APIC) and the VMM's local APIC device
(``cetvm.vmm.devices.lapic``), which used to carry a copy each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cetvm.arch.regs import CR8_TPR

#: Power-up base of the xAPIC MMIO page [SDM §11.4.1].
APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_ADDR_MASK = ~0xFFF
#: x2APIC register MSRs 0x800-0x8FF [SDM §11.12.1.2].
X2APIC_MSR_FIRST = 0x800
X2APIC_MSR_LAST = 0x8FF
X2APIC_MSRS = range(X2APIC_MSR_FIRST, X2APIC_MSR_LAST + 1)


def cr8_from_tpr(tpr: int) -> int:
    """CR8 as the APIC's TPR gives it: TPR[7:4] [SDM Vol. 3 §11.8.6.1 "Interaction of Task
    Priorities between CR8 and APIC"]."""
    return (tpr >> 4) & CR8_TPR


def tpr_from_cr8(cr8: int) -> int:
    """The TPR a write of CR8 leaves: TPR[7:4] = CR8[3:0], TPR[3:0] = 0 [SDM Vol. 3 §11.8.6.1]."""
    return (cr8 & CR8_TPR) << 4


class ApicMode(enum.Enum):
    """IA32_APIC_BASE EN/EXTD combinations [SDM §11.12.5 Table 11-5]."""

    DISABLED = 0
    INVALID = APIC_BASE_EXTD
    XAPIC = APIC_BASE_ENABLE
    X2APIC = APIC_BASE_ENABLE | APIC_BASE_EXTD


def apic_mode(apic_base: int) -> ApicMode:
    return ApicMode(apic_base & (APIC_BASE_ENABLE | APIC_BASE_EXTD))


def apic_base_reset_value(bsp: bool) -> int:
    """IA32_APIC_BASE after RESET: default base, enabled, BSP flag on the bootstrap processor."""
    return APIC_DEFAULT_PHYS_BASE | APIC_BASE_ENABLE | (APIC_BASE_BSP if bsp else 0)


def apic_base_reserved_bits(maxphyaddr: int, x2apic_supported: bool) -> int:
    """Bits of IA32_APIC_BASE a write must leave 0 (KVM kvm_apic_set_base: bits 7:0 and 9,
    bits at or above MAXPHYADDR, and EXTD when the CPU model has no x2APIC)."""
    reserved = ((1 << 64) - 1) & ~((1 << maxphyaddr) - 1) | 0x2FF
    if not x2apic_supported:
        reserved |= APIC_BASE_EXTD
    return reserved


def apic_base_write_error(old: int, new: int, maxphyaddr: int, x2apic_supported: bool,
                          host_initiated: bool) -> str | None:
    """Why a write of ``new`` to IA32_APIC_BASE (currently ``old``) must #GP, or None.

    Reserved bits and the invalid state EXTD=1/EN=0 always fail; the mode transitions the SDM
    forbids (x2APIC -> xAPIC, disabled -> x2APIC; §11.12.5 Figure 11-27) fail only for the
    guest, because KVM lets a host-initiated write (KVM_SET_MSRS, migration) set any valid mode
    (kvm_apic_set_base / kvm_set_apic_base)."""
    reserved = new & apic_base_reserved_bits(maxphyaddr, x2apic_supported)
    if reserved:
        return f"IA32_APIC_BASE value {new:#x} sets reserved bits {reserved:#x}"
    old_mode, new_mode = apic_mode(old), apic_mode(new)
    if new_mode is ApicMode.INVALID:
        return "IA32_APIC_BASE: x2APIC enable (bit 10) without APIC enable (bit 11)"
    if not host_initiated:
        if old_mode is ApicMode.X2APIC and new_mode is ApicMode.XAPIC:
            return "IA32_APIC_BASE: x2APIC mode can only be left by disabling the APIC"
        if old_mode is ApicMode.DISABLED and new_mode is ApicMode.X2APIC:
            return "IA32_APIC_BASE: a disabled APIC must enter xAPIC mode before x2APIC mode"
    return None


# --------------------------------------------------------------------------- the ICR
# Interrupt Command Register fields [SDM Vol. 3 §11.6.1 Figure 11-12 (xAPIC), §11.12.9 (x2APIC:
# one 64-bit MSR, destination in bits 63:32)].
ICR_VECTOR_MASK = 0xFF
ICR_DELIVERY_MODE_SHIFT = 8
ICR_DELIVERY_MODE_MASK = 0x7 << ICR_DELIVERY_MODE_SHIFT
ICR_DEST_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
ICR_SHORTHAND_MASK = 0x3 << ICR_SHORTHAND_SHIFT
#: xAPIC destination field: ICR bits 63:56; x2APIC: bits 63:32.
XAPIC_ICR_DEST_SHIFT = 56
X2APIC_ICR_DEST_SHIFT = 32
#: The broadcast destination of physical mode (and of logical mode: all ones).
XAPIC_BROADCAST = 0xFF
X2APIC_BROADCAST = 0xFFFF_FFFF
#: DFR model field (bits 31:28): 1111b flat, 0000b cluster [SDM §11.6.2.2].
DFR_MODEL_FLAT = 0xF


class DeliveryMode(enum.IntEnum):
    """ICR / LVT delivery mode, bits 10:8 [SDM §11.6.1]."""

    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class Shorthand(enum.IntEnum):
    """ICR destination shorthand, bits 19:18 [SDM §11.6.1]."""

    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


@dataclass(frozen=True)
class InterruptMessage:
    """An interrupt message on the APIC bus from an I/O APIC (or an MSI) [SDM Vol. 3 §11.11
    "Message Signalled Interrupts": destination, destination mode, delivery mode, trigger mode,
    vector; 82093AA §3.2.4]: ``dest`` is an 8-bit APIC ID or logical destination set."""

    vector: int
    delivery_mode: DeliveryMode
    dest: int
    logical: bool = False
    level: bool = False


def tpr_below_threshold(cr8: int, tpr_threshold: int) -> bool:
    """TPR virtualization's trap: after a MOV to CR8 (VTPR[7:4] = CR8[3:0]) a VM exit "TPR below
    threshold" occurs if VTPR[7:4] < TPR_THRESHOLD[3:0] [SDM Vol. 3 §30.1.2]."""
    return (cr8 & CR8_TPR) < (tpr_threshold & CR8_TPR)
