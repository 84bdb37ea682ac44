"""A whole TAP kernel retires the same instructions whether the budget is counted per translation
block (the default) or per instruction (the reference, cetvm.cpu.budget): the kernels below stop
inside blocks in every way a guest can — #CP at a RET whose target cannot be fetched (no RAM,
NX, unmapped, non-canonical), MMIO accesses completed in and outside a run, APIC timer
interrupts at exact deadlines, page faults and SYSCALL/SYSRET/IRETQ the native path delivers in
the engine at block granularity only — and an off-by-one anywhere changes the total. With a limit, the
run stops at the same instruction with the same registers."""

import pytest

from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from guest_build import tap_kernel


def run(monkeypatch, kernel: str, granularity: str, limit: int | None = None):
    monkeypatch.setenv("CETVM_BUDGET_GRANULARITY", granularity)
    monkeypatch.setenv("CETVM_NATIVE_EVENTS", "1")  # block granularity: delivered in the engine
    machine = Machine.boot(tap_kernel(kernel), MachineConfig(serial_sink=lambda _b: None))
    result = machine.run(max_instructions=limit)
    regs = machine.vcpus[0].get_regs()
    return result.status, result.instructions, regs


@pytest.mark.parametrize("kernel, cet_path", [("ret_targets", "auto"), ("mmio_insns", "auto"), ("apic_timer", "auto"),
                                              ("ret_targets", "python"), ("fast_events", "auto"),
                                              ("lazy_flags", "auto")])
def test_a_kernel_retires_the_same_instructions_at_block_and_instruction_granularity(monkeypatch, kernel, cet_path):
    monkeypatch.setenv("CETVM_CET_PATH", cet_path)
    block = run(monkeypatch, kernel, "block")
    assert block[0] == 1, f"{kernel} failed (status {block[0]})"
    assert block == run(monkeypatch, kernel, "instruction")


@pytest.mark.parametrize("limit", [150_001, 222_223])
def test_a_limit_stops_at_the_same_instruction_at_both_granularities(monkeypatch, limit):
    block = run(monkeypatch, "mmio_insns", "block", limit)
    assert block[:2] == (124, limit)
    assert block == run(monkeypatch, "mmio_insns", "instruction", limit)
