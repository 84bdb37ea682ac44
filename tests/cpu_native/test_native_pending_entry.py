"""The pending terminator and the short path's cached state stay right when their sources change.

The native hook keeps the pending terminator as a pointer to the front-cache entry of the block
that ran last, and folds the mode and CET control into per-kind masks (``refresh_fast`` in
cetfast.c). These tests change what those depend on — the front cache (eviction by a colliding
block, invalidation), the privilege of the shadow-stack access — and compare with the Python
reference path.
"""

from __future__ import annotations

import struct

import pytest

from cetvm.arch import CetCtl, Vector
from cetvm.cpu.native import PagingKind, native_available
from rawharness import ENDBR64, PML4, SSP_TOP, GuestCode, RawHarness, call_loop_code

pytestmark = pytest.mark.skipif(not native_available(), reason="native CET fast path not built "
                                "(python -m cetvm.cpu.native.build)")


def colliding_calls_code() -> GuestCode:
    """loop: call f; call g; dec rcx; jnz loop — with f and g 0x101 and 0x202 bytes after the
    loop, so the three blocks share a slot of a 256-entry front cache indexed by
    ``addr ^ addr >> 8`` (each call and each return evicts the pending block's entry)."""
    f_off, g_off = 0x101, 0x202
    body = bytearray()
    body += b"\xe8" + struct.pack("<i", f_off - 5)                  # call f
    body += b"\xe8" + struct.pack("<i", g_off - 10)                 # call g
    body += b"\x48\xff\xc9"                                         # dec rcx
    body += b"\x75" + struct.pack("<b", -(len(body) + 2))          # jnz loop
    end = len(body)
    code = bytearray(g_off + 16)
    code[:end] = body
    code[end] = 0xF4
    code[f_off:f_off + 9] = ENDBR64 + b"\x48\x83\xc3\x01" + b"\xc3"     # endbr64; add rbx, 1; ret
    code[g_off:g_off + 9] = ENDBR64 + b"\x48\x83\xc6\x01" + b"\xc3"     # endbr64; add rsi, 1; ret
    return GuestCode(bytes(code), {"loop": 0, "end": end, "f2": g_off})


@pytest.mark.parametrize("cpl", [0, 3])
def test_pending_call_survives_eviction_of_its_front_cache_entry(cpl):
    results = {path: RawHarness(colliding_calls_code(), cpl=cpl, path=path).run(50) for path in ("python", "native")}
    py, nat = results["python"], results["native"]
    assert nat.fault is None and nat.rcx == 0 and nat.ssp == SSP_TOP
    for name in ("rip", "rsp", "ssp", "cet_ctl", "shadow_stack"):
        assert getattr(nat, name) == getattr(py, name), name


def test_pending_terminator_and_its_block_survive_invalidation():
    harness = RawHarness(call_loop_code(), path="native")
    assert harness.run(3).fault is None
    before = (harness.blocks.prev, harness.blocks.prev_block_start)
    assert before[1] != 0
    harness.blocks.invalidate()
    assert (harness.blocks.prev, harness.blocks.prev_block_start) == before
    result = harness.run(3)  # every block is classified again
    assert result.fault is None and result.ssp == SSP_TOP and harness.native.stats["handovers"] == 0


def test_privilege_change_drops_the_cached_shadow_stack_page():
    # Warm up at CPL 0 (the supervisor shadow-stack page is cached), then run the same code as if
    # at CPL 3 with user shadow stacks: the push is a user access to a supervisor page, #PF.
    def run(path: str):
        harness = RawHarness(call_loop_code(), cpl=0, path=path)
        assert harness.run(3).fault is None
        harness.cpl = 3
        harness.cet.u_cet = CetCtl.SH_STK_EN | CetCtl.ENDBR_EN
        if harness.native is not None:
            harness.native.sync_mode(cpl=3, long_mode=True, cr4_cet=True, paging=PagingKind.FOUR_LEVEL, cr3=PML4)
        return harness.run(3)

    py, nat = run("python"), run("native")
    assert py.fault is not None and py.fault.vector == Vector.PF
    assert nat.fault == py.fault and (nat.rip, nat.ssp, nat.rcx) == (py.rip, py.ssp, py.rcx)
