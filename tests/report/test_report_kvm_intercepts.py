"""The KVM API pieces --cet-report uses: exception intercepts and KVM_TRANSLATE."""

from __future__ import annotations

import pytest

from cetvm.kvm.errors import KvmIoctlError
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine


@pytest.fixture()
def machine():
    return Machine(MachineConfig(memory="4M"))


def test_intercepts_round_trip_and_reject_vectors_outside_the_bitmap(machine):
    vcpu = machine.vcpu
    vcpu.set_exception_intercepts({21, 13})
    assert vcpu.get_exception_intercepts() == {21, 13}
    with pytest.raises(KvmIoctlError, match="32"):
        vcpu.set_exception_intercepts({32})
    assert vcpu.get_exception_intercepts() == {21, 13}
    vcpu.set_exception_intercepts(set())
    assert vcpu.get_exception_intercepts() == set()


def test_translate_without_paging_is_identity(machine):
    # At RESET the vCPU is in real mode: linear == physical.
    assert machine.vcpu.translate(0x1234) == 0x1234


def test_translate_with_the_guests_page_tables():
    from pathlib import Path
    image = Path(__file__).resolve().parents[2] / "guests" / "build" / "tests" / "shstk_user.elf"
    if not image.is_file():
        pytest.skip("guests not built")
    machine = Machine(MachineConfig(memory="64M", serial_sink=lambda data: None))
    machine.load_kernel(image)
    machine.run(max_instructions=20_000_000)
    vcpu = machine.vcpu
    assert vcpu.get_sregs().cr0 >> 31 & 1          # the guest turned paging on
    rip = vcpu.get_regs().rip
    gpa = vcpu.translate(rip)
    assert gpa is not None
    assert len(machine.vm.get_memory(gpa, 1)) == 1  # guest RAM
    assert vcpu.translate(0x8000_0000_0000) is None  # non-canonical
    assert vcpu.translate(0x7FFF_0000_0000) is None  # not mapped by the guest
