"""8254 PIT and port 0x61: counting in guest time, modes 0/2/3, latch and read-back, gate,
IRQ 0 pulses, snapshot state."""

import pytest

from cetvm import InputError
from cetvm.vmm.bus import PioBus
from cetvm.vmm.devices.pit import PIT_HZ, Pit, SystemControlPortB, ns_to_ticks, ticks_to_ns


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns

    def ticks(self, n):
        """Advance to exactly n PIT ticks from 0."""
        self.ns = ticks_to_ns(n)


@pytest.fixture
def pit():
    clock, pulses = Clock(), []
    dev = Pit(clock, lambda: pulses.append(clock.ns))
    bus = PioBus()
    bus.register(0x40, 4, dev)
    bus.register(0x61, 1, SystemControlPortB(dev))
    return dev, bus, clock, pulses


def program(bus, channel, mode, count, rw=3, bcd=False):
    bus.write(0x43, 1, channel << 6 | rw << 4 | mode << 1 | int(bcd))
    if rw in (1, 3):
        bus.write(0x40 + channel, 1, count & 0xFF)
    if rw in (2, 3):
        bus.write(0x40 + channel, 1, count >> 8)


def read_count(bus, channel):
    bus.write(0x43, 1, channel << 6)  # latch
    return bus.read(0x40 + channel, 1) | bus.read(0x40 + channel, 1) << 8


def test_tick_conversion_rounds_so_an_event_is_never_early():
    for ticks in (1, 2, 11932, 65536, 10**9):
        assert ns_to_ticks(ticks_to_ns(ticks)) == ticks
        assert ns_to_ticks(ticks_to_ns(ticks) - 1) == ticks - 1
    assert ns_to_ticks(1_000_000_000) == PIT_HZ


def test_idle_until_programmed(pit):
    dev, bus, clock, pulses = pit
    clock.ns = 10**9
    dev.poll()
    assert pulses == [] and dev.next_event() is None and read_count(bus, 0) == 0


def test_mode2_rate_generator_counts_and_pulses_irq0_each_period(pit):
    dev, bus, clock, pulses = pit
    program(bus, 0, 2, 1000)
    assert dev.next_event() == ticks_to_ns(1000)
    clock.ticks(250)
    assert read_count(bus, 0) == 750
    for k in range(1, 4):
        clock.ns = dev.next_event()
        dev.poll()
        assert ns_to_ticks(pulses[-1]) == 1000 * k
    assert len(pulses) == 3
    clock.ticks(10_500)  # several periods unobserved: one coalesced pulse
    dev.poll()
    assert len(pulses) == 4 and dev.next_event() == ticks_to_ns(11_000)


def test_mode0_interrupt_on_terminal_count_fires_once_and_wraps(pit):
    dev, bus, clock, pulses = pit
    program(bus, 0, 0, 100)
    clock.ticks(99)
    dev.poll()
    assert pulses == []
    clock.ticks(100)
    dev.poll()
    assert len(pulses) == 1 and dev.next_event() is None
    clock.ticks(101)
    assert read_count(bus, 0) == 0xFFFF  # keeps counting down


def test_mode3_square_wave_out_and_counter(pit):
    dev, bus, clock, _ = pit
    program(bus, 2, 3, 10)
    bus.write(0x61, 1, 1)  # gate 2 high: counting restarts
    outs, counts = [], []
    for t in range(0, 10):
        clock.ticks(t)
        outs.append(bool(bus.read(0x61, 1) & 0x20))
        counts.append(read_count(bus, 2))
    assert outs == [True] * 5 + [False] * 5
    assert counts == [10, 8, 6, 4, 2, 10, 8, 6, 4, 2]


def test_lsb_msb_access_modes_and_bcd(pit):
    _, bus, clock, _ = pit
    program(bus, 0, 0, 0x34, rw=1)
    assert bus.read(0x40, 1) == 0x34 and bus.read(0x40, 1) == 0x34
    program(bus, 0, 0, 0x1200, rw=2)
    assert bus.read(0x40, 1) == 0x12
    program(bus, 1, 0, 0x1000, bcd=True)  # BCD 1000
    clock.ticks(1)
    assert read_count(bus, 1) == 0x0999


def test_latch_holds_until_read_and_read_back_latches_status(pit):
    _, bus, clock, _ = pit
    program(bus, 0, 2, 5000)
    clock.ticks(100)
    bus.write(0x43, 1, 0x00)
    clock.ticks(200)
    bus.write(0x43, 1, 0x00)  # a second latch before reading is ignored
    assert bus.read(0x40, 1) | bus.read(0x40, 1) << 8 == 4900
    bus.write(0x43, 1, 0xC2)  # read-back: count and status of channel 0
    status = bus.read(0x40, 1)
    assert status == 0x80 | 0x30 | 2 << 1  # OUT high, LSB/MSB, mode 2
    assert bus.read(0x40, 1) | bus.read(0x40, 1) << 8 == 4800
    bus.write(0x43, 1, 0x30)  # a control word: null count until the count is written
    bus.write(0x43, 1, 0xE2)
    assert bus.read(0x40, 1) & 0x40


def test_channel2_gate_via_port_61(pit):
    dev, bus, clock, _ = pit
    bus.write(0x61, 1, 0x00)
    program(bus, 2, 0, 1000)
    clock.ticks(500)
    assert read_count(bus, 2) == 1000  # gate low: mode 0 does not count
    bus.write(0x61, 1, 0x03)
    assert bus.read(0x61, 1) & 0x03 == 0x03
    clock.ticks(1499)
    assert not bus.read(0x61, 1) & 0x20
    clock.ticks(1500)
    assert bus.read(0x61, 1) & 0x20
    refresh = {bus.read(0x61, 1) & 0x10 for clock.ns in range(0, 60_000, 5_000)}
    assert refresh == {0, 0x10}


def test_state_round_trip_and_refusals(pit):
    dev, bus, clock, pulses = pit
    program(bus, 0, 2, 3000)
    bus.write(0x43, 1, 0x00)
    bus.read(0x40, 1)  # half-read latch
    other = Pit(clock)
    other.set_state(dev.get_state())
    assert other.get_state() == dev.get_state()
    state = dev.get_state()
    with pytest.raises(InputError, match="channels"):
        other.set_state({**state, "channels": state["channels"][:2]})
    bad = [dict(c) for c in state["channels"]]
    bad[0]["gate"] = False
    with pytest.raises(InputError, match="tied high"):
        other.set_state({**state, "channels": bad})
    bad = [dict(c) for c in state["channels"]]
    bad[1]["mode"] = 7
    with pytest.raises(InputError):
        other.set_state({**state, "channels": bad})
