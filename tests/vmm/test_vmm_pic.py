"""8259 PIC pair: the Linux/BIOS initialisation sequence, mask readback, OCW2/OCW3."""

import pytest

from cetvm import InputError
from cetvm.vmm.bus import PioBus
from cetvm.vmm.devices import PicPair


@pytest.fixture
def pics():
    bus, pair = PioBus(), PicPair.create()
    pair.register(bus)
    return bus, pair


def init_like_linux(bus):
    """arch/x86/kernel/i8259.c init_8259A: ICW1..ICW4 on both chips, then mask everything."""
    bus.write(0x21, 1, 0xFF)
    bus.write(0xA1, 1, 0xFF)
    bus.write(0x20, 1, 0x11)  # ICW1: edge, cascade, ICW4 needed
    bus.write(0x21, 1, 0x30)  # ICW2: vectors 0x30-0x37
    bus.write(0x21, 1, 0x04)  # ICW3: slave on IR2
    bus.write(0x21, 1, 0x01)  # ICW4: 8086 mode, normal EOI
    bus.write(0xA0, 1, 0x11)
    bus.write(0xA1, 1, 0x38)
    bus.write(0xA1, 1, 0x02)
    bus.write(0xA1, 1, 0x01)
    bus.write(0x21, 1, 0xFB)  # everything masked but the cascade
    bus.write(0xA1, 1, 0xFF)


def test_init_sequence_sets_vector_bases_and_masks_read_back(pics):
    bus, pair = pics
    init_like_linux(bus)
    assert pair.master.vector_base == 0x30 and pair.slave.vector_base == 0x38
    assert bus.read(0x21, 1) == 0xFB and bus.read(0xA1, 1) == 0xFF
    assert pair.master.icw3 == 0x04 and pair.slave.icw3 == 0x02


def test_icw1_resets_the_mask_and_icw2_goes_to_the_vector_base(pics):
    bus, pair = pics
    bus.write(0x21, 1, 0xAA)
    bus.write(0x20, 1, 0x13)  # single mode, ICW4 needed: no ICW3
    assert bus.read(0x21, 1) == 0
    bus.write(0x21, 1, 0x47)  # ICW2, low 3 bits ignored
    bus.write(0x21, 1, 0x03)  # ICW4 with auto-EOI
    bus.write(0x21, 1, 0x5A)  # now OCW1
    assert pair.master.vector_base == 0x40 and pair.master.auto_eoi
    assert bus.read(0x21, 1) == 0x5A


def test_ocw3_selects_irr_or_isr_and_both_are_zero(pics):
    bus, _ = pics
    init_like_linux(bus)
    bus.write(0x20, 1, 0x0A)  # read IRR
    assert bus.read(0x20, 1) == 0
    bus.write(0x20, 1, 0x0B)  # read ISR
    assert bus.read(0x20, 1) == 0
    bus.write(0x20, 1, 0x20)  # non-specific EOI: harmless
    bus.write(0xA0, 1, 0x62)  # specific EOI IR2
    assert bus.read(0x21, 1) == 0xFB


def test_poll_mode_answers_no_interrupt_once(pics):
    bus, pair = pics
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x20, 1) == 0x07
    assert not pair.master.poll


def test_state_round_trip_and_bad_state(pics):
    bus, pair = pics
    init_like_linux(bus)
    other = PicPair.create()
    other.set_state(pair.get_state())
    assert other.get_state() == pair.get_state() and other.master.imr == 0xFB
    with pytest.raises(InputError, match="pic slave state has no 'imr'"):
        other.set_state({"master": pair.master.get_state(), "slave": {}})


# --- interrupt logic: IRQ inputs, INTA, cascade, priorities ---------------------------------
def test_edge_irq_is_latched_acknowledged_and_ended(pics):
    bus, pair = pics
    init_like_linux(bus)
    bus.write(0x21, 1, 0xFA)  # IRQ 0 and the cascade unmasked
    pair.set_irq(0, True)
    assert pair.has_interrupt()
    pair.set_irq(0, False)  # an edge stays latched
    assert pair.acknowledge() == 0x30
    assert not pair.has_interrupt()
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0x01  # in service
    pair.set_irq(0, True)  # a new edge while IRQ 0 is in service: latched, but blocked
    assert not pair.has_interrupt()
    bus.write(0x20, 1, 0x20)  # EOI
    assert pair.has_interrupt() and pair.acknowledge() == 0x30


def test_slave_irq_through_the_cascade_and_priorities(pics):
    bus, pair = pics
    init_like_linux(bus)
    bus.write(0x21, 1, 0xF8)  # IRQ 0, 1, cascade
    bus.write(0xA1, 1, 0xFD)  # IRQ 9
    pair.set_irq(9, True)
    pair.set_irq(1, True)
    assert pair.acknowledge() == 0x31  # IRQ 1 outranks the cascade (IRQ 2)
    bus.write(0x20, 1, 0x20)
    assert pair.acknowledge() == 0x39  # then IRQ 9 on the slave
    bus.write(0xA0, 1, 0x0B)
    assert bus.read(0xA0, 1) == 0x02
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    assert not pair.has_interrupt()


def test_masked_irq_and_spurious_irq7(pics):
    bus, pair = pics
    init_like_linux(bus)
    pair.set_irq(3, True)
    assert not pair.has_interrupt()  # masked (0xFB)
    assert pair.acknowledge() == 0x37  # INTA without a request: spurious IRQ 7


def test_level_irq_via_elcr_follows_the_line(pics):
    bus, pair = pics
    init_like_linux(bus)
    bus.write(0x4D1, 1, 0xFF)
    assert bus.read(0x4D1, 1) == 0xDE  # IRQ 8 and 13 are edge-only
    bus.write(0x4D0, 1, 0xFF)
    assert bus.read(0x4D0, 1) == 0xF8
    bus.write(0x21, 1, 0xF7)  # IRQ 3
    pair.set_irq(3, True)
    assert pair.acknowledge() == 0x33
    bus.write(0x20, 1, 0x20)
    assert pair.has_interrupt()  # still asserted: requested again
    pair.set_irq(3, False)
    assert not pair.has_interrupt()


def test_auto_eoi_and_poll_mode(pics):
    bus, pair = pics
    bus.write(0x20, 1, 0x13)  # single, ICW4
    bus.write(0x21, 1, 0x40)
    bus.write(0x21, 1, 0x03)  # auto-EOI
    bus.write(0x21, 1, 0x00)
    pair.set_irq(5, True)
    assert pair.acknowledge() == 0x45
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0  # nothing in service with auto-EOI
    pair.set_irq(6, True)
    bus.write(0x20, 1, 0x0C)  # poll
    assert bus.read(0x20, 1) == 0x86
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x20, 1) == 0x07  # nothing left


def test_line_state_round_trip_and_older_snapshots(pics):
    bus, pair = pics
    init_like_linux(bus)
    bus.write(0x4D0, 1, 0x08)
    pair.set_irq(3, True)
    state = pair.get_state()
    other = PicPair.create()
    other.set_state(state)
    assert other.get_state() == state
    older = {chip: {k: v for k, v in s.items() if k not in ("last_irr", "elcr")} for chip, s in state.items()}
    other.set_state(older)
    assert other.master.elcr == 0 and other.master.last_irr == 0
