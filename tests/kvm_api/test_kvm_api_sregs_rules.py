"""KVM_SET_SREGS applies kvm_is_valid_sregs() in full (not only the CET rules)."""

import errno

import pytest

from cetvm.cpuid import get_model
from cetvm.kvm import Host, KvmIoctlError
from cetvm.kvm.api import Kvm

LONG = dict(cr0=0x8001_0033, cr4=0x20, efer=0x500)


def _vcpu():
    kvm = Kvm(Host(get_model("sapphire-rapids")))
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, 4 << 20)
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid(kvm.get_supported_cpuid())
    return vcpu


def _long_mode_sregs(vcpu, **changes):
    s = vcpu.get_sregs()
    s.cr0, s.cr4, s.efer, s.cr3 = LONG["cr0"], LONG["cr4"], LONG["efer"], 0x2000
    s.cs.attributes |= 1 << 13  # L: 64-bit code segment
    for k, v in changes.items():
        setattr(s, k, v)
    return s


def test_valid_long_mode_state_is_accepted():
    vcpu = _vcpu()
    vcpu.set_sregs(_long_mode_sregs(vcpu))
    assert vcpu.get_sregs().cr3 == 0x2000


@pytest.mark.parametrize("changes, why", [
    ({"cr0": LONG["cr0"] | 1 << 40}, "reserved bits 63:32"),
    ({"cr0": (LONG["cr0"] | 1 << 29) & ~(1 << 30)}, "NW without"),
    ({"cr3": 1 << 60}, "MAXPHYADDR"),
    ({"efer": 0x100}, "without EFER.LMA"),
    ({"cr4": 0}, "CR4.PAE"),
])
def test_invalid_state_is_einval(changes, why):
    vcpu = _vcpu()
    with pytest.raises(KvmIoctlError) as info:
        vcpu.set_sregs(_long_mode_sregs(vcpu, **changes))
    assert info.value.errno == errno.EINVAL and why in str(info.value)


def test_lma_outside_long_mode_is_einval():
    vcpu = _vcpu()
    s = vcpu.get_sregs()
    s.cr0, s.efer = 0x11, 0x400  # protected mode, paging off, but LMA set
    with pytest.raises(KvmIoctlError, match="outside long mode"):
        vcpu.set_sregs(s)
