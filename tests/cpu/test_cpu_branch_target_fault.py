"""A branch whose target faults before its block starts (guests/cpu/target_fault.S).

EngineStops.on_interrupt applies the pending terminator with apply_terminator alone: the indirect
CALL's shadow-stack push and IBT arming happen before the fetch #PF is delivered, and the
ENDBRANCH check is made only when the guest really reaches the target (after its #PF handler
mapped the page and returned there with IRETQ) — never on the bytes of a page that faulted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import L, PAGE, Machine, Options  # noqa: E402

from cetvm.arch import CetCtl, CpError, PfErr, Vector  # noqa: E402
from cetvm.cpu.exits import ExitReason  # noqa: E402

U_CET = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)
USER_SS_TOP = L["SSTK_USER"] + PAGE
#: R_GUEST slots written by target_fault.S (index = byte offset / 8)
SSP_BEFORE, RETURNED, SSP_AFTER, PF_CR2, PF_ERROR, PF_RIP, PF_PL3_SSP, PF_SS_TOP, PF_U_CET, PF_COUNT = range(10)


def run(case: str) -> Machine:
    """Run ``case`` to its HLT (each case ends halted in a handler; a budget bounds a bad run)."""
    m = Machine("target_fault", Options(u_cet=U_CET))
    m.vcpu.rip = m.sym(case)
    exit_ = m.vcpu.run(20_000)
    assert exit_.reason == ExitReason.HLT, exit_
    return m


@pytest.mark.parametrize("case,target", [("case_target_with_endbr", "target_endbr"),
                                         ("case_target_without_endbr", "target_noendbr")])
def test_call_effects_are_applied_before_the_target_fetch_fault(case, target):
    m = run(case)
    g = m.results.guest
    assert g[PF_COUNT] == 1
    assert (g[PF_CR2], g[PF_RIP]) == (m.sym(target), m.sym(target))
    assert g[PF_ERROR] == PfErr.U | PfErr.I                    # user instruction fetch, not present
    assert g[SSP_BEFORE] == USER_SS_TOP
    assert g[PF_PL3_SSP] == USER_SS_TOP - 8                    # the CALL pushed once ...
    assert g[PF_SS_TOP] == m.sym("after_call")                 # ... its return address
    assert g[PF_U_CET] & CetCtl.TRACKER                        # armed, target not checked yet


def test_target_with_endbr_runs_and_returns_through_the_shadow_stack():
    m = run("case_target_with_endbr")
    r = m.results
    assert (r.count, r.vector, r.rip) == (1, Vector.GP, m.sym("user_hlt"))   # only the final HLT
    assert r.guest[RETURNED] == 1 and r.guest[SSP_AFTER] == USER_SS_TOP
    assert not m.vcpu.cet.u_cet & CetCtl.TRACKER


def test_target_without_endbr_is_cp_endbranch_when_reached_not_at_the_fault():
    m = run("case_target_without_endbr")
    r = m.results
    assert r.guest[PF_COUNT] == 1                                # the #PF came first ...
    assert (r.count, r.vector, r.error, r.rip) == (1, Vector.CP, CpError.ENDBRANCH, m.sym("target_noendbr"))
    assert r.guest[RETURNED] == 0
