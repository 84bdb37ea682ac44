"""The local APIC timer counting in guest time [SDM Vol. 3 §11.5.4 "APIC Timer"; KVM lapic.c
apic_update_lvtt / start_apic_timer / apic_get_tmcct / update_divide_count].

Guest time (a decision, so that runs and snapshot replays are deterministic): the machine's clock
is *instructions retired at a nominal 1 GHz* — one instruction = 1 ns — plus the time the VMM
skipped while the vCPU halted (:class:`cetvm.vmm.irq.GuestClock`). The APIC bus runs at 1 GHz
(KVM's default APIC_BUS_CYCLE_NS = 1), so with divide-by-1 the current count drops by one per
instruction retired.

Modes (LVT timer bits 18:17): one-shot (00) and periodic (01) count down from the initial count
(TMICT) divided by TDCR; writing TMICT (re)starts the count, 0 stops it. A periodic timer
reloads at each expiry; expiries the VMM did not observe in time are coalesced into one
interrupt (as KVM's hrtimer does when it falls behind). Changing the timer mode stops the count
(KVM apic_update_lvtt). Changing TDCR while counting restarts the current period with the new
divisor (decision; KVM rescales the remaining time).

TSC-deadline mode (10) [SDM Vol. 3 §11.5.4.1]: the timer is armed by a non-zero write of
IA32_TSC_DEADLINE and fires when the vCPU's TSC reaches that value. The TSC counts in the same
guest time (:mod:`cetvm.kvm.timekeeping`: 2 ticks per ns), so the LAPIC converts the deadline
once, when it is written, into the first guest-time ns at which the TSC is at or past it
(:func:`deadline_expiry`) and keeps it in ``start``: the run loop then ends a slice exactly
there, as for the one-shot timer. A deadline already passed fires at once. Firing disarms the
timer (and clears the MSR); TMICT is ignored and TMCCT reads 0 in this mode. A later write of
IA32_TIME_STAMP_COUNTER does not move an armed deadline (as KVM's hrtimer).
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch.timekeeping import ticks_to_ns_ceil

LVT_TIMER_MODE_SHIFT = 17
TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2


def divide_count(tdcr: int) -> int:
    """TDCR bits 3,1:0 → divisor 2, 4, ..., 128, 1 (SDM Figure 11-10; KVM update_divide_count)."""
    code = ((tdcr & 0x3) | ((tdcr & 0x8) >> 1)) + 1
    return 1 << (code & 0x7)


def timer_mode(lvtt: int) -> int:
    return (lvtt >> LVT_TIMER_MODE_SHIFT) & 0x3


def deadline_expiry(now_ns: int, tsc_now: int, deadline: int, tsc_khz: int) -> int:
    """Guest time (ns) at which a TSC reading ``tsc_now`` at ``now_ns`` reaches ``deadline``."""
    return now_ns + ticks_to_ns_ceil(max(0, deadline - tsc_now), tsc_khz)


@dataclass
class ApicTimer:
    """The counting state: ``start`` is the guest time (ns) the current period began, ``running``
    whether a period is in progress (TMICT != 0 and, in one-shot mode, not yet expired)."""

    start: int = 0
    running: bool = False

    def period(self, tmict: int, tdcr: int) -> int:
        return tmict * divide_count(tdcr)

    def arm(self, now: int, tmict: int) -> None:
        """A TMICT write: restart counting at ``now`` (stop for 0)."""
        self.start, self.running = now, tmict != 0

    def arm_deadline(self, expiry: int | None) -> None:
        """TSC-deadline mode: expire at guest time ``expiry`` (None disarms)."""
        self.start, self.running = (0, False) if expiry is None else (expiry, True)

    def stop(self) -> None:
        self.running = False

    def current_count(self, now: int, tmict: int, tdcr: int, mode: int) -> int:
        """TMCCT at guest time ``now`` (0 when stopped or expired)."""
        if not self.running or mode == TIMER_TSC_DEADLINE:
            return 0
        elapsed = now - self.start
        period = self.period(tmict, tdcr)
        if mode == TIMER_PERIODIC:
            elapsed %= period
        elif elapsed >= period:
            return 0
        return tmict - elapsed // divide_count(tdcr)

    def next_expiry(self, tmict: int, tdcr: int, mode: int) -> int | None:
        """Guest time of the next expiry, or None."""
        if not self.running:
            return None
        if mode == TIMER_TSC_DEADLINE:
            return self.start
        return self.start + self.period(tmict, tdcr)

    def expire(self, now: int, tmict: int, tdcr: int, mode: int) -> bool:
        """Account for guest time ``now``: True if the timer expired since the last call (one
        interrupt however many periods passed); a periodic timer starts its next period."""
        deadline = self.next_expiry(tmict, tdcr, mode)
        if deadline is None or now < deadline:
            return False
        if mode == TIMER_PERIODIC:
            period = self.period(tmict, tdcr)
            self.start += period * ((now - self.start) // period)
        else:
            self.running = False
        return True
