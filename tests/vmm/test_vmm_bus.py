"""Port and MMIO buses: dispatch by range, PC behaviour for unclaimed addresses, conflicts."""

import pytest

from cetvm import CetvmError
from cetvm.vmm.bus import BusConflictError, MmioBus, PioBus


class Recorder:
    def __init__(self, answer=0x5A):
        self.answer = answer
        self.log = []

    def pio_read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.answer

    def pio_write(self, offset, size, value):
        self.log.append(("w", offset, size, value))

    mmio_read = pio_read
    mmio_write = pio_write


def test_pio_dispatch_passes_offset_size_and_truncated_value():
    bus, dev = PioBus(), Recorder()
    bus.register(0x3F8, 8, dev, "uart")
    bus.write(0x3FB, 1, 0x1FF)
    assert bus.read(0x3FD, 1) == 0x5A
    assert dev.log == [("w", 3, 1, 0xFF), ("r", 5, 1)]


def test_unclaimed_ports_read_all_ones_and_ignore_writes():
    bus, dev = PioBus(), Recorder()
    bus.register(0x80, 1, dev)
    assert bus.read(0x81, 1) == 0xFF
    assert bus.read(0x7F, 2) == 0xFFFF
    assert bus.read(0x1234, 4) == 0xFFFF_FFFF
    bus.write(0x81, 1, 0)
    assert dev.log == []


def test_device_answer_is_truncated_to_access_size():
    bus = PioBus()
    bus.register(0x10, 4, Recorder(answer=0x1234_5678))
    assert bus.read(0x10, 1) == 0x78
    assert bus.read(0x10, 2) == 0x5678


@pytest.mark.parametrize("base,length", [(0x3F0, 9), (0x3FF, 1), (0x3F8, 8), (0x3F9, 2)])
def test_overlapping_registration_is_refused_with_both_names(base, length):
    bus = PioBus()
    bus.register(0x3F8, 8, Recorder(), "uart")
    with pytest.raises(BusConflictError, match="overlaps uart at 0x3f8-0x3ff"):
        bus.register(base, length, Recorder(), "other")


def test_adjacent_ranges_are_fine_and_lookup_is_exact():
    bus, a, b = PioBus(), Recorder(1), Recorder(2)
    bus.register(0x20, 2, a)
    bus.register(0x22, 2, b)
    assert [bus.read(p, 1) for p in (0x1F, 0x20, 0x21, 0x22, 0x23, 0x24)] == [0xFF, 1, 1, 2, 2, 0xFF]
    assert bus.unregister(0x20) is a
    assert bus.read(0x20, 1) == 0xFF


def test_port_range_must_fit_io_space_and_sizes_are_checked():
    bus = PioBus()
    with pytest.raises(BusConflictError, match="outside"):
        bus.register(0xFFFF, 2, Recorder())
    with pytest.raises(CetvmError, match="size must be one of"):
        bus.read(0x80, 3)


def test_mmio_bus_dispatch_and_unclaimed_reads():
    bus, dev = MmioBus(), Recorder(answer=0xAB)
    bus.register(0xFEE0_0000, 0x1000, dev, "apic")
    assert bus.read(0xFEE0_0030, 4) == 0xAB
    bus.write(0xFEE0_0FFC, 8, 1 << 70)
    assert dev.log[-1] == ("w", 0xFFC, 8, 0)
    assert bus.read(0xFEE0_1000, 8) == (1 << 64) - 1
    assert bus.is_claimed(0xFEE0_0FFF) and not bus.is_claimed(0xFEDF_FFFF)
