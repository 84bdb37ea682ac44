"""The plain exit-point instructions run next to the engine on the native path (issue 13,
cetfast.c "exit-point instructions"): MOV to CR3, IN from COM1's line-status register (KVM's
read-only PIO register, KvmVm.set_pio_read_value) and OUT to its coalesced transmit register
— with the same guest results as the Python emulation (CETVM_NATIVE_EVENTS=0): the same TAP
lines, console bytes and instructions retired."""

import pytest

from cetvm.cpu.native import native_available
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from guest_build import tap_kernel

ROUNDS = 400  # guests/tests/native_exits.c
RAW_LINE = "native-exits: a line written one OUT at a time\n"


@pytest.fixture(autouse=True)
def native_built():
    if not native_available():
        pytest.skip("native CET fast path not built (make native)")


def boot(monkeypatch, native_events: str, kernel: str = "native_exits") -> tuple[Machine, str, int]:
    """``kernel`` (a TAP kernel) on the native CET path with $CETVM_NATIVE_EVENTS; it must pass."""
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    monkeypatch.setenv("CETVM_NATIVE_EVENTS", native_events)
    out: list[bytes] = []
    machine = Machine.boot(tap_kernel(kernel), MachineConfig(serial_sink=out.append))
    result = machine.run()
    console = b"".join(out).decode()
    assert result.status == 1, console
    return machine, console, result.instructions


def test_cr3_loads_and_serial_port_io_stay_next_to_the_engine(monkeypatch):
    machine, console, _ = boot(monkeypatch, "1")
    assert "not ok" not in console and console.count("\nok ") + console.startswith("ok ") >= 6
    assert RAW_LINE in console
    stats = machine.vcpu.cpu.native_exit_insns.stats
    assert stats["cr3_writes"] >= 2 * ROUNDS + 2, stats
    assert stats["pio_exits"] >= ROUNDS + len(RAW_LINE), stats


def test_the_python_emulation_gives_the_same_guest_results(monkeypatch):
    native, native_console, native_instructions = boot(monkeypatch, "1")
    python, python_console, python_instructions = boot(monkeypatch, "0")
    assert python.vcpu.cpu.native_exit_insns is None
    assert (python_console, python_instructions) == (native_console, native_instructions)


def boot_fastpath(monkeypatch, native_events: str) -> tuple[Machine, str, int]:
    machine, console, instructions = boot(monkeypatch, native_events, "exit_fastpath")
    assert "not ok" not in console, console
    return machine, console, instructions


def test_cpuid_and_vmcall_are_answered_next_to_the_engine_as_the_exits_kvm_handles(monkeypatch):
    """KVM's CPUID and VMCALL exits without leaving the CPU's run (cetfast.c exit_fastpath):
    every one of guests/tests/exit_fastpath.c there, each an exit in KVM's statistics and in
    guest time."""
    machine, console, _ = boot_fastpath(monkeypatch, "1")
    stats = machine.vcpu.cpu.native_exit_insns.stats
    assert stats["cpuid_exits"] >= 1000 and stats["vmcall_exits"] >= 1000, stats
    assert machine.vcpu.get_stats()["exits"] >= 2000


def test_the_python_path_gives_the_same_ticks_registers_and_instructions(monkeypatch):
    """The TSC ticks the guest prints, the CPUID and VMCALL answers, the instructions and the
    exits KVM counts are those of the exits Python takes (CETVM_NATIVE_EVENTS=0)."""
    native, native_console, native_instructions = boot_fastpath(monkeypatch, "1")
    python, python_console, python_instructions = boot_fastpath(monkeypatch, "0")
    assert python.vcpu.cpu.native_exit_insns is None
    assert (python_console, python_instructions) == (native_console, native_instructions)
    assert python.vcpu.get_stats()["exits"] == native.vcpu.get_stats()["exits"]
