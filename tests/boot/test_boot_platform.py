"""Acceptance: the PC interrupt platform and ACPI from real guest code (guests/tests/ioapic_pit.c,
serial_irq.c, acpi_poweroff.c) — the PIT's IRQ 0 through the I/O APIC and through the 8259
(ExtINT), the 16550's THRE/RDA interrupts, level-triggered delivery with Remote IRR and the EOI
broadcast, the ACPI tables an OS reads, and the ACPI power-off (``cetvm boot`` exits 0).
Interrupts land at the same instruction count on every run; a snapshot taken while the PIT
counts replays identically."""

import os
import threading
import time

import pytest

from boot_support import MAX_INSTRUCTIONS, Tap, boot, guest
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1
LIMIT = 200_000_000


def run_green(capsys, name, *extra, status=PASS_STATUS):
    result = boot(capsys, str(guest(name)), "--memory", "32M", "--max-instructions", str(LIMIT), *extra)
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == status, result.err
    assert not tap.skipped()
    return result


def test_pit_interrupts_through_the_ioapic_and_the_8259(capsys):
    tap = run_green(capsys, "ioapic_pit").tap
    for name in ("I/O APIC version register: 24 entries", "PIT channel 0 mode 2 -> I/O APIC pin 2",
                 "ticks are 10 ms apart", "a masked redirection entry delivers nothing",
                 "LVT0 ExtINT -> vector 0x60", "OUT2 rises after 1000 PIT ticks", "gate low"):
        assert tap.passed(name)


def test_serial_thre_rda_and_level_triggered_interrupts(capsys):
    tap = run_green(capsys, "serial_irq").tap
    for name in ("enabling THRI interrupts once", "a THR write raises THR-empty again",
                 "received data interrupts", "EOI with the line still high delivers again",
                 "Remote IRR and the local APIC's TMR", "the EOI broadcast cleared Remote IRR"):
        assert tap.passed(name)


@pytest.mark.parametrize("smp", ["1", "2"])
def test_acpi_tables_from_guest_memory_and_acpi_power_off(capsys, smp):
    result = run_green(capsys, "acpi_poweroff", "--smp", smp, status=0)
    assert result.tap.passed("MADT: one enabled local APIC per CPU")
    assert "# powering off: PM1a_CNT 0x604 <- SLP_TYP 5 | SLP_EN" in result.out
    assert "Bail out" not in result.out


def run_machine(name, **run_args):
    out = bytearray()
    machine = Machine.boot(guest(name), MachineConfig(memory="32M", serial_sink=out.extend))
    result = machine.run(max_instructions=LIMIT, **run_args)
    return machine, result, out


def test_device_interrupts_land_at_the_same_instruction_count_every_run():
    _, first, out1 = run_machine("ioapic_pit")
    _, second, out2 = run_machine("ioapic_pit")
    assert first.status == second.status == PASS_STATUS
    assert first.instructions == second.instructions
    assert out1 == out2
    Tap.parse(out1.decode()).assert_complete_and_green()


def test_snapshot_while_the_pit_ticks_through_the_ioapic_replays_identically(tmp_path):
    _, whole, whole_out = run_machine("ioapic_pit")
    out = bytearray()
    machine = Machine.boot(guest("ioapic_pit"), MachineConfig(memory="32M", serial_sink=out.extend))
    pit, ioapic = machine.devices.pit, machine.devices.ioapic
    for save_at in range(1_000, whole.instructions, 1_000):
        stop = machine.run(save_at=save_at)
        assert stop.reason.value == "snapshot taken"
        if pit.next_event() is not None and not ioapic.entry(2).masked and machine.clock.halted_ns > 0:
            break
    else:
        pytest.fail("never stopped while the PIT ticked through the I/O APIC")
    path = tmp_path / "pit.snap"
    machine.save(path)
    restored = Machine.restore(path, serial_sink=out.extend)
    assert restored.devices.pit.get_state() == pit.get_state()
    assert restored.devices.ioapic.get_state() == ioapic.get_state()
    rest = restored.run(max_instructions=LIMIT)
    assert rest.status == PASS_STATUS
    assert rest.instructions == whole.instructions
    assert bytes(out) == bytes(whole_out)


def test_console_input_from_the_host_wakes_a_kernel_halted_on_its_uart():
    """The host's bytes (a pipe here; the terminal in an interactive `cetvm boot`) arrive while
    every vCPU is halted with nothing else to wake it: the run loop waits for them. They are
    typed once the guest has enabled its receive interrupt (earlier, its FIFO reset drops them,
    as on the real UART)."""
    read_fd, write_fd = os.pipe()
    out = bytearray()
    machine = Machine.boot(guest("console_input"), MachineConfig(memory="32M", serial_sink=out.extend))
    console = machine.attach_console_input(read_fd)
    uart = machine.devices.serial

    def type_when_ready():
        for _ in range(3000):
            if uart.ier & 1:
                os.write(write_fd, b"hello q")
                return
            time.sleep(0.01)
        os.close(write_fd)  # never ready: end of input stops the run
    typist = threading.Thread(target=type_when_ready)
    typist.start()
    try:
        result = machine.run(max_instructions=LIMIT)
    finally:
        typist.join()
        console.close()
        os.close(read_fd)
    assert result.status == PASS_STATUS, out.decode()
    assert "# received 'hello '" in out.decode() and "ok 1 - received-data interrupts woke" in out.decode()


def test_without_host_input_a_kernel_waiting_for_its_uart_stops_as_halted():
    _, result, _ = run_machine("console_input")
    assert result.reason.value == "guest halted" and result.status == 0


def test_end_of_host_input_stops_the_wait():
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    machine = Machine.boot(guest("console_input"), MachineConfig(memory="32M"))
    machine.attach_console_input(read_fd)
    result = machine.run(max_instructions=LIMIT)
    os.close(read_fd)
    assert result.reason.value == "guest halted"
