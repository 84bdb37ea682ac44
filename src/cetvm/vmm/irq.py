"""Interrupt routing of the VMM (userspace irqchip, as QEMU with KVM without KVM_CREATE_IRQCHIP):
guest time, the interrupt controllers as interrupt sources, KVM_INTERRUPT and the interrupt
window.

Each run slice (:class:`cetvm.vmm.run_loop.RunLoop`): poll the timers at the current guest time
(the vCPU's APIC timer, and the platform's: the PIT, whose ticks go through the IRQ lines to the
8259 pair and the I/O APIC, :mod:`cetvm.vmm.devices.irq_lines`); if the CPU has an interrupt
to take and the last ``kvm_run.ready_for_interrupt_injection`` was set, inject it with
KVM_INTERRUPT and acknowledge it; otherwise set ``request_interrupt_window`` so KVM exits with
KVM_EXIT_IRQ_WINDOW_OPEN as soon as the guest can take it (QEMU kvm_arch_pre_run). Which
interrupt (KVM kvm_cpu_get_interrupt): the 8259's, through the INTA cycle, when it asserts INTR
and the vCPU's APIC accepts it (LVT0 ExtINT or APIC disabled; the BSP only), else the vector
the local APIC presents (its timer, IPIs, I/O APIC messages). Slices end exactly at the next
timer event, so a timer interrupt is raised at the same instruction count on every run
(deterministic); device interrupts are raised inside the I/O exit that caused them.

HLT with RFLAGS.IF = 1 (KVM_EXIT_HLT, no in-kernel LAPIC): the VMM does not sleep; the vCPU is
halted until it has an interrupt to take; when no vCPU can run, guest time advances to the next
timer event (:meth:`GuestClock.skip_to`) that can wake one. A machine whose vCPUs nothing can
wake (IF = 0, or no timer counting and nothing pending) stops.

Guest time is one clock per machine: the instructions retired by all vCPUs together count at
1 GHz (with N busy vCPUs each one's code runs at 1/N GHz of guest time, as on one host core
time-slicing them), their VM exits 1 µs each (KVM's rule, :mod:`cetvm.kvm.timekeeping`: so a
guest polling a device, e.g. the PIT's counter, sees time pass at a realistic rate per poll),
plus the time skipped while every vCPU was halted. Every timer counts
in it, so timer interrupts land at the same total instruction count on every run. It is also
the host clock the machine hands its KVM (:meth:`cetvm.kvm.api.Vm.set_host_clock`): the vCPUs'
TSCs (2 ticks per ns, plus each vCPU's offset) and kvmclock count in it, and so does the CMOS
RTC, so the APIC timer, TSC-deadline, TSC, kvmclock and RTC all agree to the tick. Each vCPU's
retired count is exact mid-run (the instruction counter of a budgeted KVM_RUN), so an RDTSC
reads the clock at that very instruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from cetvm.arch.apic import cr8_from_tpr, tpr_from_cr8
from cetvm.kvm.api import guest_time_ns
from cetvm.vmm.devices.lapic import LocalApic


@dataclass
class GuestClock:
    """Guest time in ns: the time the vCPUs spent running — ``instructions`` retired at a
    nominal 1 GHz and ``exits`` (VM exits, KVM's guest-time rule :func:`guest_time_ns`), both
    counted since the machine first started — plus the time skipped while the vCPUs halted
    (``halted_ns``, saved in snapshots). See :mod:`cetvm.vmm.devices.apic_timer`."""

    instructions: Callable[[], int]
    exits: Callable[[], int]
    halted_ns: int = 0

    def __call__(self) -> int:
        return guest_time_ns(self.instructions(), self.exits()) + self.halted_ns

    def skip_to(self, when: int) -> None:
        """Let guest time jump to ``when`` (a halted vCPU waiting for its timer)."""
        now = self()
        if when > now:
            self.halted_ns += when - now


class PlatformTimer(Protocol):
    """A machine-wide timer device (the PIT): raises its IRQ line when polled past an event."""

    def poll(self) -> None: ...

    def next_event(self) -> int | None: ...


class ExtIntSource(Protocol):
    """What drives the CPU's INTR pin through LVT0 ExtINT: the 8259 pair."""

    def has_interrupt(self) -> bool: ...

    def acknowledge(self) -> int: ...


@dataclass
class InterruptRouting:
    """One vCPU's interrupt sources wired to its KVM_INTERRUPT, with the machine's guest clock:
    its local APIC, the 8259 pair (``extint``, the BSP only) and the platform timers."""

    apic: LocalApic
    clock: GuestClock
    extint: ExtIntSource | None = None
    timers: Sequence[PlatformTimer] = field(default_factory=tuple)
    #: The kvm_run.cr8 given to the last KVM_RUN (route), to see whether the guest changed it.
    _cr8: int = field(default=0, init=False, repr=False)

    def poll(self) -> None:
        """Account for elapsed guest time in every timer."""
        self.apic.poll_timer()
        for timer in self.timers:
            timer.poll()

    def _extint_pending(self) -> bool:
        return self.extint is not None and self.apic.accepts_pic_interrupt and self.extint.has_interrupt()

    def has_interrupt(self) -> bool:
        """After accounting for elapsed guest time: does the CPU have an interrupt to take?"""
        self.poll()
        return self._extint_pending() or self.apic.pending_vector() is not None

    def next_event(self) -> int | None:
        """Guest time (ns) of the next timer event that may interrupt this vCPU, or None."""
        events = [self.apic.next_timer_expiry(), *(timer.next_event() for timer in self.timers)]
        return min((e for e in events if e is not None), default=None)

    def instructions_to_next_event(self) -> int | None:
        """Instructions until the next timer event (at least 1), or None (an event already
        due is accounted for first, so a timer nobody polls cannot hold runs at 1 instruction)."""
        self.poll()
        event = self.next_event()
        return None if event is None else max(1, event - self.clock())

    def _acknowledge(self) -> int:
        """INTA: the 8259's vector first (KVM kvm_cpu_get_interrupt), else the APIC's."""
        if self._extint_pending():
            assert self.extint is not None
            return self.extint.acknowledge()
        vector = self.apic.pending_vector()
        assert vector is not None
        self.apic.acknowledge(vector)
        return vector

    def route(self, vcpu, ready: bool) -> None:
        """Before KVM_RUN (QEMU kvm_arch_pre_run): inject the pending interrupt if the guest is
        ready, else ask for the window (``vcpu`` is a :class:`cetvm.kvm.api.KvmVcpu`; ``ready``:
        the last kvm_run's ready_for_interrupt_injection); kvm_run.cr8 = the APIC's TPR[7:4]."""
        pending = self.has_interrupt()
        if pending and ready:
            vcpu.interrupt(self._acknowledge())
            pending = False
        vcpu.request_interrupt_window = pending
        self._cr8 = vcpu.cr8 = cr8_from_tpr(self.apic.tpr)

    def take_cr8(self, run) -> None:
        """After KVM_RUN (QEMU kvm_arch_post_run): a CR8 the guest wrote during the run becomes
        the APIC's TPR (TPR[3:0] cleared, as a MOV to CR8 leaves them); an unchanged CR8 leaves
        the TPR, low bits included, as the guest's MMIO or MSR writes set it."""
        if run.cr8 != self._cr8:
            self.apic.tpr = tpr_from_cr8(run.cr8)
            self._cr8 = run.cr8
