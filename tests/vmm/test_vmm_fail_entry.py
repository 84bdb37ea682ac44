"""A vCPU whose VM entry fails (its VMCS holds guest state the CPU refuses) stops the machine
with a diagnosis — KVM_EXIT_FAIL_ENTRY — instead of being re-entered forever."""

from __future__ import annotations

from spec_images import elf64_kernel

from cetvm.arch import VmcsField
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import StopReason


def test_failed_vm_entry_ends_the_run_with_the_reason(tmp_path):
    kernel = tmp_path / "loop.elf"
    kernel.write_bytes(elf64_kernel(b"\xEB\xFE"))  # jmp .
    machine = Machine.boot(kernel, MachineConfig(memory="4M"))
    machine.vcpu.state.vmcs.write(VmcsField.GUEST_S_CET, 1 << 6)  # a reserved bit
    result = machine.run(max_instructions=10_000)
    assert result.reason is StopReason.INTERNAL_ERROR and result.instructions == 0
    assert "KVM_EXIT_FAIL_ENTRY" in result.message and "GUEST_S_CET" in result.message
