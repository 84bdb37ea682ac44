"""The Vcpu on the native CET path and on the Python path: identical architectural end states.

tests/cpu runs every CPU test on both paths (its conftest); here the complete state after real
guests (guests/cpu, via tests/cpu/harness.py) is compared field by field — registers, SSP, the
CET MSRs, the guest's results page and all its shadow-stack pages — and the native path is
checked to have done the work itself (its block table filled, no unexpected hand-overs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpu"))
from harness import AGREEMENT_CASES as CASES, SHADOW_STACK_PAGES, L, PAGE, Machine, Options  # noqa: E402

from cetvm.arch import CetCtl, Msr, Vector  # noqa: E402
from cetvm.cpu.native import native_available  # noqa: E402

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(not native_available(), reason="native CET fast path not built")]



def end_state(machine: Machine, exit_) -> dict:
    vcpu = machine.vcpu
    return {
        "exit": (exit_.reason, exit_.rip),
        "regs": vcpu.get_regs(),
        "ssp": vcpu.ssp,
        "cet_msrs": [vcpu.msr(m) for m in (Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL3_SSP)],
        "results": vcpu.read_phys(L["RESULTS_ADDR"], 0x500),
        "shadow_stacks": [vcpu.read_phys(L[name], PAGE) for name in SHADOW_STACK_PAGES],
    }


@pytest.mark.parametrize(("guest", "case", "options"), CASES, ids=[f"{g}-{c}" for g, c, _ in CASES])
def test_native_and_python_paths_end_in_the_same_state(monkeypatch, guest, case, options):
    states = {}
    for path in ("python", "native"):
        monkeypatch.setenv("CETVM_CET_PATH", path)
        machine = Machine(guest, options)
        assert machine.vcpu.cet_path == path
        states[path] = end_state(machine, machine.run_case(case))
        if path == "native":
            native = machine.vcpu.native
            assert machine.vcpu.block_count > 0
            assert native.stats["misses"] >= machine.vcpu.block_count
    for key in states["python"]:
        assert states["native"][key] == states["python"][key], key


def test_native_path_raises_cp_near_ret_itself_through_a_handover(monkeypatch):
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    machine = Machine("shstk_ret")
    machine.run_case("case_corrupt_ret")
    assert machine.vcpu.native.stats["handovers"] == 1
    r = machine.results
    assert (r.vector, r.rip, r.rsp) == (Vector.CP, machine.sym("bad_ret"), L["KSTACK_TOP"] - 8)
