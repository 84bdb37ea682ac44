"""KVM_REGISTER_COALESCED_MMIO / _UNREGISTER and the coalesced ring (KVM's coalesced MMIO and
PIO): a guest write inside a zone retires without an exit and waits in the ring, in order;
reads and writes outside every zone exit; a full ring makes writes exit again."""

from __future__ import annotations

import pytest
from conftest import make_guest

from cetvm.cpu.exits import Direction, ExitReason, IoExit, MmioExit, VmExit
from cetvm.kvm.api import MAX_PIO_READ_VALUES, KvmExitReason
from cetvm.kvm.coalesced_mmio import KVM_COALESCED_MMIO_MAX, CoalescedMmio, CoalescedWrite, CoalescedZone
from cetvm.kvm.errors import KvmInvalidArgument


def test_a_port_write_in_a_zone_waits_in_the_ring_and_the_read_after_it_exits():
    g = make_guest("hypercall_io")  # OUT 0x42 to port 0x80, then IN from port 0x81
    g.vm.register_coalesced_mmio(CoalescedZone(0x80, 1, pio=1))
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.IO and run.io.port == 0x81 and run.io.direction is Direction.IN
    assert g.vm.take_coalesced_writes() == [CoalescedWrite(0x80, 1, 0x42, 1)]
    assert g.vm.take_coalesced_writes() == []
    run.io.data = 0x5A
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert g.slot(2) == 0x5A


def test_an_mmio_zone_does_not_take_port_writes_and_unregister_removes_the_zone():
    g = make_guest("hypercall_io")
    g.vm.register_coalesced_mmio(CoalescedZone(0x80, 1, pio=0))  # an MMIO zone at "address" 0x80
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.IO and run.io.port == 0x80
    g2 = make_guest("hypercall_io")
    g2.vm.register_coalesced_mmio(CoalescedZone(0x80, 1, pio=1))
    g2.vm.unregister_coalesced_mmio(CoalescedZone(0x80, 1, pio=1))
    assert g2.vcpu.run(budget=10_000).io.port == 0x80


@pytest.mark.parametrize("zone", [CoalescedZone(0x80, 1, pio=2), CoalescedZone(-1, 1), CoalescedZone(0, 1 << 32)])
def test_bad_zones_are_einval(zone):
    g = make_guest("hypercall_io")
    with pytest.raises(KvmInvalidArgument):
        g.vm.register_coalesced_mmio(zone)
    with pytest.raises(KvmInvalidArgument):
        g.vm.register_coalesced_mmio("0x80")


def _out(port: int, data: int) -> VmExit:
    return VmExit(ExitReason.IO, 0x1000, io=IoExit(port, 1, Direction.OUT, data))


def test_only_writes_entirely_inside_a_zone_coalesce_and_a_full_ring_exits():
    ring = CoalescedMmio()
    ring.register(CoalescedZone(0x3F8, 1, pio=1))
    ring.register(CoalescedZone(0xFED0_0000, 0x10))
    assert not ring.absorbs(VmExit(ExitReason.IO, 0, io=IoExit(0x3F8, 1, Direction.IN)))
    assert not ring.absorbs(VmExit(ExitReason.IO, 0, io=IoExit(0x3F8, 2, Direction.OUT, 0x4141)))  # crosses the end
    assert ring.absorbs(VmExit(ExitReason.MMIO, 0, mmio=MmioExit(0xFED0_0008, 8, Direction.OUT, 7)))
    assert not ring.absorbs(VmExit(ExitReason.MMIO, 0, mmio=MmioExit(0xFED0_000C, 8, Direction.OUT, 7)))
    for i in range(KVM_COALESCED_MMIO_MAX - 2):
        assert ring.absorbs(_out(0x3F8, i & 0xFF))
    assert not ring.absorbs(_out(0x3F8, 0x21))  # 169 entries: one slot stays free
    kept = ring.take()
    assert len(kept) == KVM_COALESCED_MMIO_MAX - 1 and kept[0] == CoalescedWrite(0xFED0_0008, 8, 7, 0)
    assert [w.data for w in kept[1:4]] == [0, 1, 2]
    assert ring.absorbs(_out(0x3F8, 0x21))


def test_a_read_only_pio_register_answers_byte_reads_without_an_exit():
    """cetvm's read-only PIO registers (KvmVm.set_pio_read_value): the IN completes in KVM with
    the value; taking the value away makes the read exit again."""
    g = make_guest("hypercall_io")  # OUT 0x42 to port 0x80, then IN from port 0x81
    g.vm.register_coalesced_mmio(CoalescedZone(0x80, 1, pio=1))
    g.vm.set_pio_read_value(0x81, 0x5A)
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert g.slot(2) == 0x5A
    assert g.vm.take_coalesced_writes() == [CoalescedWrite(0x80, 1, 0x42, 1)]
    g2 = make_guest("hypercall_io")
    g2.vm.set_pio_read_value(0x81, 0x5A)
    g2.vm.set_pio_read_value(0x81, None)
    g2.vm.register_coalesced_mmio(CoalescedZone(0x80, 1, pio=1))
    run = g2.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.IO and run.io.port == 0x81


@pytest.mark.parametrize("port, value", [(-1, 0), (0x10000, 0), (0x81, 0x100), (0x81, -1), ("0x81", 0)])
def test_read_only_pio_register_arguments_are_checked(port, value):
    g = make_guest("hypercall_io")
    with pytest.raises(KvmInvalidArgument):
        g.vm.set_pio_read_value(port, value)


def test_read_only_pio_registers_are_bounded():
    g = make_guest("hypercall_io")
    for port in range(MAX_PIO_READ_VALUES):
        g.vm.set_pio_read_value(port, port)
    g.vm.set_pio_read_value(0, 7)  # a new value for a port that has one: fine
    with pytest.raises(KvmInvalidArgument, match="ENOSPC"):
        g.vm.set_pio_read_value(MAX_PIO_READ_VALUES, 1)
