"""KVM_CAP_X86_USER_SPACE_MSR and KVM_X86_SET_MSR_FILTER through the KVM API, and the non-CET
MSRs KVM handles itself [K Documentation/virt/kvm/api.rst; x86.c kvm_msr_reason,
kvm_msr_allowed, kvm_apic_set_base]. Each guest is a few instructions of machine code:
RDMSR/WRMSR, store EDX:EAX, HLT; its #GP handler records the vector and halts."""

from __future__ import annotations

import struct

import pytest
from conftest import _gate, make_guest

from cetvm.kvm.api import KvmExitReason, KvmMsrExitReason, MsrFilterRange
from cetvm.kvm.errors import KvmIoctlError
from cetvm.kvm.vcpu_run import KVM_MSR_FILTER_READ, KVM_MSR_FILTER_WRITE

CODE, HANDLER = 0x120000, 0x130000
RESULT, FAULT = 0x201000, 0x202000
READ, WRITE, BOTH = KVM_MSR_FILTER_READ, KVM_MSR_FILTER_WRITE, KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
NO_MARK = 0xDEADBEEF


def _imm32(opcode: int, value: int) -> bytes:
    return bytes([opcode]) + struct.pack("<I", value & 0xFFFF_FFFF)


def _store(reg_code: int, addr: int) -> bytes:
    """mov [addr], eax (reg_code 0) / edx (reg_code 2)."""
    return bytes([0x89, 0x04 | reg_code << 3, 0x25]) + struct.pack("<I", addr)


def rdmsr_code(index: int) -> bytes:
    return _imm32(0xB9, index) + b"\x0F\x32" + _store(0, RESULT) + _store(2, RESULT + 4) + b"\xF4"


def wrmsr_code(index: int, value: int) -> bytes:
    return (_imm32(0xB9, index) + _imm32(0xB8, value) + _imm32(0xBA, value >> 32) + b"\x0F\x30"
            + _imm32(0xB8, 0x600D) + _store(0, RESULT) + b"\xF4")


def msr_guest(code: bytes):
    """A long-mode guest running ``code``; #GP writes its vector to FAULT and halts."""
    g = make_guest("cet_msrs")
    g.vm.put_memory(CODE, code)
    g.vm.put_memory(HANDLER, b"\xC7\x04\x25" + struct.pack("<II", FAULT, 13) + b"\xF4")
    g.vm.put_memory(0x5000 + 13 * 16, _gate(HANDLER))
    g.vm.put_memory(RESULT, struct.pack("<Q", NO_MARK))
    g.vm.put_memory(FAULT, struct.pack("<Q", 0))
    regs = g.vcpu.get_regs()
    regs.rip = CODE
    g.vcpu.set_regs(regs)
    return g


def result(g) -> int:
    return struct.unpack("<Q", g.vm.get_memory(RESULT, 8))[0]


def faulted(g) -> bool:
    return struct.unpack("<Q", g.vm.get_memory(FAULT, 8))[0] == 13


def run(g):
    return g.vcpu.run(budget=100_000)  # guest time: each exit takes 1 us of it


UNKNOWN_MSR = 0x4B564D99


def test_unknown_msr_without_the_cap_is_gp_in_the_guest():
    g = msr_guest(rdmsr_code(UNKNOWN_MSR))
    assert run(g).exit_reason is KvmExitReason.HLT
    assert faulted(g) and result(g) == NO_MARK


def test_unknown_msr_read_exits_with_reason_unknown_and_userspace_data_reaches_edx_eax():
    g = msr_guest(rdmsr_code(UNKNOWN_MSR))
    g.vm.enable_cap_user_space_msr(KvmMsrExitReason.UNKNOWN)
    exit_ = run(g)
    assert exit_.exit_reason is KvmExitReason.X86_RDMSR
    assert (exit_.msr.reason, exit_.msr.index, exit_.msr.error) == (KvmMsrExitReason.UNKNOWN, UNKNOWN_MSR, 0)
    exit_.msr.data = 0x1122_3344_5566_7788
    assert run(g).exit_reason is KvmExitReason.HLT
    assert result(g) == 0x1122_3344_5566_7788 and not faulted(g)


def test_unknown_msr_write_exits_with_the_data_and_error_injects_gp():
    g = msr_guest(wrmsr_code(UNKNOWN_MSR, 0xAABB_CCDD_0011_2233))
    g.vm.enable_cap_user_space_msr(KvmMsrExitReason.UNKNOWN)
    exit_ = run(g)
    assert exit_.exit_reason is KvmExitReason.X86_WRMSR and exit_.msr.data == 0xAABB_CCDD_0011_2233
    exit_.msr.error = 1
    assert run(g).exit_reason is KvmExitReason.HLT
    assert faulted(g) and result(g) == NO_MARK


def test_a_write_userspace_accepts_completes_the_instruction():
    g = msr_guest(wrmsr_code(UNKNOWN_MSR, 5))
    g.vm.enable_cap_user_space_msr(KvmMsrExitReason.UNKNOWN)
    assert run(g).exit_reason is KvmExitReason.X86_WRMSR
    assert run(g).exit_reason is KvmExitReason.HLT
    assert result(g) & 0xFFFF_FFFF == 0x600D and not faulted(g)


def test_filter_denies_writes_only_and_routes_them_to_userspace():
    pat = 0x0007_0406_0007_0406
    g = msr_guest(wrmsr_code(0x277, 0x0606_0606_0606_0606))
    g.vm.enable_cap_user_space_msr(KvmMsrExitReason.FILTER)
    g.vm.set_msr_filter([MsrFilterRange(WRITE, 0x277, 1, b"\x00")])
    exit_ = run(g)
    assert exit_.exit_reason is KvmExitReason.X86_WRMSR and exit_.msr.reason is KvmMsrExitReason.FILTER
    assert run(g).exit_reason is KvmExitReason.HLT
    assert dict(g.vcpu.get_msrs([0x277]))[0x277] == pat  # userspace took the write; KVM did not
    reader = msr_guest(rdmsr_code(0x277))
    reader.vm.set_msr_filter([MsrFilterRange(WRITE, 0x277, 1, b"\x00")])
    assert run(reader).exit_reason is KvmExitReason.HLT and result(reader) == pat  # reads still KVM's


def test_denied_access_without_the_filter_reason_is_gp():
    g = msr_guest(rdmsr_code(0xC000_0082))  # LSTAR: normally passed through to the CPU
    g.vm.set_msr_filter([MsrFilterRange(READ, 0xC000_0082, 1, b"\x00")])
    assert 0xC000_0082 in g.vcpu.state.vmcs.msr_bitmap
    assert run(g).exit_reason is KvmExitReason.HLT and faulted(g)


def test_default_deny_filter_allows_only_the_listed_msrs():
    g = msr_guest(rdmsr_code(0xC000_0080))  # EFER
    g.vm.enable_cap_user_space_msr(KvmMsrExitReason.FILTER)
    g.vm.set_msr_filter([MsrFilterRange(BOTH, 0x277, 1, b"\x01")], default_deny=True)
    exit_ = run(g)
    assert exit_.exit_reason is KvmExitReason.X86_RDMSR and exit_.msr.index == 0xC000_0080
    g.vm.set_msr_filter([])  # removing the filter restores pass-through
    assert 0xC000_0080 not in g.vcpu.state.vmcs.msr_bitmap


def test_x2apic_msrs_cannot_be_filtered_and_fail_with_reason_inval():
    g = msr_guest(rdmsr_code(0x803))
    g.vm.enable_cap_user_space_msr(KvmMsrExitReason.INVAL | KvmMsrExitReason.FILTER)
    g.vm.set_msr_filter([MsrFilterRange(BOTH, 0x800, 256, bytes(32) )])
    exit_ = run(g)
    assert exit_.exit_reason is KvmExitReason.X86_RDMSR
    assert (exit_.msr.reason, exit_.msr.index) == (KvmMsrExitReason.INVAL, 0x803)


def test_x2apic_msrs_without_userspace_are_gp():
    g = msr_guest(rdmsr_code(0x802))
    assert run(g).exit_reason is KvmExitReason.HLT and faulted(g)


def test_apic_base_is_kvms_with_reset_value_and_reserved_bit_checks():
    g = msr_guest(rdmsr_code(0x1B))
    assert run(g).exit_reason is KvmExitReason.HLT and result(g) == 0xFEE0_0900
    bad = msr_guest(wrmsr_code(0x1B, 0xFEE0_0900 | 1 << 9))  # bit 9 is reserved
    assert run(bad).exit_reason is KvmExitReason.HLT and faulted(bad)
    invalid = msr_guest(wrmsr_code(0x1B, 0xFEE0_0500))  # EXTD without EN
    assert run(invalid).exit_reason is KvmExitReason.HLT and faulted(invalid)
    x2 = msr_guest(wrmsr_code(0x1B, 0xFEE0_0D00))
    assert run(x2).exit_reason is KvmExitReason.HLT and not faulted(x2)
    assert dict(x2.vcpu.get_msrs([0x1B]))[0x1B] == 0xFEE0_0D00


@pytest.mark.parametrize("index", [0x8B, 0x1A0, 0x3A, 0x6E0])
def test_kvm_emulated_msrs_read_and_save_restore(index):
    g = msr_guest(rdmsr_code(index))
    assert run(g).exit_reason is KvmExitReason.HLT and not faulted(g)
    assert index in g.vcpu.get_msr_index_list()
    assert dict(g.vcpu.get_msrs([index]))[index] == result(g)
    value = 0x5 if index == 0x3A else 0x1234  # IA32_FEATURE_CONTROL takes only its valid bits
    assert g.vcpu.set_msrs([(index, value)]) == 1
    assert dict(g.vcpu.get_msrs([index]))[index] == value


def test_misc_enable_reset_value_has_pebs_and_bts_unavailable():
    g = msr_guest(rdmsr_code(0x1A0))
    run(g)
    assert result(g) == (1 << 11) | (1 << 12)


def test_guest_write_of_ucode_rev_is_ignored():
    g = msr_guest(wrmsr_code(0x8B, 0x42 << 32))
    assert run(g).exit_reason is KvmExitReason.HLT and not faulted(g)
    assert dict(g.vcpu.get_msrs([0x8B]))[0x8B] == 0x1_0000_0000


def test_get_msrs_stops_at_an_msr_kvm_does_not_know():
    g = msr_guest(b"\xF4")
    assert g.vcpu.get_msrs([0x1A0, UNKNOWN_MSR, 0x277]) == [(0x1A0, 0x1800)]
    assert g.vcpu.set_msrs([(0x277, 0x0606_0606_0606_0606), (0x802, 0)]) == 1


@pytest.mark.parametrize("call", [
    lambda vm: vm.enable_cap_user_space_msr(1 << 3),
    lambda vm: vm.set_msr_filter([], default_deny=True),
    lambda vm: vm.set_msr_filter([MsrFilterRange(0, 0x10, 1, b"\x00")]),
    lambda vm: vm.set_msr_filter([MsrFilterRange(READ, 0x10, 64, b"\x00")]),
    lambda vm: vm.set_msr_filter([MsrFilterRange(READ, 0, 0x3001, bytes(0x601))]),
    lambda vm: vm.set_msr_filter([MsrFilterRange(READ, 0x10, 1, b"\x00")] * 17),
])
def test_invalid_cap_and_filter_arguments_are_einval(call):
    g = msr_guest(b"\xF4")
    with pytest.raises(KvmIoctlError):
        call(g.vm)
