"""The per-block state machine and terminator classification (DESIGN "The CPU engine")."""

import iced_x86
import pytest

from cetvm.arch import ENDBR64, CetCtl, CpError, Msr, PfErr, Vector
from cetvm.cpu.cet.ibt import ibt_arm_on_transfer
from cetvm.cpu.cet.transfer import (
    CONTINUE,
    BlockAction,
    Terminator,
    TerminatorInfo,
    classify_terminator,
    on_block_start,
)
from fake_machine import machine_with_shadow_stacks

USS = 0x7000_0000
BODY = bytes.fromhex("4889e5c3")  # mov rbp, rsp; ret — not an ENDBR


def decode(hexbytes: str, ip: int = 0x401000, bitness: int = 64) -> iced_x86.Instruction:
    return iced_x86.Decoder(bitness, bytes.fromhex(hexbytes), ip=ip).decode()


@pytest.mark.parametrize(
    "code,kind,imm16",
    [
        ("e810000000", Terminator.CALL_DIRECT, 0),
        ("e800000000", Terminator.CALL_DIRECT_DISP0, 0),
        ("ffd0", Terminator.CALL_INDIRECT, 0),
        ("ff5008", Terminator.CALL_INDIRECT, 0),
        ("3effd0", Terminator.CALL_INDIRECT_NOTRACK, 0),
        ("ffe0", Terminator.JMP_INDIRECT, 0),
        ("3effe0", Terminator.JMP_INDIRECT_NOTRACK, 0),
        ("3e2effe0", Terminator.JMP_INDIRECT, 0),  # last segment prefix is CS: not NOTRACK
        ("c3", Terminator.RET, 0),
        ("c21000", Terminator.RET_IMM, 16),
        ("0f05", Terminator.OTHER_EMULATED, 0),  # SYSCALL (iced: FlowControl.CALL)
        ("48cf", Terminator.OTHER_EMULATED, 0),  # IRETQ (iced: FlowControl.RETURN)
        ("480f07", Terminator.OTHER_EMULATED, 0),  # SYSRETQ
        ("cb", Terminator.OTHER_EMULATED, 0),  # RETF
        ("ff1c2500000000", Terminator.OTHER_EMULATED, 0),  # far CALL m16:32
        ("cd80", Terminator.OTHER_EMULATED, 0),
        ("e9aaaaaaaa", Terminator.FALLTHROUGH, 0),
        ("74aa", Terminator.FALLTHROUGH, 0),
        ("90", Terminator.FALLTHROUGH, 0),
    ],
)
def test_classify_terminator(code, kind, imm16):
    info = classify_terminator(decode(code))
    assert info == TerminatorInfo(kind, 0x401000, len(code) // 2, imm16)


def test_classify_32bit_call_disp0():
    assert classify_terminator(decode("e800000000", bitness=32)).kind == Terminator.CALL_DIRECT_DISP0


def user_machine(ibt=False, extra=CetCtl(0)):
    m = machine_with_shadow_stacks(cpl=3)
    if ibt:
        m.msrs[Msr.IA32_U_CET] |= CetCtl.ENDBR_EN | extra
    return m


def call_then_ret(m, call_hex, target, target_bytes, ret_to, rsp=0x7FFF_0000):
    call = classify_terminator(decode(call_hex))
    d1 = on_block_start(m, call, target, rsp - 8, target_bytes)
    ret = classify_terminator(decode("c3", ip=target + 0x20))
    d2 = on_block_start(m, ret, ret_to, rsp, b"\x90")
    return d1, d2


def test_direct_call_and_matching_ret_continue():
    m = user_machine()
    top = m.ssp
    call = classify_terminator(decode("e8fb0f0000"))  # call 0x402000
    assert on_block_start(m, call, 0x402000, 0x7FFF_FFF8, BODY) is CONTINUE
    assert m.ssp == top - 8 and m.peek(top - 8) == 0x401005
    ret = classify_terminator(decode("c3", ip=0x402003))
    assert on_block_start(m, ret, 0x401005, 0x8000_0000, b"\x90") is CONTINUE
    assert m.ssp == top


def test_ret_to_overwritten_address_is_cp1_rolled_back_to_the_ret():
    m = user_machine()
    on_block_start(m, classify_terminator(decode("e8fb0f0000")), 0x402000, 0x7FFF_FFF8, BODY)
    ssp = m.ssp
    ret = classify_terminator(decode("c21800", ip=0x402010))  # ret 24
    d = on_block_start(m, ret, 0x41414141, 0x8000_0018, b"\xcc")
    assert d.action == BlockAction.FAULT
    assert (d.fault.vector, d.fault.error_code) == (Vector.CP, CpError.NEAR_RET)
    assert d.rip == 0x402010
    assert d.rsp == 0x8000_0018 - 8 - 24  # RSP points at the corrupted return address again
    assert m.ssp == ssp


def test_ret_rollback_in_32bit_mode_uses_4_bytes():
    m = machine_with_shadow_stacks(cpl=3, long_mode=False)
    on_block_start(m, TerminatorInfo(Terminator.CALL_DIRECT, 0x8048000, 5), 0x8049000, 0xBFFF_FFFC, BODY)
    d = on_block_start(m, TerminatorInfo(Terminator.RET, 0x8049010, 1), 0x1234, 0xC000_0000, b"\x90")
    assert d.rsp == 0xBFFF_FFFC and d.rip == 0x8049010


def test_call_disp0_pushes_nothing_so_pop_ret_idiom_is_balanced():
    m = user_machine()
    top = m.ssp
    assert on_block_start(m, classify_terminator(decode("e800000000")), 0x401005, 0x7FF8, BODY) is CONTINUE
    assert m.ssp == top


def test_call_with_shadow_stack_overflow_faults_at_the_call():
    m = user_machine()
    m.ssp = USS  # the page below is not a shadow-stack page
    call = classify_terminator(decode("e8fb0f0000"))
    d = on_block_start(m, call, 0x402000, 0x7FFF_FFF8, BODY)
    assert d.action == BlockAction.FAULT
    assert d.fault.vector == Vector.PF and d.fault.error_code & PfErr.SS
    assert (d.rip, d.rsp) == (0x401000, 0x8000_0000)
    assert m.ssp == USS


def test_indirect_call_to_endbr64_continues():
    m = user_machine(ibt=True)
    d, _ = call_then_ret(m, "ffd0", 0x402000, ENDBR64 + BODY, 0x401002)
    assert d is CONTINUE
    assert not m.msrs[Msr.IA32_U_CET] & CetCtl.TRACKER


def test_indirect_call_without_endbr_is_cp3_at_target_after_the_call():
    m = user_machine(ibt=True)
    top = m.ssp
    d = on_block_start(m, classify_terminator(decode("ffd0")), 0x402000, 0x7FFF_FFF8, BODY)
    assert d.action == BlockAction.FAULT
    assert (d.fault.vector, d.fault.error_code) == (Vector.CP, CpError.ENDBRANCH)
    assert d.rip == 0x402000 and d.rsp is None
    assert m.ssp == top - 8  # the CALL completed


def test_indirect_jmp_without_endbr_is_cp3():
    m = user_machine(ibt=True)
    d = on_block_start(m, classify_terminator(decode("ffe0")), 0x402000, 0x7FFF_FFF8, BODY)
    assert d.fault.error_code == CpError.ENDBRANCH


@pytest.mark.parametrize("no_track_en,faults", [(False, True), (True, False)])
def test_notrack_jmp(no_track_en, faults):
    m = user_machine(ibt=True, extra=CetCtl.NO_TRACK_EN if no_track_en else CetCtl(0))
    d = on_block_start(m, classify_terminator(decode("3effe0")), 0x402000, 0x7FFF_FFF8, BODY)
    assert (d.action == BlockAction.FAULT) is faults


def test_direct_branches_and_returns_need_no_endbr():
    m = user_machine(ibt=True)
    assert on_block_start(m, classify_terminator(decode("e8fb0f0000")), 0x402000, 0x7FF8, BODY) is CONTINUE
    assert on_block_start(m, classify_terminator(decode("c3", ip=0x402003)), 0x401005, 0x8000, BODY) is CONTINUE


def test_block_after_emulated_transfer_is_checked_when_tracker_armed():
    m = machine_with_shadow_stacks(cpl=0)
    m.msrs[Msr.IA32_S_CET] |= CetCtl.ENDBR_EN
    ibt_arm_on_transfer(m, 0)  # e.g. SYSCALL delivered by the engine
    d = on_block_start(m, TerminatorInfo(Terminator.OTHER_EMULATED, 0x401000, 2), 0xFFFF_FFFF_8100_0000, 0x1000, BODY)
    assert d.fault.error_code == CpError.ENDBRANCH
    ibt_arm_on_transfer(m, 0)
    assert on_block_start(m, None, 0xFFFF_FFFF_8100_0000, 0x1000, ENDBR64) is CONTINUE


def test_shadow_stacks_off_means_no_checks():
    m = machine_with_shadow_stacks(cpl=3)
    m.msrs[Msr.IA32_U_CET] = 0
    top = m.ssp
    assert on_block_start(m, TerminatorInfo(Terminator.CALL_DIRECT, 0x1000, 5), 0x2000, 0x7FF8, BODY) is CONTINUE
    assert on_block_start(m, TerminatorInfo(Terminator.RET, 0x2000, 1), 0xBAD, 0x8000, BODY) is CONTINUE
    assert m.ssp == top


def test_deep_recursion_uses_consecutive_entries():
    m = user_machine()
    top = m.ssp
    call = TerminatorInfo(Terminator.CALL_DIRECT, 0x401000, 5)
    for _ in range(100):
        assert on_block_start(m, call, 0x401000, 0, BODY) is CONTINUE
    assert m.ssp == top - 800
    ret = TerminatorInfo(Terminator.RET, 0x401010, 1)
    for _ in range(100):
        assert on_block_start(m, ret, 0x401005, 0, BODY) is CONTINUE
    assert m.ssp == top


def test_call_whose_target_fetch_faults_still_pushes_and_target_is_checked_on_return():
    from cetvm.cpu.cet.transfer import apply_terminator

    m = user_machine(ibt=True)
    top = m.ssp
    call = classify_terminator(decode("ffd0"))
    # target page not present: the engine applies the CALL, then delivers the fetch #PF
    assert apply_terminator(m, call, 0x402000, 0x7FF8) is CONTINUE
    assert m.ssp == top - 8
    assert m.msrs[Msr.IA32_U_CET] & CetCtl.TRACKER  # stays armed across the #PF
    # the kernel maps the page and IRETs to the target: it still needs an ENDBR64
    d = on_block_start(m, TerminatorInfo(Terminator.OTHER_EMULATED, 0xFFFF_8000_0000_0000, 2), 0x402000, 0x7FF8, BODY)
    assert d.fault.error_code == CpError.ENDBRANCH
