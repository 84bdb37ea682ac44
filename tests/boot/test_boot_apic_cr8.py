"""Acceptance: guests/tests/apic_cr8.c — a guest that switches its local APIC off and on, and CR8
as the APIC's task priority (kvm-unit-tests x86/apic.c test_apic_disable found both missing):
with IA32_APIC_BASE.EN = 0 KVM hides CPUID.1:EDX.APIC and the xAPIC page is a hole (all ones,
writes dropped), CR8 keeps what the guest writes, and CR8 and the TPR (xAPIC page or x2APIC MSR)
are one register whose priority class holds interrupts back — until the guest lowers CR8, which
reaches the VMM's APIC at once (KVM_EXIT_SET_TPR through the CPU's TPR threshold)."""

import pytest
from boot_support import boot, guest

from cetvm.cpu.native import native_available
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1
LIMIT = 5_000_000


def test_every_apic_disable_and_cr8_check_passes(capsys):
    result = boot(capsys, "--memory", "32M", "--max-instructions", str(LIMIT), str(guest("apic_cr8")))
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    assert not tap.skipped()
    for name in ("IA32_APIC_BASE.EN = 0: CPUID.1:EDX.APIC reads clear", "disabled APIC's page reads all ones",
                 "CR8 reads what was written while the APIC is disabled", "TPR = CR8 << 4",
                 "a TPR write (xAPIC page) shows in CR8", "bit 4 set -> #GP(0)",
                 "CR8 = 8 holds back a class-8 self-IPI", "lowering CR8 lets a held-back self-IPI in",
                 "x2APIC: CR8 and the TPR MSR 0x808 are one register"):
        assert tap.passed(name), name


def boot_machine(monkeypatch, native_events: str) -> tuple[Machine, str, int]:
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    monkeypatch.setenv("CETVM_NATIVE_EVENTS", native_events)
    out: list[bytes] = []
    machine = Machine.boot(guest("apic_cr8"), MachineConfig(memory="32M", serial_sink=out.append))
    result = machine.run(max_instructions=LIMIT)
    console = b"".join(out).decode()
    assert result.status == PASS_STATUS, console
    return machine, console, result.instructions


def test_native_cr8_writes_give_the_python_paths_results(monkeypatch):
    """The native exit loop (cetfast.c: MOV to CR8 into the engine's v_tpr, the serial port's
    I/O) and the Python emulation (CETVM_NATIVE_EVENTS=0) give the same TAP lines and
    instructions retired: the guest's CR8, TPR and self-IPI timing agree."""
    if not native_available():
        pytest.skip("native CET fast path not built (make native)")
    native, native_console, native_instructions = boot_machine(monkeypatch, "1")
    # the writes not below the TPR threshold (KVM_RUN's CR8); a lowering below it is Python's
    # trap-like exit (KVM_EXIT_SET_TPR)
    assert native.vcpu.cpu.native_exit_insns.stats["cr8_writes"] >= 5
    python, python_console, python_instructions = boot_machine(monkeypatch, "0")
    assert python.vcpu.cpu.native_exit_insns is None
    assert (python_console, python_instructions) == (native_console, native_instructions)
