"""The native hook's short path gives way to the general path exactly when it must.

The short path (cetfast_block_hook) only runs with the tracker IDLE and SUPPRESS clear, a cached
shadow-stack page and a front-cache hit; these tests warm the front cache up first, so the
state changes below hit it, and compare every result with the Python reference.
"""

from __future__ import annotations

import json

import pytest

from cetvm.arch import CetCtl, CpError, Vector
from cetvm.cpu.native import native_available
from rawharness import SSP_TOP, RawHarness, call_loop_code

pytestmark = pytest.mark.skipif(not native_available(), reason="native CET fast path not built "
                                "(python -m cetvm.cpu.native.build)")


def warm_then(path: str, cpl: int, change, guest=None, iterations: int = 5):
    """Run 3 iterations (every block cached), apply ``change(harness)``, run ``iterations`` more."""
    harness = RawHarness(guest or call_loop_code(), cpl=cpl, path=path)
    assert harness.run(3).fault is None
    change(harness)
    return harness.run(iterations)


def ctl_name(cpl: int) -> str:
    return "u_cet" if cpl == 3 else "s_cet"


@pytest.mark.parametrize("cpl", [0, 3])
def test_tracker_armed_in_the_msr_faults_at_the_next_block_without_endbr(cpl):
    def arm(h):
        setattr(h.cet, ctl_name(cpl), getattr(h.cet, ctl_name(cpl)) | CetCtl.TRACKER)

    py, nat = (warm_then(path, cpl, arm) for path in ("python", "native"))
    assert nat.fault is not None and nat.fault.vector == Vector.CP and nat.fault.error_code == CpError.ENDBRANCH
    for name in ("rip", "rsp", "rcx", "ssp", "cet_ctl", "fault", "shadow_stack"):
        assert getattr(nat, name) == getattr(py, name), name


@pytest.mark.parametrize("cpl", [0, 3])
def test_suppressed_tracker_lets_one_indirect_call_through_then_endbr_clears_it(cpl):
    def suppress(h):
        setattr(h.cet, ctl_name(cpl), getattr(h.cet, ctl_name(cpl)) | CetCtl.SUPPRESS)

    results = [warm_then(path, cpl, suppress) for path in ("python", "native")]
    py, nat = results
    assert nat.fault is None and nat.rcx == 0 and nat.ssp == SSP_TOP
    assert not nat.cet_ctl & (CetCtl.SUPPRESS | CetCtl.TRACKER)
    for name in ("rip", "rsp", "ssp", "cet_ctl", "shadow_stack"):
        assert getattr(nat, name) == getattr(py, name), name


@pytest.mark.parametrize("cpl", [0, 3])
def test_ssp_moved_by_software_is_followed_by_the_next_push(cpl):
    # WRSS/RSTORSSP-style SSP change between runs: the next CALL must push at the new SSP
    def move(h):
        h.cet.ssp = SSP_TOP - 0x100

    py, nat = (warm_then(path, cpl, move) for path in ("python", "native"))
    assert nat.fault is None and nat.ssp == SSP_TOP - 0x100
    assert nat.shadow_stack == py.shadow_stack and nat.shadow_stack[0xF00 - 8:0xF00] != bytes(8)


def test_bench_reports_ring3_with_user_shadow_stacks(capsys):
    from cetvm.arch import Msr
    from cetvm.cli.bench import SHADOW_STACK, make_vcpu, measure
    from cetvm.cli.main import main

    vcpu = make_vcpu(50, cet=True, cet_path="native", cpl=3)
    assert vcpu.cpl == 3 and vcpu.msr(Msr.IA32_S_CET) == 0 and vcpu.msr(Msr.IA32_U_CET) & CetCtl.SH_STK_EN
    exit_ = vcpu.run()
    assert exit_.exception is not None and exit_.exception.vector == Vector.GP  # the final HLT at CPL 3
    assert vcpu.reg("rdx") == 50 and vcpu.ssp == SHADOW_STACK + 0x1000
    assert measure(100, cet=True, cet_path="native", cpl=3) > 0
    assert main(["bench", "--json", "--iterations", "100", "--repeats", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cet_on_native_ring3_mips"] > 0 and doc["cet_off_ring3_mips"] > 0
    assert doc["native_share_ring3"] == pytest.approx(doc["cet_on_native_ring3_mips"] / doc["cet_off_ring3_mips"],
                                                      rel=1e-2)
    assert main(["bench", "--repeats", "0"]) == 2
