"""The argument-check layer of the KVM API (cetvm.kvm.ioctl_args), the memslot rules and the
__kvm_set_msr value rules for CPU-held MSRs, one rule at a time."""

from __future__ import annotations

import errno
import math

import pytest

from cetvm import InputError, NotSupportedError
from cetvm.arch.msr import Msr
from cetvm.arch.regs import canonicalize
from cetvm.cpu.state import Regs, Segment, Sregs
from cetvm.cpuid import get_model
from cetvm.kvm import VcpuArch, kvm_caps_for_host
from cetvm.arch.regs import Cr4
from cetvm.kvm.cr import CR4_RESERVED_BITS, cr4_reserved_bits, kvm_is_valid_sregs_state
from cetvm.kvm.errors import (
    KvmBadAddress,
    KvmError,
    KvmInvalidArgument,
    KvmIoctlError,
    KvmLoadError,
    KvmNotSupported,
    KvmTooBig,
)
from cetvm.kvm.host import Host
from cetvm.kvm.ioctl_args import (
    check_bytes,
    check_flag,
    check_int,
    check_items,
    check_kvm_regs,
    check_kvm_sregs,
    check_pair,
    check_u16,
    check_u64,
)
from cetvm.kvm.memslots import KVM_USER_MEM_SLOTS, kvm_memory_region_invalid
from cetvm.kvm.msr import kvm_set_efer_value


@pytest.mark.parametrize("value", [None, True, False, 1.0, math.nan, "1", b"1", (1,), [1], object()])
def test_check_int_refuses_everything_but_int(value):
    with pytest.raises(KvmInvalidArgument) as info:
        check_int("x", value, 0, 10)
    assert info.value.errno == errno.EINVAL and "x must be an integer" in str(info.value)


def test_check_int_range_and_widths():
    assert check_int("x", Msr.IA32_EFER, 0, 2**32) == 0xC0000080  # IntEnum members are ints
    assert check_u64("x", 2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64):
        with pytest.raises(KvmInvalidArgument, match="outside"):
            check_u64("x", bad)
    with pytest.raises(KvmInvalidArgument, match="0x10000 is outside 0..0xffff"):
        check_u16("x", 65536)


def test_containers_and_flags():
    assert check_bytes("b", bytearray(b"ab"), 2) == b"ab"
    with pytest.raises(KvmInvalidArgument, match="longer than 1"):
        check_bytes("b", b"ab", 1)
    with pytest.raises(KvmInvalidArgument):
        check_bytes("b", "ab", 8)
    assert check_items("l", {3}) == [3]
    for bad in ("ab", b"ab", {1: 2}, 5, None):
        with pytest.raises(KvmInvalidArgument):
            check_items("l", bad)
    with pytest.raises(KvmTooBig):
        check_items("l", [0] * 3, 2, KvmTooBig)
    assert check_pair("p", [1, 2]) == (1, 2)
    with pytest.raises(KvmInvalidArgument):
        check_pair("p", (1,))
    assert check_flag("f", 1) is True and check_flag("f", False) is False
    with pytest.raises(KvmInvalidArgument):
        check_flag("f", 2)


def test_struct_checks_copy_and_never_truncate():
    regs = check_kvm_regs(Regs(rip=5, rflags=0))
    assert regs.rip == 5 and regs.rflags == 2  # X86_EFLAGS_FIXED
    with pytest.raises(KvmInvalidArgument, match="reserved"):
        check_kvm_regs(Regs(rflags=1 << 22))
    with pytest.raises(KvmInvalidArgument, match="rip"):
        check_kvm_regs(Regs(rip=2**64))
    sregs = Sregs(cs=Segment(0x8, 0, 0xFFFF_FFFF, 0x00A09B00))
    assert check_kvm_sregs(sregs) == sregs and check_kvm_sregs(sregs) is not sregs
    for bad in (Sregs(cs=Segment(attributes=2**32)), Sregs(tr=Segment(selector=0x10000)), Sregs(cr3=-1)):
        with pytest.raises(KvmInvalidArgument):
            check_kvm_sregs(bad)
    bad_gdt = Sregs()
    bad_gdt.gdt.limit = 1 << 40
    with pytest.raises(KvmInvalidArgument, match="gdt.limit"):
        check_kvm_sregs(bad_gdt)


def test_error_classes_keep_the_old_contracts():
    assert KvmIoctlError(errno.ENOSPC, "m").errno == errno.ENOSPC and "ENOSPC" in str(KvmIoctlError(errno.ENOSPC, "m"))
    assert issubclass(KvmBadAddress, InputError) and KvmBadAddress("m").errno == errno.EFAULT
    assert issubclass(KvmNotSupported, NotSupportedError) and KvmNotSupported("m").errno == errno.EOPNOTSUPP
    assert issubclass(KvmLoadError, KvmError) and str(KvmLoadError("kvm: no")) == "kvm: no"


def test_memory_region_rules():
    ok = kvm_memory_region_invalid
    assert ok(0, 0, 0x1000, 46) is None
    assert "page size" in ok(0, 0, 0x1001, 46)
    assert "page-aligned" in ok(0, 0x800, 0x1000, 46)
    assert "address space 1" in ok(1 << 16, 0, 0x1000, 46)
    assert "KVM_USER_MEM_SLOTS" in ok(KVM_USER_MEM_SLOTS, 0, 0x1000, 46)
    assert ok(KVM_USER_MEM_SLOTS - 1, 0, 0x1000, 46) is None
    assert "wraps" in ok(0, 2**64 - 0x1000, 0x2000, 52)
    assert "KVM_MEM_MAX_NR_PAGES" in ok(0, 0, 1 << 43, 52)
    assert "46-bit" in ok(0, (1 << 46) - 0x1000, 0x2000, 46)
    assert ok(0, (1 << 46) - 0x1000, 0x1000, 46) is None


@pytest.fixture
def vcpu_state() -> VcpuArch:
    caps = kvm_caps_for_host(Host(get_model("sapphire-rapids")))
    return VcpuArch.create(caps, caps.get_supported_cpuid())


def test_set_efer_rules(vcpu_state):
    lme_lma = 0x500
    assert kvm_set_efer_value(vcpu_state, lme_lma, 2**64 - 1, True, host_initiated=True) is None
    assert kvm_set_efer_value(vcpu_state, lme_lma, 0x100, True, host_initiated=True) == 0x500  # LMA kept
    assert kvm_set_efer_value(vcpu_state, 0, 0x501, False, host_initiated=True) == 0x101     # LMA not set
    assert kvm_set_efer_value(vcpu_state, lme_lma, 0x401, True, host_initiated=False) is None  # LME toggle
    assert kvm_set_efer_value(vcpu_state, lme_lma, 0x401, True, host_initiated=True) == 0x401


def test_cr4_reserved_bits_are_kvms_list():
    assert CR4_RESERVED_BITS & (1 << 32) and CR4_RESERVED_BITS & (1 << 14)  # bit 32, SMXE
    assert not CR4_RESERVED_BITS & ((1 << 23) | (1 << 5) | (1 << 18))        # CET, PAE, OSXSAVE


def test_canonicalize():
    assert canonicalize(0x0000_8000_0000_0000) == 0xFFFF_8000_0000_0000
    assert canonicalize(0xFFFF_0000_0000_1000) == 0x1000
    assert canonicalize(0x7FFF_FFFF_FFFF) == 0x7FFF_FFFF_FFFF


def test_cr4_bits_follow_the_guest_cpuid(vcpu_state):
    """__cr4_reserved_bits(): a CR4 bit whose feature the guest's CPUID lacks is reserved."""
    assert not cr4_reserved_bits(vcpu_state.cpuid) & (Cr4.SMEP | Cr4.OSXSAVE | Cr4.CET)
    cpuid = vcpu_state.caps.get_supported_cpuid()
    cpuid.set_feature("smep", False)
    vcpu_state.set_cpuid(cpuid)
    assert cr4_reserved_bits(vcpu_state.cpuid) & Cr4.SMEP
    why = kvm_is_valid_sregs_state(vcpu_state, cr0=0x8001_0033, cr3=0x1000, cr4=int(Cr4.PAE | Cr4.SMEP),
                                   efer=0x500, cs_long=True, maxphyaddr=46)
    assert why is not None and "reserved for this guest" in why
