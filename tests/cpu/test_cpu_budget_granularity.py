"""The instruction budget counted per translation block agrees with the per-instruction count.

The block hook retires a whole block when it starts (cetvm.cpu.budget); a stop inside it — a
budget that ends mid-block, an MMIO exit, a #PF — must retire exactly the instructions before
the stop. Each run below steps the same guest (guests/cpu/exits.S ``case_midblock``: a loop of
long blocks, an MMIO read and a #PF in the middle of straight-line code) with a small budget per
run, so runs end at every instruction boundary; after every run the state and the retired count
must be those of the per-instruction reference. (The conftest runs this on every CET path.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Machine  # noqa: E402

from cetvm.arch import Vector, VmcsField  # noqa: E402
from cetvm.cpu.exits import Direction, ExitReason  # noqa: E402

pytestmark = pytest.mark.guest

MMIO_VALUE = 0x1000


def trajectory(monkeypatch: pytest.MonkeyPatch, granularity: str, budget: int) -> list[tuple]:
    """(exit reason, exit RIP, RIP, RAX, instructions retired, events taken) after every run."""
    monkeypatch.setenv("CETVM_BUDGET_GRANULARITY", granularity)
    m = Machine("exits")
    m.vcpu.rip = m.sym("case_midblock")
    states = []
    for _ in range(2000):
        exit_ = m.vcpu.run(budget=budget)
        if exit_.reason == ExitReason.MMIO and exit_.mmio.direction == Direction.IN:
            exit_.mmio.data = MMIO_VALUE
        states.append((exit_.reason, exit_.rip, m.vcpu.rip, m.vcpu.reg("rax"), m.vcpu.instructions_retired,
                       m.results.count))
        if exit_.reason == ExitReason.HLT:
            break
    assert (m.results.vector, m.results.rip) == (Vector.PF, m.sym("midblock_pf"))
    return states


@pytest.mark.parametrize("budget", [1, 3, 7, 1000])
def test_block_budget_stops_where_the_per_instruction_budget_stops(monkeypatch, budget):
    block = trajectory(monkeypatch, "block", budget)
    assert block == trajectory(monkeypatch, "instruction", budget)
    exits = [state[0] for state in block]
    assert ExitReason.MMIO in exits and exits[-1] == ExitReason.HLT
    if budget == 1:
        # one instruction a run: a run that follows a BUDGET exit and ends with one retires one
        retired = [state[4] for state in block]
        steps = [(after - before, first, second) for before, after, first, second
                 in zip(retired, retired[1:], exits, exits[1:])]
        assert all(delta == 1 for delta, first, second in steps
                   if first == second == ExitReason.BUDGET), steps


def test_the_count_before_a_mid_block_fault_is_the_instructions_before_it(monkeypatch):
    """Straight-line code to the #PF: 6 set-up instructions, 5 loop iterations of 8, 2 adds, the
    MMIO read, 5 more: 53 retired when the engine stops at the faulting load."""
    monkeypatch.setenv("CETVM_BUDGET_GRANULARITY", "block")
    m = Machine("exits")
    m.vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, 1 << Vector.PF)
    m.vcpu.rip = m.sym("case_midblock")
    exit_ = m.vcpu.run()
    assert exit_.reason == ExitReason.MMIO and m.vcpu.instructions_retired == 6 + 5 * 8 + 2
    exit_.mmio.data = MMIO_VALUE
    exit_ = m.vcpu.run()
    assert exit_.reason == ExitReason.EXCEPTION and exit_.rip == m.sym("midblock_pf")
    assert m.vcpu.instructions_retired == 6 + 5 * 8 + 2 + 1 + 5
