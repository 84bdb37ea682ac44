"""The APIC bus: inter-processor interrupts between the machine's local APICs.

Every :class:`~cetvm.vmm.devices.lapic.LocalApic` of a machine hands the IPIs it sends (ICR
writes, x2APIC SELF_IPI) to :meth:`ApicBus.send`, which finds the destination APICs and delivers
the message as KVM's in-kernel APIC does (lapic.c kvm_apic_send_ipi → kvm_irq_delivery_to_apic →
kvm_apic_match_dest → __apic_accept_irq) [SDM Vol. 3 §11.6 "Issuing interprocessor
interrupts"]:

- Destination: the shorthand (self, all including self, all excluding self) or the ICR's
  destination field in physical or logical mode (:meth:`LocalApic.matches_destination`).
- Fixed: the vector goes into each target's IRR (:meth:`LocalApic.accept_fixed`); the VMM's
  interrupt routing injects it into that vCPU (and wakes it from HLT).
- Lowest priority: decision — delivered to the matching APIC with the lowest APIC ID (KVM
  arbitrates by priority/round-robin; any one target is architecturally correct).
- INIT (edge-triggered, or level-triggered with the level asserted; an INIT level de-assert is
  ignored as by KVM): the target's APIC is reset (:meth:`LocalApic.init_reset`) and ``init``
  is called with the target's index (the machine latches INIT in the vCPU, KVM_SET_MP_STATE).
- Start-up (SIPI): ``sipi`` is called with the target's index and the vector (the machine
  passes it to a vCPU that waits for SIPI; any other vCPU drops it).
- SMI: ``smi`` is called with the target's index (the machine makes an SMI pending in that vCPU,
  KVM_SMI; KVM's __apic_accept_irq raises KVM_REQ_SMI).
- NMI: ``nmi`` is called with the target's index (the machine queues an NMI in that vCPU,
  KVM_NMI, as KVM's __apic_accept_irq does with kvm_inject_nmi; the vector field is ignored);
  a halted target wakes (the run loop: an NMI pending).
- ExtINT is not delivered by IPIs (counted in :attr:`ApicBus.dropped`).
- I/O APIC messages (:meth:`ApicBus.deliver_message`, KVM kvm_irq_delivery_to_apic for an
  ioapic_service): physical or logical destination (no shorthand), fixed or lowest priority
  (among the APICs that accept it: the lowest APIC ID), edge or level (the target's TMR), INIT.

:attr:`ApicBus.kicked` is set when an IPI reached another CPU than the sender: the run loop
ends the sender's turn so the target runs soon (deterministic: it depends only on guest code).
"""

from __future__ import annotations

from typing import Callable

from cetvm.arch.apic import (
    InterruptMessage,
    ICR_DELIVERY_MODE_MASK,
    ICR_DELIVERY_MODE_SHIFT,
    ICR_DEST_LOGICAL,
    ICR_LEVEL_ASSERT,
    ICR_SHORTHAND_MASK,
    ICR_SHORTHAND_SHIFT,
    ICR_TRIGGER_LEVEL,
    ICR_VECTOR_MASK,
    X2APIC_ICR_DEST_SHIFT,
    XAPIC_ICR_DEST_SHIFT,
    ApicMode,
    DeliveryMode,
    Shorthand,
)
from cetvm.vmm.devices.lapic import LocalApic


def _nothing(*_args: int) -> None:
    return None


class ApicBus:
    """Delivers IPIs among ``apics`` (index = vCPU index); ``init(i)``, ``sipi(i, vector)``,
    ``smi(i)`` and ``nmi(i)`` reach the vCPUs (see the module docstring)."""

    def __init__(self, apics: list[LocalApic], init: Callable[[int], None] = _nothing,
                 sipi: Callable[[int, int], None] = _nothing, smi: Callable[[int], None] = _nothing,
                 nmi: Callable[[int], None] = _nothing) -> None:
        self.apics = apics
        self.init = init
        self.sipi = sipi
        self.smi = smi
        self.nmi = nmi
        self.dropped = 0
        self.kicked = False
        for apic in apics:
            apic.ipi_sink = self.send

    def targets(self, source: LocalApic, icr: int, x2apic: bool) -> list[int]:
        """Indices of the APICs the ICR value addresses (kvm_apic_match_dest); an APIC that is
        hardware-disabled (IA32_APIC_BASE.EN = 0) receives nothing (kvm_apic_present)."""
        shorthand = Shorthand((icr & ICR_SHORTHAND_MASK) >> ICR_SHORTHAND_SHIFT)
        dest = icr >> X2APIC_ICR_DEST_SHIFT if x2apic else (icr >> XAPIC_ICR_DEST_SHIFT) & 0xFF
        logical = bool(icr & ICR_DEST_LOGICAL)

        def addressed(apic: LocalApic) -> bool:
            if shorthand is Shorthand.SELF:
                return apic is source
            if shorthand is Shorthand.ALL_INCLUDING_SELF:
                return True
            if shorthand is Shorthand.ALL_EXCLUDING_SELF:
                return apic is not source
            return apic.matches_destination(dest, logical, x2apic)
        return [i for i, apic in enumerate(self.apics) if apic.mode is not ApicMode.DISABLED and addressed(apic)]

    def send(self, source: LocalApic, icr: int, x2apic: bool) -> None:
        """Deliver one IPI (the ``ipi_sink`` of every APIC on the bus)."""
        try:
            mode = DeliveryMode((icr & ICR_DELIVERY_MODE_MASK) >> ICR_DELIVERY_MODE_SHIFT)
        except ValueError:  # delivery mode 3: reserved
            self.dropped += 1
            return
        if mode is DeliveryMode.INIT and icr & ICR_TRIGGER_LEVEL and not icr & ICR_LEVEL_ASSERT:
            return  # INIT level de-assert
        self._deliver(source, mode, icr & ICR_VECTOR_MASK, self.targets(source, icr, x2apic), level=False)

    def deliver_message(self, message: InterruptMessage) -> bool:
        """An I/O APIC's interrupt message; True if an APIC accepted it (module docstring)."""
        targets = [i for i, apic in enumerate(self.apics)
                   if apic.mode is not ApicMode.DISABLED and apic.matches_destination(message.dest, message.logical,
                                                                                        False)]
        return self._deliver(None, message.delivery_mode, message.vector, targets, message.level)

    def _deliver(self, source: LocalApic | None, mode: DeliveryMode, vector: int, targets: list[int],
                 level: bool) -> bool:
        """Hand one message to the target APICs; True if any took it."""
        if mode is DeliveryMode.LOWEST_PRIORITY:
            accepting = [i for i in targets if self.apics[i].enabled]
            targets = [min(accepting, key=lambda i: self.apics[i].apic_id)] if accepting else []
        delivered = False
        for index in targets:
            apic = self.apics[index]
            if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY):
                taken = apic.accept_fixed(vector, level)
            elif mode is DeliveryMode.INIT:
                apic.init_reset()
                self.init(index)
                taken = True
            elif mode is DeliveryMode.STARTUP and source is not None:
                self.sipi(index, vector)
                taken = True
            elif mode is DeliveryMode.SMI:
                self.smi(index)
                taken = True
            elif mode is DeliveryMode.NMI:
                self.nmi(index)
                taken = True
            else:
                self.dropped += 1
                continue
            delivered |= taken
            if apic is not source:
                self.kicked = True
        return delivered

    def take_kick(self) -> bool:
        """True once after an IPI reached another CPU (the run loop ends the sender's turn)."""
        kicked, self.kicked = self.kicked, False
        return kicked
