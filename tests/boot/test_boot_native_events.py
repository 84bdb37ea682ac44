"""The native path delivers the common events inside the engine (issue 13; the default,
CETVM_NATIVE_EVENTS=0 turns it off): a booted kernel's SYSCALL -> SYSRETQ and #PF -> IRETQ round
trips never reach the Python delivery, and a vCPU counting its budget per instruction (the
reference) delivers them all in Python — with the same guest results
(tests/boot/test_boot_guest_kernels.py, test_boot_budget_granularity.py)."""

import pytest

from cetvm import InputError
from cetvm.cpu.native import native_available
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from guest_build import tap_kernel

ROUND_TRIPS = 300


def boot_bench(monkeypatch, granularity: str, native_events: str | None = None) -> Machine:
    """The bench kernel's round trips; ``native_events``: $CETVM_NATIVE_EVENTS (None: unset)."""
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    if native_events is None:
        monkeypatch.delenv("CETVM_NATIVE_EVENTS", raising=False)
    else:
        monkeypatch.setenv("CETVM_NATIVE_EVENTS", native_events)
    monkeypatch.setenv("CETVM_BUDGET_GRANULARITY", granularity)
    machine = Machine.boot(tap_kernel("bench"), MachineConfig(cmdline=f"syscalls={ROUND_TRIPS} faults={ROUND_TRIPS}",
                                                              serial_sink=lambda _b: None))
    assert machine.run().status == 1
    return machine


@pytest.fixture(autouse=True)
def native_built():
    if not native_available():
        pytest.skip("native CET fast path not built (make native)")


def test_syscall_sysret_iretq_and_page_faults_stay_in_the_engine(monkeypatch):
    counts = boot_bench(monkeypatch, "block").vcpu.cpu.native_event_counts
    assert counts["syscalls"] >= ROUND_TRIPS and counts["sysrets"] >= ROUND_TRIPS
    # the first #PF of the faulting block goes to Python, which gives the engine its instruction
    # boundaries; every later one stays in the engine
    assert counts["page_faults"] >= ROUND_TRIPS - 1 and counts["irets"] >= ROUND_TRIPS
    assert counts["event_handovers"] < 10, counts


def test_native_events_can_be_turned_off(monkeypatch):
    """CETVM_NATIVE_EVENTS=0: every event is delivered in Python (the reference)."""
    assert boot_bench(monkeypatch, "block", native_events="0").vcpu.cpu.native_event_counts is None


def test_a_native_events_setting_other_than_0_or_1_is_an_input_error(monkeypatch):
    with pytest.raises(InputError, match="CETVM_NATIVE_EVENTS must be 0"):
        boot_bench(monkeypatch, "block", native_events="yes")


def test_fast_events_kernel_is_green_with_native_events(monkeypatch):
    monkeypatch.delenv("CETVM_NATIVE_EVENTS", raising=False)  # the default
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    lines = []
    machine = Machine.boot(tap_kernel("fast_events"), MachineConfig(serial_sink=lambda b: lines.append(b)))
    assert machine.run().status == 1
    out = b"".join(lines).decode()
    assert "not ok" not in out and "ok " in out
    assert machine.vcpu.cpu.native_event_counts["syscalls"] > 0


def test_per_instruction_budgets_deliver_every_event_in_python(monkeypatch):
    assert boot_bench(monkeypatch, "instruction").vcpu.cpu.native_event_counts is None
