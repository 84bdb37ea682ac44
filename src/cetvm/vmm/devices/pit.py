"""The 8254 programmable interval timer (ports 0x40-0x43) and the PC's port 0x61 (system control
port B: channel 2's gate and output) [Intel 8254 data sheet; IBM PC/AT technical reference].

Counting (a decision, so that runs and snapshot replays are deterministic): the input clock of
1.193182 MHz is derived from the machine's guest time in ns (:class:`cetvm.vmm.irq.GuestClock`,
instructions retired at 1 GHz plus skipped halt time): tick = ns × 1193182 / 10⁹. A count takes
effect when it is written (QEMU i8254 pit_load_count; the chip waits for the next CLK edge).

Each channel [8254 data sheet "Mode Definitions"], with N the count (0 means 65536, 10000 in BCD)
and d the ticks since it was loaded:

====  =========================  ===============================  ==========================
mode  counter                    OUT                              gate low (channel 2 only)
====  =========================  ===============================  ==========================
0     N - d, wrapping            low until d = N, then high       counting pauses
1     as 0, from a gate trigger  low from the trigger until N     a rising gate re-triggers
2     N - (d mod N)              low for one tick at count 1      OUT high, a rising gate reloads
3     N - (2d mod N)             high for the first half period   OUT high, a rising gate reloads
4     as 0                       low for one tick at d = N        counting pauses
5     as 4, from a gate trigger  low for one tick at N            a rising gate re-triggers
====  =========================  ===============================  ==========================

Channels 0 and 1 have their gate tied high; channel 2's gate is port 0x61 bit 0. After reset a
channel is idle until the guest writes a control word and a count (KVM's in-kernel PIT; its
counter reads 0 and OUT low). The control word's latch command, the 8254 read-back command
(count and/or status of several channels), LSB/MSB/LSB-then-MSB access and BCD counting are
implemented; rewriting the count of a running channel restarts it at once (QEMU).

Channel 0 drives ISA IRQ 0 (:class:`~cetvm.vmm.devices.irq_lines.IrqLine`): each rising edge of
its OUT is one pulse on the line (KVM's in-kernel PIT injects a tick as raise + lower). The VMM
polls it (:meth:`Pit.poll`) and ends run slices at :meth:`Pit.next_event` (guest ns), so the
interrupt lands at the same instruction count on every run; edges the VMM did not observe in
time are coalesced into one pulse (as the APIC timer's).

Access time: every access to ports 0x40-0x43 and 0x61 is an I/O exit, and a VM exit costs guest
time (1 µs, KVM's rule: :mod:`cetvm.kvm.timekeeping`), so a guest polling the PIT sees it
advance at a realistic rate per poll: Linux polls port 0x61 or the counter for 30-50 ms to check
its PM timer (verify_pmtmr_rate) or calibrate the TSC (pit_calibrate_tsc), which at 1 ns per
instruction alone would take millions of exits.

Port 0x61 reads: bit 0 gate 2, bit 1 speaker data enable, bit 4 the DRAM refresh toggle (flips
every 15.085 µs of guest time), bit 5 channel 2's OUT; writes set bits 0-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cetvm import InputError
from cetvm.vmm.devices.state import state_bool, state_field, state_int

PIT_PORT = 0x40
PIT_PORT_COUNT = 4
PIT_CONTROL = 3
SYSTEM_CONTROL_PORT_B = 0x61
PIT_HZ = 1_193_182
NS_PER_S = 1_000_000_000
REFRESH_HALF_PERIOD_NS = 15_085
PIT_CHANNELS = 3

# Control word [8254: "Control Word Format"]
CW_SELECT_SHIFT = 6
CW_READ_BACK = 3
CW_RW_SHIFT = 4
CW_RW_LATCH = 0
RW_LSB, RW_MSB, RW_LSB_MSB = 1, 2, 3
CW_MODE_SHIFT = 1
CW_BCD = 0x01
# Read-back command: bit 5 = 0 latches counts, bit 4 = 0 latches status, bits 3:1 channels.
RB_NO_COUNT = 0x20
RB_NO_STATUS = 0x10
# Status byte: OUT, NULL COUNT, then the control word's bits 5:0.
STATUS_OUT = 0x80
STATUS_NULL_COUNT = 0x40
PORT_B_GATE2 = 0x01
PORT_B_SPEAKER = 0x02
PORT_B_REFRESH = 0x10
PORT_B_OUT2 = 0x20


def ns_to_ticks(ns: int) -> int:
    return ns * PIT_HZ // NS_PER_S


def ticks_to_ns(ticks: int) -> int:
    """The first guest ns at which ``ticks`` have elapsed (rounded up)."""
    return -(-ticks * NS_PER_S // PIT_HZ)


def from_bcd(value: int) -> int:
    """A 4-digit BCD count as a number (digits above 9 count as written: a guest's mistake)."""
    return sum(((value >> (4 * i)) & 0xF) * 10 ** i for i in range(4))


def to_bcd(value: int) -> int:
    return sum(((value // 10 ** i) % 10) << (4 * i) for i in range(4))


@dataclass
class PitChannel:
    """One counter. ``mode`` None: never programmed. ``load_tick``: tick the count started (or,
    while a mode 0/4 count is paused by its gate, the ticks it had counted: ``paused``)."""

    gate: bool = True
    mode: int | None = None
    rw_mode: int = RW_LSB_MSB
    bcd: bool = False
    count: int = 0x10000
    load_tick: int = 0
    counting: bool = False
    paused: bool = False
    null_count: bool = False
    write_msb_next: bool = False
    write_lsb: int = 0
    read_msb_next: bool = False
    latched_count: int | None = None
    latch_msb_next: bool = False
    latched_status: int | None = None
    #: Channel 0: tick of the last rising edge already pulsed on IRQ 0.
    irq_done_tick: int = -1

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    def elapsed(self, now: int) -> int:
        return self.load_tick if self.paused else now - self.load_tick

    # --- the counter -------------------------------------------------------------------------
    def value(self, now: int) -> int:
        """The counting element at tick ``now`` (binary; see the module table)."""
        if self.mode is None or not self.counting:
            return 0 if self.mode is None else self.count % self.modulus
        d, n = self.elapsed(now), self.count
        if self.mode == 2:
            return n - d % n
        if self.mode == 3:
            return n - (2 * d) % n
        return (n - d) % self.modulus

    def out(self, now: int) -> bool:
        """OUT at tick ``now``."""
        if self.mode is None:
            return False
        if not self.counting:
            return self.mode != 0
        d, n = self.elapsed(now), self.count
        if self.mode in (0, 1):
            return d >= n
        if self.mode in (4, 5):
            return d != n
        if not self.gate:
            return True
        if self.mode == 2:
            return d % n != n - 1
        return d % n < (n + 1) // 2

    def next_rising_edge(self, after: int) -> int | None:
        """The first tick > ``after`` at which OUT rises, or None."""
        if self.mode is None or not self.counting or self.paused or (self.mode in (2, 3) and not self.gate):
            return None
        n = self.count
        if self.mode in (0, 1):
            edges = [self.load_tick + n]
        elif self.mode in (4, 5):
            edges = [self.load_tick + n + 1]
        else:
            k = max(1, (after - self.load_tick) // n + 1)
            edges = [self.load_tick + k * n]
        return next((e for e in edges if e > after), None)

    # --- programming ---------------------------------------------------------------------------
    def control(self, rw_mode: int, mode: int, bcd: bool) -> None:
        """A control word (not a latch command): the channel waits for its count."""
        self.rw_mode, self.mode, self.bcd = rw_mode, mode, bcd
        self.counting = self.paused = False
        self.null_count = True
        self.write_msb_next = self.read_msb_next = False
        self.latched_count = self.latched_status = None

    def load(self, raw: int, now: int) -> None:
        """A count was written: start counting (modes 1/5 wait for a gate trigger)."""
        if self.mode is None:
            self.mode = 0  # a count without a control word: the chip's power-up mode is undefined
        count = from_bcd(raw) if self.bcd else raw
        self.count = count or self.modulus
        self.null_count = False
        self.load_tick = now
        self.irq_done_tick = now
        self.counting = self.mode not in (1, 5) and (self.gate or self.mode in (0, 4))
        self.paused = self.mode in (0, 4) and not self.gate
        if self.paused:
            self.load_tick = 0

    def write_data(self, value: int, now: int) -> None:
        if self.rw_mode == RW_LSB:
            self.load(value, now)
        elif self.rw_mode == RW_MSB:
            self.load(value << 8, now)
        elif not self.write_msb_next:
            self.write_lsb, self.write_msb_next = value, True
        else:
            self.write_msb_next = False
            self.load(self.write_lsb | value << 8, now)

    def set_gate(self, level: bool, now: int) -> None:
        """Channel 2's gate (port 0x61 bit 0); see the module table."""
        rising = level and not self.gate
        if self.mode in (0, 4) and self.counting and level != self.gate:
            if level:  # resume: the ticks counted so far are in load_tick
                self.load_tick, self.paused = now - self.load_tick, False
            else:
                self.load_tick, self.paused = now - self.load_tick, True
        if not level and self.mode in (2, 3):
            self.counting = False
        self.gate = level
        if rising and self.mode in (1, 2, 3, 5) and not self.null_count:
            self.load_tick, self.counting, self.irq_done_tick = now, True, now

    # --- reading ---------------------------------------------------------------------------------
    def _encoded(self, now: int) -> int:
        value = self.value(now) & 0xFFFF
        return to_bcd(value) if self.bcd else value

    def latch_count(self, now: int) -> None:
        if self.latched_count is None:
            self.latched_count, self.latch_msb_next = self._encoded(now), False

    def latch_status(self, now: int) -> None:
        if self.latched_status is None:
            mode = self.mode or 0
            self.latched_status = ((STATUS_OUT if self.out(now) else 0) | (STATUS_NULL_COUNT if self.null_count else 0)
                                   | self.rw_mode << CW_RW_SHIFT | mode << CW_MODE_SHIFT | int(self.bcd))

    def read_data(self, now: int) -> int:
        if self.latched_status is not None:
            status, self.latched_status = self.latched_status, None
            return status
        if self.latched_count is not None:
            value = self.latched_count
            if self.rw_mode == RW_LSB_MSB and not self.latch_msb_next:
                self.latch_msb_next = True
                return value & 0xFF
            self.latched_count = None
            return value >> 8 if self.rw_mode != RW_LSB else value & 0xFF
        value = self._encoded(now)
        if self.rw_mode == RW_LSB:
            return value & 0xFF
        if self.rw_mode == RW_MSB:
            return value >> 8
        msb, self.read_msb_next = self.read_msb_next, not self.read_msb_next
        return value >> 8 if msb else value & 0xFF

    # --- snapshot --------------------------------------------------------------------------------
    _INTS = (("rw_mode", 2), ("count", 17), ("load_tick", 64), ("write_lsb", 8))
    _FLAGS = ("gate", "bcd", "counting", "paused", "null_count", "write_msb_next", "read_msb_next", "latch_msb_next")
    _OPTIONAL = (("mode", 3), ("latched_count", 16), ("latched_status", 8))

    def get_state(self) -> dict:
        state = {name: getattr(self, name) for name, _ in self._INTS + self._OPTIONAL}
        state.update({name: getattr(self, name) for name in self._FLAGS})
        state["irq_done_tick"] = self.irq_done_tick
        return state

    def set_state(self, state: dict, name: str) -> None:
        values = {f: state_int(state, f, name, bits) for f, bits in self._INTS}
        values.update({f: state_bool(state, f, name) for f in self._FLAGS})
        for f, bits in self._OPTIONAL:
            raw = state_field(state, f, name)
            values[f] = None if raw is None else state_int(state, f, name, bits)
        done = state_field(state, "irq_done_tick", name)
        if isinstance(done, bool) or not isinstance(done, int) or done < -1:
            raise InputError(f"{name} state 'irq_done_tick' must be an integer >= -1, got {done!r}")
        if values["mode"] is not None and values["mode"] > 5 or values["rw_mode"] == 0 or values["count"] == 0:
            raise InputError(f"{name} state has an impossible mode, access mode or count")
        for f, value in values.items():
            setattr(self, f, value)
        self.irq_done_tick = done


class Pit:
    """The 8254 with its three channels, port 0x61, and IRQ 0 (``irq0``: called for one pulse)."""

    def __init__(self, clock_ns: Callable[[], int], irq0: Callable[[], None] | None = None) -> None:
        self.clock_ns = clock_ns
        self.irq0 = irq0
        self.channels = [PitChannel(gate=(i != 2)) for i in range(PIT_CHANNELS)]
        self.speaker = False

    def now(self) -> int:
        return ns_to_ticks(self.clock_ns())

    # --- IRQ 0 -----------------------------------------------------------------------------------
    def poll(self) -> None:
        """Account for elapsed guest time: a rising edge of channel 0's OUT pulses IRQ 0."""
        channel, now = self.channels[0], self.now()
        edge = channel.next_rising_edge(channel.irq_done_tick)
        if edge is None or edge > now:
            return
        channel.irq_done_tick = now
        if self.irq0 is not None:
            self.irq0()

    def next_event(self) -> int | None:
        """Guest ns of channel 0's next rising edge (None: no IRQ 0 to come)."""
        channel = self.channels[0]
        edge = channel.next_rising_edge(channel.irq_done_tick)
        return None if edge is None else ticks_to_ns(edge)

    # --- ports 0x40-0x43 --------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if offset == PIT_CONTROL:
            return 0xFF  # the control register is write-only (no data driven on the bus)
        return self.channels[offset].read_data(self.now())

    def pio_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        now = self.now()
        if offset != PIT_CONTROL:
            self.channels[offset].write_data(value, now)
            return
        select = value >> CW_SELECT_SHIFT
        if select == CW_READ_BACK:
            self._read_back(value, now)
            return
        channel = self.channels[select]
        rw_mode = (value >> CW_RW_SHIFT) & 3
        if rw_mode == CW_RW_LATCH:
            channel.latch_count(now)
            return
        mode = (value >> CW_MODE_SHIFT) & 7
        channel.control(rw_mode, mode & 3 if mode > 5 else mode, bool(value & CW_BCD))

    def _read_back(self, value: int, now: int) -> None:
        for index, channel in enumerate(self.channels):
            if not value & (2 << index):
                continue
            if not value & RB_NO_COUNT:
                channel.latch_count(now)
            if not value & RB_NO_STATUS:
                channel.latch_status(now)

    # --- snapshot --------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"channels": [c.get_state() for c in self.channels], "speaker": self.speaker}

    def set_state(self, state: dict) -> None:
        channels = state_field(state, "channels", "pit")
        if not isinstance(channels, list) or len(channels) != PIT_CHANNELS:
            raise InputError(f"pit state 'channels' must be a list of {PIT_CHANNELS} channel states")
        speaker = state_bool(state, "speaker", "pit")
        fresh = [PitChannel() for _ in range(PIT_CHANNELS)]
        for index, (channel, channel_state) in enumerate(zip(fresh, channels)):
            channel.set_state(channel_state, f"pit channel {index}")
        if not fresh[0].gate or not fresh[1].gate:
            raise InputError("pit state: the gates of channels 0 and 1 are tied high")
        self.channels, self.speaker = fresh, speaker


class SystemControlPortB:
    """Port 0x61 (see the module docstring): channel 2's gate and OUT, the speaker bit and
    the refresh toggle."""

    def __init__(self, pit: Pit) -> None:
        self.pit = pit

    def pio_read(self, offset: int, size: int) -> int:
        ns = self.pit.clock_ns()
        channel = self.pit.channels[2]
        return ((PORT_B_GATE2 if channel.gate else 0) | (PORT_B_SPEAKER if self.pit.speaker else 0)
                | (PORT_B_REFRESH if (ns // REFRESH_HALF_PERIOD_NS) & 1 else 0)
                | (PORT_B_OUT2 if channel.out(self.pit.now()) else 0))

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.pit.speaker = bool(value & PORT_B_SPEAKER)
        self.pit.channels[2].set_gate(bool(value & PORT_B_GATE2), self.pit.now())
