"""The native CET block hook against the Python reference (on_block_start) on a raw Unicorn guest.

Every test runs the same guest on both paths and compares the architectural results: RIP, RSP,
RCX, SSP, U_CET/S_CET, the fault and the guest's shadow-stack page (the native path has no
private copy of the shadow stack: what it pushes must be in guest memory).
"""

from __future__ import annotations

import struct

import pytest
from unicorn.x86_const import UC_X86_REG_RBX, UC_X86_REG_RSI

from cetvm.arch import CetCtl, CpError, PfErr, Vector
from cetvm.cpu.native import native_available
from rawharness import (
    DATA, PAGE, PT, SHADOW_STACK, SSP_TOP, STACK, STACK_PAGES, RawHarness, call_loop_code, mixed_transfers_code,
)

pytestmark = pytest.mark.skipif(not native_available(), reason="native CET fast path not built "
                                "(python -m cetvm.cpu.native.build)")

STACK_TOP = STACK + STACK_PAGES * PAGE


def run_both(guest, iterations, cpl, **kw):
    results = []
    for path in ("python", "native"):
        harness = RawHarness(guest, cpl=cpl, path=path, **kw)
        results.append((harness, harness.run(iterations)))
    return results


def assert_same(py, nat):
    for name in ("rip", "rsp", "rcx", "ssp", "cet_ctl", "fault", "shadow_stack"):
        assert getattr(nat, name) == getattr(py, name), name


@pytest.mark.parametrize("cpl", [0, 3])
@pytest.mark.parametrize("direct_ram", [True, False])
def test_call_loop_runs_identically_and_leaves_returns_in_guest_memory(cpl, direct_ram):
    guest = call_loop_code()
    (_, py), (h, nat) = run_both(guest, 40, cpl, direct_ram=direct_ram)
    assert_same(py, nat)
    assert nat.fault is None and nat.rcx == 0 and nat.rip == guest.end
    assert nat.ssp == SSP_TOP and nat.rsp == STACK_TOP
    # the last push (call rax) left its return address in the guest's shadow-stack page
    last = struct.unpack_from("<Q", nat.shadow_stack, PAGE - 8)[0]
    assert last == guest.addr("call_rax") + 2
    assert h.native.stats["handovers"] == 0
    if not direct_ram:
        assert h.native.stats["slow_mem"] > 0


@pytest.mark.parametrize("cpl", [0, 3])
def test_corrupted_return_address_gives_cp_near_ret_at_the_ret(cpl):
    guest = call_loop_code(corrupt_return=True)
    (_, py), (h, nat) = run_both(guest, 5, cpl)
    assert_same(py, nat)
    assert nat.fault.vector == Vector.CP and nat.fault.error_code == CpError.NEAR_RET
    assert nat.rip == guest.addr("f1_ret")          # RIP at the RET
    assert nat.rsp == STACK_TOP - 8                   # RSP unchanged: still points at the bad address
    assert nat.ssp == SSP_TOP - 8                     # SSP unchanged by the failed RET
    stored = struct.unpack("<Q", bytes(h.uc.mem_read(nat.rsp, 8)))[0]
    assert stored == guest.addr("f2")                 # the attacker's target (f2) never ran
    assert h.uc.reg_read(UC_X86_REG_RSI) == 0        # f2 increments RSI
    assert h.native.stats["handovers"] == 1


@pytest.mark.parametrize("cpl", [0, 3])
def test_indirect_call_to_function_without_endbr_gives_cp_endbranch(cpl):
    guest = call_loop_code(f2_endbr=False)
    (_, py), (_, nat) = run_both(guest, 5, cpl)
    assert_same(py, nat)
    assert nat.fault.vector == Vector.CP and nat.fault.error_code == CpError.ENDBRANCH
    assert nat.rip == guest.addr("f2")
    assert nat.ssp == SSP_TOP - 8 and nat.rsp == STACK_TOP - 8
    assert nat.cet_ctl & CetCtl.TRACKER


@pytest.mark.parametrize("cpl", [0, 3])
def test_shadow_stack_on_an_ordinary_page_gives_pf_with_ss(cpl):
    guest = call_loop_code()
    results = []
    for path in ("python", "native"):
        harness = RawHarness(guest, cpl=cpl, path=path)
        harness.cet.ssp = DATA + 0x100
        results.append(harness.run(3))
    py, nat = results
    assert_same(py, nat)
    expected = PfErr.P | PfErr.W | PfErr.SS | (PfErr.U if cpl == 3 else 0)
    assert nat.fault.vector == Vector.PF and nat.fault.error_code == expected
    assert nat.fault.cr2 == DATA + 0xF8
    assert nat.rip == guest.addr("call_f1") and nat.rsp == STACK_TOP and nat.ssp == DATA + 0x100


def test_ibt_only_and_shadow_stack_only_agree_with_reference():
    guest = call_loop_code(f2_endbr=False)
    for kw in ({"ibt": False}, {"shstk": False}):
        (_, py), (_, nat) = run_both(guest, 7, 0, **kw)
        assert_same(py, nat)


def test_translation_flush_makes_page_table_changes_visible():
    guest = call_loop_code()
    harness = RawHarness(guest, cpl=0, path="native")
    assert harness.run(3).fault is None
    # make the shadow-stack page an ordinary writable page: not a shadow-stack page any more
    index = SHADOW_STACK // PAGE
    pte = struct.unpack("<Q", bytes(harness.uc.mem_read(PT + index * 8, 8)))[0]
    harness.uc.mem_write(PT + index * 8, struct.pack("<Q", pte | 0x2))
    harness.native.flush_translations()
    result = harness.run(3)
    assert result.fault is not None and result.fault.vector == Vector.PF
    assert result.fault.error_code & PfErr.SS


@pytest.mark.parametrize("tlb_fill", [False, True])
def test_paging_off_guest_agrees_and_tlb_fill_keeps_it_running(tlb_fill):
    guest = call_loop_code(corrupt_return=True)
    (_, py), (h, nat) = run_both(guest, 3, 0, paging=False, tlb_fill=tlb_fill)
    assert_same(py, nat)
    assert nat.fault.vector == Vector.CP and nat.fault.error_code == CpError.NEAR_RET
    guest = call_loop_code()
    (_, py), (_, nat) = run_both(guest, 30, 0, paging=False, tlb_fill=tlb_fill)
    assert_same(py, nat)
    assert nat.fault is None and nat.rcx == 0 and nat.ssp == SSP_TOP


def test_tlb_fill_guest_can_still_modify_its_own_code():
    """A page that was executed stays writable (self-modifying code keeps working)."""
    guest = call_loop_code()
    harness = RawHarness(guest, cpl=0, path="off", paging=False, tlb_fill=True)
    assert harness.run(10).rcx == 0
    # patch f1's "add rbx, 1" into "add rbx, 2" from the host and run again: the engine sees it
    harness.uc.mem_write(guest.addr("f1") + 7, b"\x02")
    harness.uc.ctl_remove_cache(guest.addr("f1"), guest.addr("f1") + 16)
    harness.uc.reg_write(UC_X86_REG_RBX, 0)
    assert harness.run(10).rcx == 0
    assert harness.uc.reg_read(UC_X86_REG_RBX) == 20


@pytest.mark.parametrize("cpl", [0, 3])
def test_every_terminator_kind_agrees(cpl):
    """CALL disp 0 (no push), NOTRACK CALL, RET imm16, JMP reg: same state after many iterations."""
    guest = mixed_transfers_code()
    (_, py), (_, nat) = run_both(guest, 25, cpl)
    assert_same(py, nat)
    assert nat.fault is None and nat.rcx == 0
    # had the disp-0 CALL pushed a shadow-stack entry, f3's RET would have mismatched (#CP)
    assert nat.ssp == SSP_TOP and nat.rsp == STACK_TOP


@pytest.mark.parametrize("no_track_en", [False, True])
def test_notrack_call_to_a_function_without_endbr(no_track_en):
    guest = mixed_transfers_code(f2_endbr=False)
    extra = CetCtl.NO_TRACK_EN if no_track_en else 0
    (_, py), (_, nat) = run_both(guest, 4, 0, extra_ctl=extra)
    assert_same(py, nat)
    if no_track_en:
        assert nat.fault is None and nat.rcx == 0
    else:
        assert nat.fault.error_code == CpError.ENDBRANCH and nat.rip == guest.addr("f2")


def test_indirect_jump_to_a_target_without_endbr():
    guest = mixed_transfers_code(target_endbr=False)
    (_, py), (_, nat) = run_both(guest, 4, 3)
    assert_same(py, nat)
    assert nat.fault.vector == Vector.CP and nat.fault.error_code == CpError.ENDBRANCH
    assert nat.rip == guest.addr("tgt")
