"""NMIs end to end (guests/tests/nmi.c): self-NMIs through the local APIC's ICR (delivery mode
NMI), KVM_NMI and injection at VM entry, IDT vector 2 on IST2 with shadow stacks and IBT on,
blocking by NMI until the handler's IRETQ (a second NMI waits for it, a third is lost), an NMI
with RFLAGS.IF = 0, and one from another vCPU waking a CPU halted with IF = 0. The native
IRETQ hands over to Python while NMIs are blocked, so the native and Python paths
(CETVM_NATIVE_EVENTS=1/0) give the same console and the same instruction count."""

import pytest

from cetvm.cpu.native import native_available
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from guest_build import tap_kernel

TESTS = 5


def boot(monkeypatch, cet_path: str, native_events: str = "1") -> tuple[str, int]:
    monkeypatch.setenv("CETVM_CET_PATH", cet_path)
    monkeypatch.setenv("CETVM_NATIVE_EVENTS", native_events)
    out: list[bytes] = []
    machine = Machine.boot(tap_kernel("nmi"), MachineConfig(smp=2, serial_sink=out.append))
    result = machine.run()
    console = b"".join(out).decode()
    assert result.status == 1, console
    return console, result.instructions


def assert_all_pass(console: str) -> None:
    assert "# CET at CPL0: shstk 1 ibt 1" in console
    assert "not ok" not in console and console.count("\nok ") == TESTS, console


def test_nmis_on_the_python_path(monkeypatch):
    console, _ = boot(monkeypatch, "python")
    assert_all_pass(console)


def test_native_events_give_the_same_console_and_instructions_as_python(monkeypatch):
    if not native_available():
        pytest.skip("native CET fast path not built (make native)")
    native_console, native_instructions = boot(monkeypatch, "native", "1")
    assert_all_pass(native_console)
    python_console, python_instructions = boot(monkeypatch, "native", "0")
    assert (python_console, python_instructions) == (native_console, native_instructions)


def test_a_machine_saved_in_its_nmi_handler_continues_with_nmis_blocked(monkeypatch, tmp_path):
    """A snapshot taken a few instructions into the first NMI handler (NMIs masked: the nmi vCPU
    events in the snapshot) continues in a fresh machine to the same console and instruction
    count as the run without the stop."""
    monkeypatch.setenv("CETVM_CET_PATH", "python")
    serial = bytearray()
    reference = Machine.boot(tap_kernel("nmi"), MachineConfig(smp=2, serial_sink=serial.extend))
    nmi_at: list[int] = []
    send_nmi = reference.apic_bus.nmi
    reference.apic_bus.nmi = lambda index: (nmi_at.append(reference.instructions), send_nmi(index))
    full = reference.run()
    assert nmi_at, "the kernel sent no NMI"

    before, after = bytearray(), bytearray()
    machine = Machine.boot(tap_kernel("nmi"), MachineConfig(smp=2, serial_sink=before.extend))
    machine.run(save_at=nmi_at[0] + 5)
    assert machine.vcpu.get_vcpu_events_nmi().masked, "stopped inside the NMI handler"
    machine.save(tmp_path / "nmi.snap")
    restored = Machine.restore(tmp_path / "nmi.snap", serial_sink=after.extend)
    assert restored.vcpu.get_vcpu_events_nmi().masked
    result = restored.run()
    assert (before + after).decode() == serial.decode()
    assert (result.status, result.instructions) == (full.status, full.instructions)
