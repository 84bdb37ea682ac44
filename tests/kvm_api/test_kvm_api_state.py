"""vCPU state save in one Kvm, restore in a fresh one, continue: same results; refusal of
incomplete states (cetvm.kvm.state)."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import Guest, fresh_copy, make_guest

from cetvm import CetvmError
from cetvm.kvm.api import KvmExitReason
from cetvm.kvm.state import restore_vcpu_state, save_vcpu_state


def run_collecting(g: Guest, outs: list[int], stop_after: int | None = None):
    while True:
        run = g.vcpu.run(budget=100_000)
        if run.exit_reason is not KvmExitReason.IO:
            return run
        outs.append(run.io.data)
        if stop_after is not None and len(outs) == stop_after:
            return run


def _saved_midway(steps: int = 7):
    g = make_guest("progress")
    outs: list[int] = []
    run_collecting(g, outs, stop_after=steps)
    g.vcpu.run(immediate_exit=True)  # complete the OUT before saving
    return g, outs, json.loads(json.dumps(save_vcpu_state(g.vcpu)))


def test_save_restore_in_a_fresh_kvm_gives_the_same_results():
    ref = make_guest("progress")
    ref_outs: list[int] = []
    assert run_collecting(ref, ref_outs).exit_reason is KvmExitReason.HLT
    assert len(ref_outs) == 20

    g, outs, state = _saved_midway()
    assert state["msrs"]["0xda0"] == 0x1800 and state["fpstate_xstate_bv"] & 0x800
    new = fresh_copy(g)
    restore_vcpu_state(new.vcpu, state)
    assert run_collecting(new, outs).exit_reason is KvmExitReason.HLT
    assert outs == ref_outs
    assert (new.slot(0), new.slot(1)) == (ref.slot(0), ref.slot(1))  # SSE and GPR results


def test_restore_refuses_state_without_xss_while_cet_user_in_use():
    g, _, state = _saved_midway()
    broken = copy.deepcopy(state)
    del broken["msrs"]["0xda0"]
    with pytest.raises(CetvmError, match="IA32_XSS"):
        restore_vcpu_state(fresh_copy(g).vcpu, broken)


def test_restore_refuses_missing_cet_msr_and_missing_ssp():
    g, _, state = _saved_midway()
    no_tab = copy.deepcopy(state)
    del no_tab["msrs"]["0x6a8"]
    with pytest.raises(CetvmError, match="IA32_INT_SSP_TAB"):
        restore_vcpu_state(fresh_copy(g).vcpu, no_tab)
    shstk_on = copy.deepcopy(state)
    shstk_on["msrs"]["0x6a2"] = 1  # S_CET.SH_STK_EN
    shstk_on["guest_ssp"] = None
    with pytest.raises(CetvmError, match="SSP"):
        restore_vcpu_state(fresh_copy(g).vcpu, shstk_on)
