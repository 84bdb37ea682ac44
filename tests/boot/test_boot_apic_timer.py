"""Acceptance: guests/tests/apic_timer.c — the local APIC timer (xAPIC MMIO and x2APIC MSRs,
periodic, one-shot, masked) interrupts a CET kernel through KVM_INTERRUPT and the interrupt
window; the handler sees a consistent supervisor shadow stack. Guest time is instructions
retired, so a run (and a snapshot replay) is deterministic."""

from boot_support import MAX_INSTRUCTIONS, Tap, boot, guest

from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1
LIMIT = int(MAX_INSTRUCTIONS)


def run_machine(**run_args):
    out = bytearray()
    machine = Machine.boot(guest("apic_timer"), MachineConfig(memory="32M", serial_sink=out.extend))
    result = machine.run(max_instructions=LIMIT, **run_args)
    return machine, result, out


def test_every_timer_check_passes(capsys):
    result = boot(capsys, str(guest("apic_timer")), "--max-instructions", MAX_INSTRUCTIONS)
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    assert not tap.skipped()
    assert "# CET at CPL0: shstk 1 ibt 1" in result.out
    for name in ("periodic xAPIC timer: 5 interrupts", "shadow-stack frame (SSP-24", "one-shot timer fires once",
                 "masked LVT timer", "periodic x2APIC timer: 3 interrupts"):
        assert tap.passed(name)


def test_run_is_deterministic():
    _, first, out1 = run_machine()
    _, second, out2 = run_machine()
    assert first.status == second.status == PASS_STATUS
    assert first.instructions == second.instructions
    assert out1 == out2
    Tap.parse(out1.decode()).assert_complete_and_green()


def test_snapshot_while_the_timer_counts_replays_identically(tmp_path):
    _, whole, whole_out = run_machine()
    out = bytearray()
    machine = Machine.boot(guest("apic_timer"), MachineConfig(memory="32M", serial_sink=out.extend))
    # stop inside the periodic xAPIC phase, after the first HLT skipped guest time
    apic = machine.devices.lapics[0]
    for save_at in range(2000, whole.instructions, 2000):
        stop = machine.run(save_at=save_at)
        assert stop.reason.value == "snapshot taken"
        if apic.next_timer_expiry() is not None and machine.clock.halted_ns > 0:
            break
    assert apic.lvt[0x320] & 0xFF == 0x40 and apic.timer.running
    path = tmp_path / "apic.snap"
    machine.save(path)
    restored = Machine.restore(path, serial_sink=out.extend)
    rest = restored.run(max_instructions=LIMIT)
    assert rest.status == PASS_STATUS
    assert rest.instructions == whole.instructions
    assert bytes(out) == bytes(whole_out)
