"""Local APIC timer in guest time: one-shot, periodic, divide configuration, masking, IRR/ISR/EOI
priority, TSC-deadline left out, snapshot state (SDM 11.5.4, 11.8)."""

import pytest

from cetvm import InputError
from cetvm.vmm.devices import LocalApic
from cetvm.vmm.devices.apic_timer import divide_count

LVTT, TMICT, TMCCT, TDCR, EOI, SVR, TPR, ISR0, IRR0 = 0x320, 0x380, 0x390, 0x3E0, 0xB0, 0xF0, 0x80, 0x100, 0x200
PERIODIC, TSC_DEADLINE, MASKED = 1 << 17, 2 << 17, 1 << 16


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def apic():
    clock = Clock()
    apic = LocalApic(clock=clock)
    apic.mmio_write(SVR, 4, 0x1FF)  # software enable
    apic.mmio_write(TDCR, 4, 0xB)   # divide by 1
    return apic, clock


def irr_vectors(apic) -> list[int]:
    return [v for v in range(256) if apic.mmio_read(IRR0 + 0x10 * (v // 32), 4) >> (v % 32) & 1]


@pytest.mark.parametrize("tdcr, divisor", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64),
                                           (0xA, 128), (0xB, 1)])
def test_divide_configuration(tdcr, divisor):
    assert divide_count(tdcr) == divisor


def test_one_shot_counts_down_fires_once(apic):
    apic, clock = apic
    apic.mmio_write(TDCR, 4, 0x0)  # divide by 2
    apic.mmio_write(LVTT, 4, 0x40)
    apic.mmio_write(TMICT, 4, 1000)
    assert apic.next_timer_expiry() == 2000
    clock.now = 500
    assert apic.mmio_read(TMCCT, 4) == 750
    apic.poll_timer()
    assert apic.pending_vector() is None
    clock.now = 2000
    apic.poll_timer()
    assert apic.mmio_read(TMCCT, 4) == 0 and apic.next_timer_expiry() is None
    assert apic.pending_vector() == 0x40 and irr_vectors(apic) == [0x40]
    apic.acknowledge(0x40)
    clock.now = 10_000
    apic.poll_timer()
    assert apic.pending_vector() is None and apic.mmio_read(ISR0 + 0x20, 4) == 1  # 0x40 in service
    apic.mmio_write(EOI, 4, 0)
    assert apic.isr == 0


def test_periodic_reloads_and_coalesces(apic):
    apic, clock = apic
    apic.mmio_write(LVTT, 4, PERIODIC | 0x30)
    apic.mmio_write(TMICT, 4, 100)
    clock.now = 130
    assert apic.mmio_read(TMCCT, 4) == 70
    apic.poll_timer()
    assert apic.pending_vector() == 0x30 and apic.next_timer_expiry() == 200
    apic.acknowledge(0x30)
    apic.mmio_write(EOI, 4, 0)
    clock.now = 550  # three periods passed unobserved: one interrupt
    apic.poll_timer()
    assert irr_vectors(apic) == [0x30] and apic.next_timer_expiry() == 600
    apic.mmio_write(TMICT, 4, 0)  # stop
    assert apic.next_timer_expiry() is None and apic.mmio_read(TMCCT, 4) == 0


def test_masked_timer_counts_but_never_raises(apic):
    apic, clock = apic
    apic.mmio_write(LVTT, 4, MASKED | PERIODIC | 0x30)
    apic.mmio_write(TMICT, 4, 10)
    for clock.now in range(0, 100, 7):
        apic.poll_timer()
    assert apic.irr == 0 and apic.pending_vector() is None


def test_priority_tpr_and_nested_isr(apic):
    apic, _ = apic
    apic.irr = (1 << 0x35) | (1 << 0x52)
    assert apic.pending_vector() == 0x52
    apic.acknowledge(0x52)
    assert apic.pending_vector() is None  # 0x35 is below the in-service class 5
    apic.mmio_write(EOI, 4, 0)
    assert apic.pending_vector() == 0x35
    apic.mmio_write(TPR, 4, 0x30)
    assert apic.pending_vector() is None  # class 3 is not above TPR's class 3


def test_entering_tsc_deadline_mode_stops_the_count_until_a_deadline_is_written(apic):
    apic, clock = apic
    apic.mmio_write(TMICT, 4, 100)
    apic.mmio_write(LVTT, 4, TSC_DEADLINE | 0x30)
    assert apic.mmio_read(TMICT, 4) == 0 and apic.next_timer_expiry() is None


def test_tsc_deadline_expires_at_the_first_ns_the_tsc_reaches_it(apic):
    apic, clock = apic
    apic.tsc, apic.tsc_khz = (lambda: 2 * clock.now + 1000), 2_000_000  # a 2 GHz TSC with an offset
    apic.mmio_write(SVR, 4, 0x1FF)
    apic.mmio_write(LVTT, 4, TSC_DEADLINE | 0x30)
    clock.now = 10
    apic.write_tsc_deadline(2 * 60 + 1000 + 1)  # reached at 60.5 ns: the first whole ns is 61
    assert apic.next_timer_expiry() == 61 and apic.read_tsc_deadline() == 2 * 60 + 1001
    apic.mmio_write(TMICT, 4, 5)  # ignored in this mode
    assert apic.mmio_read(TMCCT, 4) == 0 and apic.next_timer_expiry() == 61
    clock.now = 60
    apic.poll_timer()
    assert apic.pending_vector() is None
    clock.now = 61
    apic.poll_timer()
    assert apic.pending_vector() == 0x30 and apic.read_tsc_deadline() == 0 and apic.next_timer_expiry() is None


def test_tsc_deadline_is_ignored_outside_its_mode_and_cleared_by_a_mode_change(apic):
    apic, clock = apic
    apic.tsc, apic.tsc_khz = (lambda: 2 * clock.now), 2_000_000
    apic.write_tsc_deadline(500)
    assert apic.read_tsc_deadline() == 0 and apic.next_timer_expiry() is None
    apic.mmio_write(LVTT, 4, TSC_DEADLINE | 0x30)
    apic.write_tsc_deadline(500)
    apic.mmio_write(LVTT, 4, 0x30)
    apic.mmio_write(LVTT, 4, TSC_DEADLINE | 0x30)
    assert apic.read_tsc_deadline() == 0 and apic.next_timer_expiry() is None


def test_x2apic_timer_msrs(apic):
    apic, clock = apic
    apic.write_apic_base(0xFEE0_0000 | (1 << 11) | (1 << 10) | (1 << 8))
    apic.msr_write(0x832, 0x21)
    apic.msr_write(0x838, 50)
    clock.now = 20
    assert apic.msr_read(0x839) == 30
    clock.now = 50
    apic.poll_timer()
    assert apic.pending_vector() == 0x21


def test_timer_state_round_trip_and_checks(apic):
    apic, clock = apic
    apic.mmio_write(LVTT, 4, PERIODIC | 0x30)
    apic.mmio_write(TMICT, 4, 100)
    clock.now = 250
    apic.poll_timer()
    other = LocalApic(clock=clock)
    other.set_state(apic.get_state())
    assert other.get_state() == apic.get_state()
    assert other.mmio_read(TMCCT, 4) == 50 and other.pending_vector() == 0x30
    with pytest.raises(InputError, match="timer"):
        other.set_state(apic.get_state() | {"timer": {"start": -1, "running": True}})
