"""Real-address mode, found by kvm-unit-tests' realmode: events and IRET (it stopped at its first
IRETD: cetvm delivered events in IA-32e mode only) — guests/kvm/real_ivt.S, entered at 0x1000
with CS = 0 after a vCPU's RESET, takes INT 21h and a #DE through the IVT and returns with IRET
and IRETD [SDM Vol. 3 §21.1.4; Vol. 2A INT n, IRET "REAL-ADDRESS-MODE"]; and self-modifying code
with paging off, the way realmode runs its tests, on every CET path (guests/kvm/real_smc.S; the
Python path's old TLB fill failed four realmode reports, see EngineStops.on_tlb_fill)."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
from conftest import guest_binary

from cetvm.arch.regs import RFLAGS_IF
from cetvm.cpu.native import native_available
from cetvm.cpu.state import Regs
from cetvm.cpuid import get_model
from cetvm.kvm import Host
from cetvm.kvm.api import Kvm, KvmExitReason

LOAD = 0x1000
RESULTS = 0x3000


def real_mode_vm(name: str):
    """A VM with ``name`` at LOAD and a vCPU entered there in real-address mode; (vm, vcpu)."""
    kvm = Kvm(Host(get_model("sapphire-rapids")))
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, 0x100000)
    vm.put_memory(LOAD, guest_binary(name))
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid(kvm.get_supported_cpuid())
    sregs = vcpu.get_sregs()  # RESET: real-address mode, CS = F000h
    vcpu.set_sregs(replace(sregs, cs=replace(sregs.cs, selector=0, base=0)))
    vcpu.set_regs(Regs(rip=LOAD, rflags=0x2))
    return vm, vcpu


def run_real_mode_guest() -> tuple[dict[str, int], int]:
    vm, vcpu = real_mode_vm("real_ivt")
    run = vcpu.run(budget=100_000)
    assert run.exit_reason is KvmExitReason.HLT, run
    words = struct.unpack("<6H", vm.get_memory(RESULTS, 12))
    names = ("bx", "flags_after_iret", "pushed_ip", "after_iretd", "sp", "flags_in_handler")
    return dict(zip(names, words)), vcpu.get_regs().rflags


def div_insn_address() -> int:
    """The DIV's address in the binary (its symbol: the bytes F6 F1, ``div %cl``)."""
    return LOAD + guest_binary("real_ivt").index(b"\xf6\xf1")


def test_int_n_goes_through_the_ivt_and_iret_returns():
    got, _ = run_real_mode_guest()
    assert got["bx"] == 0x1234
    assert not got["flags_in_handler"] & RFLAGS_IF  # the delivery cleared IF
    assert got["flags_after_iret"] & RFLAGS_IF  # IRET restored the FLAGS pushed with IF set


def test_a_fault_pushes_the_faulting_ip_and_no_error_code():
    got, _ = run_real_mode_guest()
    assert got["pushed_ip"] == div_insn_address()


def test_iretd_pops_a_doubleword_frame():
    got, rflags = run_real_mode_guest()
    assert got["after_iretd"] == 0x5A5A and got["sp"] == 0x8000
    assert rflags & RFLAGS_IF


@pytest.mark.parametrize("cet_path", ["native", "python"])
def test_a_store_to_code_already_run_changes_what_runs_next(monkeypatch, cet_path):
    if cet_path == "native" and not native_available():
        pytest.skip("native CET fast path not built (make native)")
    monkeypatch.setenv("CETVM_CET_PATH", cet_path)
    vm, vcpu = real_mode_vm("real_smc")
    run = vcpu.run(budget=100_000)
    assert run.exit_reason is KvmExitReason.HLT, run
    assert struct.unpack("<2H", vm.get_memory(RESULTS, 4)) == (0x1111, 0x1234)
