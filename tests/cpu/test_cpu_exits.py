"""The hypervisor-facing seam: VM exits and their completion, budget, injection, triple fault."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from unicorn import Uc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import L, Machine  # noqa: E402

from cetvm.arch import Msr, Vector, VmcsField  # noqa: E402
from cetvm.cpu.exits import Direction, ExitReason  # noqa: E402

pytestmark = pytest.mark.guest


def start(case: str) -> Machine:
    m = Machine("exits")
    m.vcpu.rip = m.sym(case)
    return m


def test_port_io_exits_and_in_is_completed_with_the_hypervisor_value():
    m = start("case_io")
    out = m.vcpu.run()
    assert out.reason == ExitReason.IO and (out.io.port, out.io.size, out.io.direction, out.io.data) == (0x3F8, 1, Direction.OUT, 0x41)
    in8 = m.vcpu.run()
    assert (in8.io.port, in8.io.size, in8.io.direction) == (0x60, 1, Direction.IN)
    in8.io.data = 0x99
    in32 = m.vcpu.run()
    assert (in32.io.port, in32.io.size) == (0x510, 4)
    in32.io.data = 0xDEADBEEF
    assert m.vcpu.run().reason == ExitReason.HLT
    assert m.results.guest[0] & 0xFF == 0x99 and m.results.guest[1] == 0xDEADBEEF


def test_cpuid_exits_and_the_hypervisor_fills_the_registers():
    m = start("case_cpuid")
    exit_ = m.vcpu.run()
    assert exit_.reason == ExitReason.CPUID and exit_.instruction_length == 2
    assert m.vcpu.reg("rax") == 7
    m.vcpu.set_reg("rbx", 0x77)
    m.vcpu.set_reg("rcx", 0x88)
    assert m.vcpu.run().reason == ExitReason.HLT
    assert m.results.guest[:2] == [0x77, 0x88]


def test_intercepted_msrs_exit_cet_msrs_are_handled_and_unknown_msrs_are_gp():
    m = start("case_msr")
    m.vcpu.vmcs.set_msr_bitmap({0x4B564D00, 0x4B564D01})
    rd = m.vcpu.run()
    assert rd.reason == ExitReason.RDMSR and rd.msr.index == 0x4B564D00
    rd.msr.data = 0xAABBCCDD_11223344
    wr = m.vcpu.run()
    assert wr.reason == ExitReason.WRMSR and (wr.msr.index, wr.msr.data) == (0x4B564D01, 0x33334444_11112222)
    m.vcpu.run()
    assert m.results.guest[0] == 0xAABBCCDD_11223344
    assert m.results.guest[1] == m.vcpu.msr(Msr.IA32_S_CET)
    assert (m.results.vector, m.results.rip) == (Vector.GP, m.sym("unknown_rdmsr"))


def test_mmio_read_and_write_exit_with_address_size_and_data():
    m = start("case_mmio")
    rd = m.vcpu.run()
    assert rd.reason == ExitReason.MMIO and rd.rip == m.sym("mmio_read")
    assert (rd.mmio.address, rd.mmio.size, rd.mmio.direction) == (L["MMIO_PAGE"] + 0x10, 4, Direction.IN)
    rd.mmio.data = 0x12345678
    wr = m.vcpu.run()
    assert (wr.mmio.address, wr.mmio.size, wr.mmio.direction, wr.mmio.data) == (L["MMIO_PAGE"] + 0x20, 8, Direction.OUT, 0x55AA)
    assert m.vcpu.run().reason == ExitReason.HLT
    assert m.results.guest[0] == 0x12345678


def test_mmio_completion_runs_the_engine_uncounted(monkeypatch):
    """An instruction completed over MMIO is stepped with a temporary exit after it, never with
    Unicorn's instruction count: the count is a code hook that the next uncounted run deletes by
    flushing every translation (issue 13: about 1,900 full flushes in one Linux boot)."""
    counts: list[int] = []
    engine_start = Uc.emu_start

    def counting_spy(self, begin, until, timeout=0, count=0):
        counts.append(count)
        return engine_start(self, begin, until, timeout, count)

    monkeypatch.setattr(Uc, "emu_start", counting_spy)
    m = start("case_mmio")
    m.vcpu.run().mmio.data = 0x12345678
    m.vcpu.run()
    assert m.vcpu.run().reason == ExitReason.HLT
    assert m.results.guest[0] == 0x12345678
    # the vCPU's own runs start in C on the native path (cetfast_run, never counted): the
    # completion steps remain, through Uc.emu_start
    assert counts and not any(counts), counts


def test_vmcall_and_xsetbv_exit():
    m = start("case_vmcall")
    assert m.vcpu.run().reason == ExitReason.VMCALL
    m.vcpu.set_reg("rax", 7)
    m.vcpu.run()
    assert m.results.guest[0] == 7
    m = start("case_xsetbv")
    exit_ = m.vcpu.run()
    assert exit_.reason == ExitReason.XSETBV and (exit_.xcr_index, exit_.xcr_value) == (0, 7)
    m.vcpu.xcr0 = exit_.xcr_value
    assert m.vcpu.run().reason == ExitReason.HLT and m.vcpu.xcr0 == 7


def test_exception_bitmap_exits_before_delivery_and_injection_delivers():
    m = start("case_ud")
    m.vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, 1 << Vector.UD)
    exit_ = m.vcpu.run()
    assert exit_.reason == ExitReason.EXCEPTION and exit_.exception.vector == Vector.UD
    assert exit_.rip == m.sym("ud_site") and m.results.count == 0
    m.vcpu.inject_exception(Vector.UD)
    m.vcpu.run()
    assert (m.results.count, m.results.vector, m.results.rip) == (1, Vector.UD, m.sym("ud_site"))


def test_fault_with_no_usable_idt_is_a_triple_fault():
    m = start("case_triple")
    assert m.vcpu.run().reason == ExitReason.TRIPLE_FAULT


def test_budget_counts_instructions_exactly():
    m = start("case_loop")
    exit_ = m.vcpu.run(budget=5)  # endbr64, mov, dec, jnz, dec
    assert exit_.reason == ExitReason.BUDGET
    assert m.vcpu.reg("rcx") == 998 and m.vcpu.rip == exit_.rip
    runs = 1
    while (exit_ := m.vcpu.run(budget=100)).reason == ExitReason.BUDGET:
        runs += 1
    assert exit_.reason == ExitReason.HLT and m.results.guest[0] == 1
    assert m.vcpu.instructions_retired == 2 + 2 * 1000 + 2  # endbr, mov, loop, two stores
    assert runs == 1 + (2004 - 5) // 100  # the last partial run ends at HLT
