"""KVM's emulator and CET (cetvm.kvm.emulate): which instructions KVM 6.18 refuses to emulate
while CET is on, and the force-emulation prefix."""

import pytest

from cetvm.arch import Cr0, Cr4
from cetvm.arch.msr import CetCtl
from cetvm.cpu.decode import decode_one
from cetvm.kvm.emulate import (
    CetGuard,
    KVM_EMULATE_PREFIX,
    cet_guards,
    emulation_blocked_by_cet,
    emulator_lacks,
    has_force_emulation_prefix,
)

S, I = CetGuard.SHADOW_STACK, CetGuard.INDIRECT_BRANCH
CASES = [
    # (bytes, guards) — KVM's opcode-table ShadowStack / IndirBrnTrk flags
    (b"\xe8\x00\x00\x00\x00", S),          # call rel32
    (b"\xff\xd0", S | I),                  # call *%rax
    (b"\xff\x18", S | I),                  # lcall *(%rax)
    (b"\xc3", S),                          # ret
    (b"\xc2\x0a\x00", S),                  # ret $10
    (b"\xcb", S),                          # lret
    (b"\x48\xcb", S),                      # lretq
    (b"\xca\x08\x00", S),                  # lret $8
    (b"\xcd\x80", S),                      # int $0x80
    (b"\x48\xcf", S),                      # iretq
    (b"\x0f\x05", S | I),                  # syscall
    (b"\x0f\x34", S | I),                  # sysenter
    (b"\x0f\x35", S),                      # sysexit
    (b"\xff\xe0", I),                      # jmp *%rax
    (b"\xff\x28", I),                      # ljmp *(%rax)
    (b"\x48\xff\x2c\x24", I),              # ljmpq *(%rsp)
    (b"\xeb\x00", CetGuard.NONE),          # jmp rel8
    (b"\xe9\x00\x00\x00\x00", CetGuard.NONE),
    (b"\xcc", CetGuard.NONE),              # int3: no flag in KVM's table
    (b"\x48\x8d\x05\x00\x00\x00\x00", CetGuard.NONE),  # lea
    (b"\x50", CetGuard.NONE),              # push %rax
    (b"\x0f\x07", CetGuard.NONE),          # sysret
]


@pytest.mark.parametrize("code, guards", CASES, ids=[c.hex() for c, _ in CASES])
def test_cet_guards_follow_kvms_opcode_table(code, guards):
    assert cet_guards(decode_one(code, 0x1000)) == guards


@pytest.mark.parametrize("u_cet, s_cet", [(CetCtl.SH_STK_EN, 0), (0, CetCtl.SH_STK_EN)])
def test_shadow_stack_in_either_msr_blocks_shadow_stack_instructions(u_cet, s_cet):
    assert emulation_blocked_by_cet(S, Cr4.CET, u_cet, s_cet)
    assert not emulation_blocked_by_cet(I, Cr4.CET, u_cet, s_cet)


@pytest.mark.parametrize("u_cet, s_cet", [(CetCtl.ENDBR_EN, 0), (0, CetCtl.ENDBR_EN)])
def test_endbr_en_in_either_msr_blocks_ibt_instructions(u_cet, s_cet):
    assert emulation_blocked_by_cet(I, Cr4.CET, u_cet, s_cet)
    assert emulation_blocked_by_cet(S | I, Cr4.CET, u_cet, s_cet)
    assert not emulation_blocked_by_cet(S, Cr4.CET, u_cet, s_cet)


def test_nothing_is_blocked_without_cr4_cet():
    every = CetCtl.SH_STK_EN | CetCtl.ENDBR_EN
    assert not emulation_blocked_by_cet(S | I, 0, every, every)


def test_unguarded_instructions_always_emulate():
    every = CetCtl.SH_STK_EN | CetCtl.ENDBR_EN
    assert not emulation_blocked_by_cet(CetGuard.NONE, Cr4.CET, every, every)


def test_iret_emulates_only_in_real_mode():
    iretq = decode_one(b"\x48\xcf", 0x1000)
    assert emulator_lacks(iretq, Cr0.PE)
    assert not emulator_lacks(iretq, 0)
    assert not emulator_lacks(decode_one(b"\x90", 0x1000), Cr0.PE)


def test_the_prefix_is_ud2_kvm():
    assert KVM_EMULATE_PREFIX == bytes.fromhex("0f0b") + b"kvm"
    assert has_force_emulation_prefix(KVM_EMULATE_PREFIX + b"\x90")
    assert not has_force_emulation_prefix(b"\x0f\x0bkv")
    assert not has_force_emulation_prefix(b"\x0f\x0bKVM")
