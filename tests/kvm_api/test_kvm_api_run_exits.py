"""KVM_RUN exits: hypercalls, port I/O completion, budget, injected #CP, vCPU limits."""

from __future__ import annotations

import struct

import pytest
from conftest import CODE, make_guest

from cetvm.arch import VmcsField
from cetvm.kvm.api import KvmExitReason
from cetvm.kvm.errors import KvmIoctlError

ENOSYS = (-1000) & 0xFFFF_FFFF_FFFF_FFFF


def test_vmcall_exit_and_port_io_completion():
    g = make_guest("hypercall_io")
    g.vm.enable_cap_exit_hypercall(1 << 12)
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.HYPERCALL
    assert run.hypercall.nr == 12 and run.hypercall.args == (0x1111, 0x2222, 0x3333, 0x4444)
    run.hypercall.ret = 77
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.IO and run.io.port == 0x80 and run.io.data == 0x42
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.IO and run.io.port == 0x81 and run.io.size == 1
    run.io.data = 0x5A
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert g.slot(0) == ENOSYS       # hypercall 99: handled by KVM, unknown
    assert g.slot(1) == 77
    assert g.slot(2) == 0x5A


def test_vmcall_without_exit_cap_is_enosys():
    g = make_guest("hypercall_io")
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.IO
    assert g.slot(0) == ENOSYS and g.slot(1) == ENOSYS  # hypercall 12 not enabled for exit


def test_budget_gives_kvm_exit_intr_and_resumes():
    g = make_guest("cet_msrs")
    run = g.vcpu.run(budget=3)
    assert run.exit_reason is KvmExitReason.INTR
    assert g.vcpu.get_regs().rip != CODE
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert len(g.log()) == 3


def test_injected_cp_reaches_the_guest_with_its_error_code():
    g = make_guest("cet_msrs")
    g.vm.put_memory(0x200FF8, struct.pack("<Q", CODE))  # the handler resumes at the entry
    g.vcpu.queue_exception(21, 3)
    assert g.vcpu.get_vcpu_events().vector == 21
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert g.log()[0] == (21, 3)
    assert g.vcpu.get_vcpu_events() is None
    with pytest.raises(KvmIoctlError, match="error code"):
        g.vcpu.queue_exception(21)


def test_vcpu_id_in_use_and_memory_bounds():
    g = make_guest("cet_msrs")
    with pytest.raises(KvmIoctlError, match="EEXIST"):
        g.vm.create_vcpu()
    with pytest.raises(Exception, match="RAM slot"):
        g.vm.get_memory(0x400000 - 4, 8)


def test_vm_entry_failure_on_a_non_canonical_guest_ssp_is_kvm_exit_fail_entry():
    """KVM_SET_ONE_REG refuses a bad SSP, so the VMCS field is written directly (as a buggy
    hypervisor or a nested vmcs12 merge could): the CPU's VM entry fails its guest-state check."""
    g = make_guest("hypercall_io")
    rip = g.vcpu.get_regs().rip
    g.vcpu.state.vmcs.write(VmcsField.GUEST_SSP, 0x0000_8000_0000_0000)
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.FAIL_ENTRY and "GUEST_SSP" in run.detail
    assert run.hardware_entry_failure_reason == 1 << 31 | 33  # VM-entry failure: invalid guest state
    assert run.rip == rip and g.vcpu.get_regs().rip == rip  # nothing ran
