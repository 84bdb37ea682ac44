"""CR0/CR4 rules for CET (kvm_is_valid_cr4 / kvm_set_cr0 / kvm_set_cr4 / kvm_is_valid_sregs)
[K x86.c; SDM Vol. 3 2.5; reference §3, §5]. ``True`` = accepted; for a guest MOV to CR a
``False`` is #GP(0), for KVM_SET_SREGS it is -EINVAL."""

from __future__ import annotations

from cetvm.arch.regs import Cr0, Cr4
from cetvm.kvm.cpuid_runtime import VcpuCpuid
from cetvm.kvm.vcpu import VcpuCetState


def cr4_reserved_bits(cpuid: VcpuCpuid) -> int:
    """__cr4_reserved_bits(), CET part: CR4.CET is reserved unless the guest has SHSTK or IBT."""
    if cpuid.guest_cpu_cap_has("shstk") or cpuid.guest_cpu_cap_has("ibt"):
        return 0
    return int(Cr4.CET)


def kvm_is_valid_cr4(vcpu: VcpuCetState, cr4: int) -> bool:
    return not cr4 & cr4_reserved_bits(vcpu.cpuid)


def kvm_set_cr4(vcpu: VcpuCetState, cr4: int) -> bool:
    """Guest MOV to CR4: reserved CET bit, or CR4.CET while CR0.WP=0 → #GP."""
    if not kvm_is_valid_cr4(vcpu, cr4):
        return False
    if cr4 & Cr4.CET and not vcpu.cr0 & Cr0.WP:
        return False
    vcpu.cr4 = cr4
    return True


def kvm_set_cr0(vcpu: VcpuCetState, cr0: int) -> bool:
    """Guest MOV to CR0: clearing WP while CR4.CET=1 → #GP."""
    if not cr0 & Cr0.WP and vcpu.cr4 & Cr4.CET:
        return False
    vcpu.cr0 = cr0
    return True


def kvm_is_valid_sregs(vcpu: VcpuCetState, cr0: int, cr4: int) -> bool:
    """KVM_SET_SREGS (CET part): CR4 must be valid and CR4.CET needs CR0.WP."""
    if not kvm_is_valid_cr4(vcpu, cr4):
        return False
    return not (cr4 & Cr4.CET and not cr0 & Cr0.WP)
