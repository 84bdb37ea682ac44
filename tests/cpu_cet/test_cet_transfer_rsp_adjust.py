"""on_block_start with ``rsp=None``: the engine reads RSP only when a CALL/RET must be rolled back.

The Python block hook passes None and applies ``BlockDecision.rsp_adjust`` to the live RSP; the
roll-back must be the same as with an explicit RSP (decision.rsp).
"""

import pytest

from cetvm.arch import CetCtl, CpError, Msr, PfErr, Vector
from cetvm.cpu.cet.transfer import CONTINUE, BlockAction, Terminator, TerminatorInfo, on_block_start
from fake_machine import machine_with_shadow_stacks

BODY = bytes.fromhex("4889e5c3")  # not an ENDBR
_U64 = (1 << 64) - 1


@pytest.mark.parametrize("long_mode,width", [(True, 8), (False, 4)])
@pytest.mark.parametrize("rsp", [None, 0x8000_0018])
def test_ret_mismatch_rollback_adjust_is_width_plus_imm16(long_mode, width, rsp):
    m = machine_with_shadow_stacks(cpl=3, long_mode=long_mode)
    assert on_block_start(m, TerminatorInfo(Terminator.CALL_DIRECT, 0x401000, 5), 0x402000, rsp, BODY) is CONTINUE
    d = on_block_start(m, TerminatorInfo(Terminator.RET_IMM, 0x402010, 3, 24), 0x41414141, rsp, b"\x90")
    assert d.action == BlockAction.FAULT and (d.fault.vector, d.fault.error_code) == (Vector.CP, CpError.NEAR_RET)
    assert d.rip == 0x402010
    assert d.rsp_adjust == -(width + 24)
    assert d.rsp == (None if rsp is None else (rsp - width - 24) & _U64)


@pytest.mark.parametrize("rsp", [None, 0x7FF8])
def test_call_push_fault_rollback_adjust_is_plus_width(rsp):
    m = machine_with_shadow_stacks(cpl=0)
    m.msrs[Msr.IA32_S_CET] |= int(CetCtl.ENDBR_EN)
    m.ssp = 0x5000_0000  # not a shadow-stack page: the push faults
    d = on_block_start(m, TerminatorInfo(Terminator.CALL_INDIRECT, 0x401000, 2), 0x402000, rsp, BODY)
    assert d.action == BlockAction.FAULT and d.fault.vector == Vector.PF and d.fault.error_code & PfErr.SS
    assert d.rip == 0x401000 and d.rsp_adjust == 8
    assert d.rsp == (None if rsp is None else rsp + 8)
    assert m.ssp == 0x5000_0000
    assert not m.cet_msr(Msr.IA32_S_CET) & CetCtl.TRACKER  # the CALL did not happen: not armed


def test_endbranch_fault_leaves_rsp_alone():
    m = machine_with_shadow_stacks(cpl=0)
    m.msrs[Msr.IA32_S_CET] |= int(CetCtl.ENDBR_EN)
    d = on_block_start(m, TerminatorInfo(Terminator.JMP_INDIRECT, 0x401000, 2), 0x402000, None, BODY)
    assert (d.fault.vector, d.fault.error_code) == (Vector.CP, CpError.ENDBRANCH)
    assert d.rip == 0x402000 and d.rsp is None and d.rsp_adjust == 0
