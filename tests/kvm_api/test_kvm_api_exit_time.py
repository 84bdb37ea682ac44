"""VM exits cost guest time (cetvm.kvm.timekeeping): KVM's ``exits`` statistic counts them,
KVM's own clock (the VM's host clock before a VMM sets one) advances 1 ns per retired instruction
and 1 us per exit, KVM_RUN's budget is that guest time, and cetvm's budget stops are not exits:
the same guest takes the same guest time however finely its runs are sliced. And kvm_run.cr8,
the CR8 KVM without an in-kernel LAPIC shares with userspace's APIC."""

from __future__ import annotations

import pytest
from conftest import make_guest

from cetvm.kvm.api import KvmExitReason
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.timekeeping import VM_EXIT_NS


def run_to_hlt(vcpu, budget: int) -> int:
    """KVM_RUNs of ``budget`` until the guest's HLT; the number of runs."""
    runs = 1
    while (run := vcpu.run(budget=budget)).exit_reason is not KvmExitReason.HLT:
        assert run.exit_reason is KvmExitReason.INTR, run
        runs += 1
    return runs


def test_each_exit_takes_a_microsecond_of_kvms_clock():
    g = make_guest("cet_msrs")  # RDMSR/WRMSR exits KVM handles, #GP deliveries, then HLT
    before = g.vm.get_clock()
    assert run_to_hlt(g.vcpu, 10_000_000) == 1
    stats = g.vcpu.get_stats()
    assert stats["exits"] >= 2  # its intercepted MSR accesses and the HLT
    assert g.vm.get_clock() - before == stats["instructions"] + stats["exits"] * VM_EXIT_NS


def test_budget_stops_cost_nothing_so_slicing_does_not_change_guest_time():
    whole, sliced = make_guest("cet_msrs"), make_guest("cet_msrs")
    t_whole, t_sliced = whole.vm.get_clock(), sliced.vm.get_clock()
    run_to_hlt(whole.vcpu, 10_000_000)
    runs = run_to_hlt(sliced.vcpu, 7)
    assert runs > 10
    assert sliced.vcpu.get_stats() == whole.vcpu.get_stats()
    assert sliced.vm.get_clock() - t_sliced == whole.vm.get_clock() - t_whole


def test_a_run_budget_counts_exits_as_guest_time():
    g = make_guest("cet_msrs")
    budget, cut_by_an_exit = VM_EXIT_NS // 2, 0
    last = g.vcpu.get_stats()
    while (run := g.vcpu.run(budget=budget)).exit_reason is not KvmExitReason.HLT:
        now = g.vcpu.get_stats()
        insns, exits = now["instructions"] - last["instructions"], now["exits"] - last["exits"]
        # INTR once the run's guest time reaches the budget, and no later than the exit that did it
        assert run.exit_reason is KvmExitReason.INTR
        assert insns + exits * VM_EXIT_NS >= budget and insns <= budget and exits <= 1
        cut_by_an_exit += exits == 1 and insns < budget
        last = now
    assert cut_by_an_exit  # runs an exit ended early, with fewer instructions than the budget


def test_kvm_run_cr8_is_loaded_at_entry_and_stored_at_exit():
    """kvm_run.cr8 without an in-kernel LAPIC: KVM_RUN loads CR8 from it (bits 63:4 → -EINVAL,
    nothing run) and every exit reports the CPU's CR8 back."""
    g = make_guest("cet_msrs")
    g.vcpu.cr8 = 0x10
    with pytest.raises(KvmInvalidArgument):
        g.vcpu.run(budget=1)
    assert g.vcpu.get_stats()["instructions"] == 0
    g.vcpu.cr8 = 7
    run = g.vcpu.run(budget=1)
    assert run.exit_reason is KvmExitReason.INTR and run.cr8 == 7 and g.vcpu.cr8 == 7
    assert g.vcpu.cpu.cr8 == 7
