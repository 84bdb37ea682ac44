"""I/O APIC: indirect registers, edge and level delivery, Remote IRR and EOI, masking, state."""

import pytest

from cetvm import InputError
from cetvm.arch.apic import DeliveryMode, InterruptMessage
from cetvm.vmm.bus import MmioBus
from cetvm.vmm.devices.ioapic import IoApic

BASE = 0xFEC0_0000
LEVEL, MASKED, REMOTE_IRR = 1 << 15, 1 << 16, 1 << 14


class Apics:
    """Records messages; accepts them unless told otherwise."""

    def __init__(self):
        self.messages: list[InterruptMessage] = []
        self.accept = True

    def __call__(self, message):
        self.messages.append(message)
        return self.accept


@pytest.fixture
def ioapic():
    apics = Apics()
    dev, bus = IoApic(apics), MmioBus()
    bus.register(BASE, 0x1000, dev)
    return dev, bus, apics


def write_reg(bus, index, value):
    bus.write(BASE, 4, index)
    bus.write(BASE + 0x10, 4, value)


def read_reg(bus, index):
    bus.write(BASE, 4, index)
    return bus.read(BASE + 0x10, 4)


def test_id_version_arbitration_and_reset_entries(ioapic):
    _, bus, _ = ioapic
    assert read_reg(bus, 1) == 0x0017_0020  # 24 entries, version 0x20
    write_reg(bus, 0, 0x0A00_0000)
    assert read_reg(bus, 0) == 0x0A00_0000 and read_reg(bus, 2) == 0x0A00_0000
    write_reg(bus, 2, 0)  # arbitration ID is read-only
    assert read_reg(bus, 2) == 0x0A00_0000
    assert all(read_reg(bus, 0x10 + 2 * pin) == MASKED for pin in range(24))
    assert read_reg(bus, 0x40) == 0xFFFF_FFFF and read_reg(bus, 0x05) == 0xFFFF_FFFF  # no such register


def test_edge_entry_sends_one_message_per_rising_edge(ioapic):
    dev, bus, apics = ioapic
    write_reg(bus, 0x10 + 4, 0x0000_0941)  # pin 2: lowest priority, vector 0x41
    write_reg(bus, 0x11 + 4, 0x0300_0000)
    dev.set_irq(2, True)
    dev.set_irq(2, True)  # still high: no new edge
    dev.set_irq(2, False)
    dev.set_irq(2, True)
    assert apics.messages == [InterruptMessage(0x41, DeliveryMode.LOWEST_PRIORITY, 3, True, False)] * 2
    assert not read_reg(bus, 0x14) & REMOTE_IRR


def test_edge_while_masked_is_lost(ioapic):
    dev, bus, apics = ioapic
    write_reg(bus, 0x10, MASKED | 0x30)
    dev.set_irq(0, True)
    dev.set_irq(0, False)
    write_reg(bus, 0x10, 0x30)
    assert apics.messages == []


def test_level_entry_remote_irr_and_eoi_redelivery(ioapic):
    dev, bus, apics = ioapic
    write_reg(bus, 0x10 + 18, LEVEL | 0x55)  # pin 9
    dev.set_irq(9, True)
    assert len(apics.messages) == 1 and apics.messages[0].level
    assert read_reg(bus, 0x10 + 18) & REMOTE_IRR
    dev.set_irq(9, False)
    dev.set_irq(9, True)  # Remote IRR still set: nothing new
    assert len(apics.messages) == 1
    dev.eoi(0x55)  # line still asserted: delivered again
    assert len(apics.messages) == 2 and read_reg(bus, 0x10 + 18) & REMOTE_IRR
    dev.set_irq(9, False)
    bus.write(BASE + 0x40, 4, 0x55)  # the EOI register
    assert len(apics.messages) == 2 and not read_reg(bus, 0x10 + 18) & REMOTE_IRR


def test_level_asserted_while_masked_is_sent_on_unmask_and_not_accepted_leaves_remote_irr_clear(ioapic):
    dev, bus, apics = ioapic
    write_reg(bus, 0x10, MASKED | LEVEL | 0x60)
    dev.set_irq(0, True)
    assert apics.messages == []
    apics.accept = False
    write_reg(bus, 0x10, LEVEL | 0x60)
    assert len(apics.messages) == 1 and not read_reg(bus, 0x10) & REMOTE_IRR


def test_writes_keep_read_only_bits_and_edge_mode_clears_remote_irr(ioapic):
    dev, bus, _ = ioapic
    write_reg(bus, 0x12, LEVEL | 0x61)
    dev.set_irq(1, True)
    write_reg(bus, 0x12, LEVEL | 0x62 | (1 << 12))  # delivery status is read-only
    assert read_reg(bus, 0x12) == LEVEL | REMOTE_IRR | 0x62
    write_reg(bus, 0x12, 0x62)
    assert read_reg(bus, 0x12) == 0x62


def test_reserved_delivery_modes_are_dropped(ioapic):
    dev, bus, apics = ioapic
    write_reg(bus, 0x10, 0x300 | 0x70)
    dev.set_irq(0, True)
    assert apics.messages == [] and dev.dropped == 1


def test_state_round_trip_and_bad_state():
    dev = IoApic()
    dev.write_indirect(0x10, LEVEL | 0x44)
    dev.set_irq(3, True)
    other = IoApic()
    other.set_state(dev.get_state())
    assert other.get_state() == dev.get_state()
    with pytest.raises(InputError, match="redirtbl"):
        other.set_state({**dev.get_state(), "redirtbl": [0] * 3})
    with pytest.raises(InputError, match="reserved"):
        other.set_state({**dev.get_state(), "redirtbl": [1 << 20] + [0] * 23})
    with pytest.raises(InputError):
        dev.set_irq(24, True)
