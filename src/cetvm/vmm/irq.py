"""Interrupt routing of the VMM (userspace irqchip, as QEMU with KVM without KVM_CREATE_IRQCHIP):
guest time, the local APIC as interrupt source, KVM_INTERRUPT and the interrupt window.

Each run slice (:class:`cetvm.vmm.run_loop.RunLoop`): poll the APIC timer at the current guest
time; if the APIC presents a vector and the last ``kvm_run.ready_for_interrupt_injection`` was
set, inject it with KVM_INTERRUPT and acknowledge it (IRR → ISR); otherwise set
``request_interrupt_window`` so KVM exits with KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can
take it (QEMU kvm_arch_pre_run). Slices end exactly at the next timer expiry, so a timer
interrupt is raised at the same instruction count on every run (deterministic).

HLT with RFLAGS.IF = 1 (KVM_EXIT_HLT, no in-kernel LAPIC): the VMM does not sleep; the vCPU is
halted until its APIC presents a vector (an IPI, a timer); when no vCPU can run, guest time
advances to the next timer expiry (:meth:`GuestClock.skip_to`) that can wake one. A machine
whose vCPUs nothing can wake (IF = 0, or no timer counting and nothing pending) stops.

Guest time is one clock per machine: the instructions retired by all vCPUs together count at
1 GHz (with N busy vCPUs each one's code runs at 1/N GHz of guest time, as on one host core
time-slicing them), plus the time skipped while every vCPU was halted. Every APIC timer counts
in it, so timer interrupts land at the same total instruction count on every run. It is also
the host clock the machine hands its KVM (:meth:`cetvm.kvm.api.Vm.set_host_clock`): the vCPUs'
TSCs (2 ticks per ns, plus each vCPU's offset) and kvmclock count in it, and so does the CMOS
RTC, so the APIC timer, TSC-deadline, TSC, kvmclock and RTC all agree to the tick. Each vCPU's
retired count is exact mid-run (the instruction counter of a budgeted KVM_RUN), so an RDTSC
reads the clock at that very instruction.

The 8259 PIC pair has no interrupt source in cetvm (no PIT or other ISA device raises a line), so
only the APIC is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cetvm.vmm.devices.lapic import LocalApic


@dataclass
class GuestClock:
    """Guest time in ns: instructions retired at a nominal 1 GHz plus the time skipped while the
    vCPU halted (``halted_ns``, saved in snapshots). See :mod:`cetvm.vmm.devices.apic_timer`."""

    instructions: Callable[[], int]
    halted_ns: int = 0

    def __call__(self) -> int:
        return self.instructions() + self.halted_ns

    def skip_to(self, when: int) -> None:
        """Let guest time jump to ``when`` (a halted vCPU waiting for its timer)."""
        now = self()
        if when > now:
            self.halted_ns += when - now


@dataclass
class InterruptRouting:
    """One vCPU's local APIC wired to its KVM_INTERRUPT, with the machine's guest clock."""

    apic: LocalApic
    clock: GuestClock

    def pending_vector(self) -> int | None:
        """Account for elapsed guest time, then the vector the APIC presents (or None)."""
        self.apic.poll_timer()
        return self.apic.pending_vector()

    def instructions_to_next_event(self) -> int | None:
        """Instructions until the next timer expiry (at least 1), or None (an expiry already
        due is accounted for first, so a timer nobody polls cannot hold runs at 1 instruction)."""
        self.apic.poll_timer()
        expiry = self.apic.next_timer_expiry()
        return None if expiry is None else max(1, expiry - self.clock())

    def route(self, vcpu, ready: bool) -> None:
        """Before KVM_RUN: inject the APIC's vector if the guest is ready, else ask for the
        window (``vcpu`` is a :class:`cetvm.kvm.api.KvmVcpu`; ``ready``: the last kvm_run's
        ready_for_interrupt_injection)."""
        vector = self.pending_vector()
        if vector is not None and ready:
            vcpu.interrupt(vector)
            self.apic.acknowledge(vector)
            vector = None
        vcpu.request_interrupt_window = vector is not None
