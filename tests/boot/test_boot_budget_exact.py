"""Instruction limits and --save-at are exact, across exits the hypervisor completes itself
(CPUID, MSRs, VMCALL) and exits the VMM completes (I/O): a snapshot point is an exact point."""

import pytest

from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from guest_build import tap_kernel


@pytest.mark.parametrize("kernel", ["shstk_user", "xss_cpuid", "devices"])
@pytest.mark.parametrize("limit", [1, 2, 997, 20_011, 100_000, 150_000, 200_000])
def test_max_instructions_is_exact(kernel, limit):
    machine = Machine.boot(tap_kernel(kernel), MachineConfig(serial_sink=lambda _b: None))
    result = machine.run(max_instructions=limit)
    # every kernel here runs well past the largest limit: stopping earlier is a failure, not a skip
    assert result.reason.name == "INSTRUCTION_LIMIT", (
        f"{kernel} stopped ({result.reason.value}) after {result.instructions} instructions, before {limit}")
    assert result.instructions == limit
    assert machine.instructions == limit
