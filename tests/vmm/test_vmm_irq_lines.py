"""Interrupt wiring of the PC: the IRQ line router, the 16550's INTR, the local APIC's TMR and
EOI broadcast, I/O APIC messages on the APIC bus, and the routing into KVM_INTERRUPT."""

import pytest

from cetvm import InputError
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import MAX_IDLE_SKIPS, RUN_SLICE, WINDOW_SLICE, VcpuSlot
from guest_build import tap_kernel
from cetvm.arch.apic import DeliveryMode, InterruptMessage
from cetvm.vmm.devices import ApicBus, LocalApic
from cetvm.vmm.devices.irq_lines import IrqRouter
from cetvm.vmm.devices.pc import PcDevices
from cetvm.vmm.devices.serial import Serial16550
from cetvm.vmm.irq import GuestClock, InterruptRouting


class Recorder:
    def __init__(self):
        self.calls = []

    def set_irq(self, pin, level):
        self.calls.append((pin, level))


def test_router_wires_isa_irq0_to_ioapic_pin2_and_forwards_only_changes():
    pic, ioapic = Recorder(), Recorder()
    router = IrqRouter(pic, ioapic)
    router.line(0).pulse()
    router.set_level(4, True)
    router.set_level(4, True)
    router.set_level(20, True)
    assert pic.calls == [(0, True), (0, False), (4, True)]
    assert ioapic.calls == [(2, True), (2, False), (4, True), (20, True)]
    with pytest.raises(InputError):
        router.set_level(24, True)


def test_serial_intr_follows_thre_and_received_data():
    levels = []
    uart = Serial16550(irq=levels.append)
    uart.pio_write(1, 1, 0x02)  # IER.THRI with THR empty: raised at once
    assert levels[-1] is True
    assert uart.pio_read(2, 1) & 0x0F == 0x02 and levels[-1] is False  # reading IIR acknowledges it
    uart.pio_write(0, 1, ord("x"))  # THR write: drops, then THR empties again
    assert levels[-2:] == [False, True]
    uart.pio_write(1, 1, 0x01)  # only received data
    assert levels[-1] is False
    uart.queue_input(b"ab")
    assert levels[-1] is True and uart.pio_read(2, 1) & 0x0F == 0x04
    uart.pio_read(0, 1)
    uart.pio_read(0, 1)
    assert levels[-1] is False and uart.input_pending == 0


def enabled_apic(apic_id, bsp=False):
    apic = LocalApic(apic_id=apic_id, bsp=bsp)
    apic.write_register(0xF0, 0x1FF)
    return apic


def test_ioapic_messages_fixed_lowest_priority_level_and_eoi_broadcast():
    apics = [enabled_apic(0, bsp=True), enabled_apic(1), enabled_apic(2)]
    bus = ApicBus(apics)
    eois = []
    for apic in apics:
        apic.eoi_sink = eois.append
    assert bus.deliver_message(InterruptMessage(0x41, DeliveryMode.FIXED, 1))
    assert apics[1].pending_vector() == 0x41 and apics[0].pending_vector() is None
    apics[2].write_register(0xD0, 0x0400_0000)  # logical ID bit 2
    apics[1].write_register(0xD0, 0x0400_0000)
    assert bus.deliver_message(InterruptMessage(0x62, DeliveryMode.LOWEST_PRIORITY, 0x04, logical=True,
                                                level=True))
    assert apics[1].irr >> 0x62 & 1 and not apics[2].irr >> 0x62 & 1  # lowest APIC ID of the set
    assert apics[1].read_register(0x180 + 0x10 * 3) >> 2 & 1  # TMR bit of 0x62
    apics[1].acknowledge(0x62)
    apics[1].write_register(0xB0, 0)
    assert eois == [0x62]
    apics[1].acknowledge(0x41)
    apics[1].write_register(0xB0, 0)  # edge-triggered: no broadcast
    assert eois == [0x62]
    assert not bus.deliver_message(InterruptMessage(0x50, DeliveryMode.FIXED, 7))  # nobody has ID 7


def test_the_8259_reaches_only_an_apic_with_lvt0_extint():
    devices = PcDevices.create(32 << 20, nb_cpus=2)
    clock = GuestClock(lambda: 0, lambda: 0)
    devices.connect(clock, ApicBus(devices.lapics).deliver_message)
    pic = devices.pic
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        pic.master.pio_write(port & 1, 1, value)
    bsp = InterruptRouting(devices.lapics[0], clock, extint=pic, timers=(devices.pit,))

    class Vcpu:
        request_interrupt_window = False
        injected = []

        def interrupt(self, vector):
            self.injected.append(vector)
    vcpu = Vcpu()
    devices.irq.line(0).pulse()
    bsp.route(vcpu, ready=False)
    assert vcpu.request_interrupt_window and vcpu.injected == []
    bsp.route(vcpu, ready=True)
    assert vcpu.injected == [0x20] and not vcpu.request_interrupt_window
    devices.lapics[0].write_register(0x350, 0x10700)  # LVT0 masked: the 8259 no longer reaches the CPU
    devices.irq.line(0).pulse()
    assert not bsp.has_interrupt()


def test_device_state_of_an_older_snapshot_restores_with_the_new_devices_at_reset():
    devices = PcDevices.create(32 << 20)
    state = devices.get_state()
    for key in PcDevices.NEWER_DEVICES:
        del state[key]
    fresh = PcDevices.create(32 << 20)
    fresh.set_state(state)
    assert fresh.ioapic.get_state() == PcDevices.create(32 << 20).ioapic.get_state()
    assert fresh.pit.next_event() is None


def test_a_halted_machine_whose_timer_interrupt_is_masked_stops_instead_of_skipping_time_forever():
    """guests/tests/console_input.c halts waiting for its UART; a PIT ticking into a masked I/O
    APIC entry wakes nobody: the machine stops as halted after MAX_IDLE_SKIPS events."""
    machine = Machine.boot(tap_kernel("console_input"), MachineConfig(memory="32M"))
    pit = machine.devices.pit
    pit.pio_write(3, 1, 0x34)  # channel 0, mode 2, count 1000: IRQ 0 every 838 us, its entry masked
    pit.pio_write(0, 1, 1000 & 0xFF)
    pit.pio_write(0, 1, 1000 >> 8)
    result = machine.run(max_instructions=50_000_000)
    assert result.reason.value == "guest halted"
    assert machine.clock.halted_ns >= MAX_IDLE_SKIPS * 838_000


def test_runs_while_an_interrupt_waits_for_the_window_start_short_and_double():
    """An interrupt pending while IF = 0: the first run is WINDOW_SLICE instructions, each further
    run of the same wait twice as long, up to the normal slice; a new wait starts short again."""
    class Vcpu:
        request_interrupt_window = True
    slot = VcpuSlot(Vcpu())
    budgets = [slot.window_budget(RUN_SLICE) for _ in range(12)]
    assert budgets[:3] == [WINDOW_SLICE, 2 * WINDOW_SLICE, 4 * WINDOW_SLICE]
    assert budgets[-1] == RUN_SLICE and budgets == sorted(budgets)
    Vcpu.request_interrupt_window = False
    assert slot.window_budget(RUN_SLICE) == RUN_SLICE
    Vcpu.request_interrupt_window = True
    assert slot.window_budget(RUN_SLICE) == WINDOW_SLICE
    state = slot.get_state()
    other = VcpuSlot(Vcpu())
    other.set_state(state)
    assert other.window_slice == slot.window_slice == 2 * WINDOW_SLICE
    with pytest.raises(InputError, match="window_slice"):
        other.set_state({**state, "window_slice": 1})
