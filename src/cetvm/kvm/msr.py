"""CET and XSS MSR access as KVM 6.18 does it (__kvm_set_msr / __kvm_get_msr /
kvm_set_msr_common / vmx_set_msr, wrapped by kvm_do_msr_access) [K; reference §5].

Two levels, as in KVM:

- ``__kvm_set_msr`` / ``__kvm_get_msr`` return KVM's raw codes: :attr:`MsrResult.OK` (0),
  :attr:`MsrResult.ERROR` ("return 1") or :attr:`MsrResult.UNSUPPORTED`
  (KVM_MSR_RET_UNSUPPORTED: the MSR does not exist for this guest's CPUID).
- :func:`kvm_set_msr` / :func:`kvm_get_msr` (kvm_do_msr_access) give the final outcome:
  OK, :attr:`MsrResult.GUEST_GP` (guest RDMSR/WRMSR → #GP(0)) or :attr:`MsrResult.ERROR`
  (host-initiated KVM_SET/GET_MSRS stops at this MSR). A failed read returns 0. Userspace may
  read, or write 0 to, an UNSUPPORTED MSR that KVM advertises in KVM_GET_MSR_INDEX_LIST
  (ignore_msrs=0 assumed).

Decisions: IA32_INT_SSP_TAB needs guest SHSTK *and* LM (reference §5 table). Guest WRMSR to XSS
without XSAVES is UNSUPPORTED; RDMSR of XSS fails only for the guest without XSAVES (userspace
may always read it). Canonical checks use 48-bit linear addresses.
"""

from __future__ import annotations

import enum
import errno

from cetvm import NotSupportedError
from cetvm.arch.msr import Msr
from cetvm.arch.vmx import KVM_REG_GUEST_SSP_ID, VmcsField
from cetvm.arch.xfeatures import XFeature
from cetvm.kvm.cet_rules import kvm_is_valid_ssp, kvm_is_valid_u_s_cet
from cetvm.kvm.errors import KvmIoctlError
from cetvm.kvm.vcpu import VcpuCetState


class MsrResult(enum.Enum):
    OK = "ok"
    GUEST_GP = "#GP"
    ERROR = "error"
    UNSUPPORTED = "unsupported"


#: XSAVE-managed MSRs: (component, offset in component) [reference §1].
XSTATE_MANAGED_MSRS: dict[int, tuple[int, int]] = {
    Msr.IA32_U_CET: (XFeature.CET_USER, 0),
    Msr.IA32_PL3_SSP: (XFeature.CET_USER, 8),
    Msr.IA32_PL0_SSP: (XFeature.CET_KERNEL, 0),
    Msr.IA32_PL1_SSP: (XFeature.CET_KERNEL, 8),
    Msr.IA32_PL2_SSP: (XFeature.CET_KERNEL, 16),
}
#: MSRs VMX keeps in the VMCS.
VMCS_MSRS: dict[int, VmcsField] = {
    Msr.IA32_S_CET: VmcsField.GUEST_S_CET,
    Msr.KVM_INTERNAL_GUEST_SSP: VmcsField.GUEST_SSP,
    Msr.IA32_INT_SSP_TAB: VmcsField.GUEST_INTR_SSP_TABLE,
}
CET_CTL_MSRS = (Msr.IA32_U_CET, Msr.IA32_S_CET)
SSP_MSRS = (Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP, Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP,
            Msr.IA32_INT_SSP_TAB)
MODELLED_MSRS = frozenset(int(m) for m in (*CET_CTL_MSRS, *SSP_MSRS, Msr.IA32_XSS,
                                           Msr.KVM_INTERNAL_GUEST_SSP))


def is_xstate_managed_msr(index: int) -> bool:
    """is_xstate_managed_msr(): U_CET and PL0-3_SSP live in the guest FPU's xstate."""
    return index in XSTATE_MANAGED_MSRS


def _check_modelled(index: int) -> None:
    if index not in MODELLED_MSRS:
        raise NotSupportedError(f"MSR {index:#x}: cetvm.kvm models only the CET MSRs and IA32_XSS")


def _guest_has_cet(vcpu: VcpuCetState) -> tuple[bool, bool]:
    return vcpu.cpuid.guest_cpu_cap_has("shstk"), vcpu.cpuid.guest_cpu_cap_has("ibt")


def _ssp_msr_exists(vcpu: VcpuCetState, index: int) -> bool:
    if not vcpu.cpuid.guest_cpu_cap_has("shstk"):
        return False
    return index != Msr.IA32_INT_SSP_TAB or vcpu.cpuid.guest_cpu_cap_has("lm")


# ----------------------------------------------------------------------------- raw level
def __kvm_set_msr(vcpu: VcpuCetState, index: int, data: int, host_initiated: bool) -> MsrResult:
    """The per-MSR checks of __kvm_set_msr, then kvm_set_msr_common / vmx_set_msr."""
    _check_modelled(index)
    if index in CET_CTL_MSRS:
        shstk, ibt = _guest_has_cet(vcpu)
        if not shstk and not ibt:
            return MsrResult.UNSUPPORTED
        if not kvm_is_valid_u_s_cet(data, shstk, ibt):
            return MsrResult.ERROR
    elif index == Msr.KVM_INTERNAL_GUEST_SSP or index in SSP_MSRS:
        if index == Msr.KVM_INTERNAL_GUEST_SSP and not host_initiated:
            return MsrResult.ERROR
        if not _ssp_msr_exists(vcpu, index):
            return MsrResult.UNSUPPORTED
        if not kvm_is_valid_ssp(data, index == Msr.IA32_INT_SSP_TAB):
            return MsrResult.ERROR
    elif index == Msr.IA32_XSS:
        if not vcpu.cpuid.guest_cpu_cap_has("xsaves"):
            return MsrResult.UNSUPPORTED
        if data & ~vcpu.cpuid.guest_supported_xss:
            return MsrResult.ERROR
    _store_msr(vcpu, index, data)
    return MsrResult.OK


def _store_msr(vcpu: VcpuCetState, index: int, data: int) -> None:
    if index in XSTATE_MANAGED_MSRS:  # kvm_set_xstate_msr: loads the guest FPU
        feature, offset = XSTATE_MANAGED_MSRS[index]
        vcpu.fpu.write(feature, offset, data)
    elif index in VMCS_MSRS:
        vcpu.vmcs.write(VMCS_MSRS[index], data)
    elif index == Msr.IA32_XSS and data != vcpu.ia32_xss:
        vcpu.ia32_xss = data
        vcpu.cpuid.kvm_update_cpuid_runtime(vcpu.xcr0, vcpu.ia32_xss)


def __kvm_get_msr(vcpu: VcpuCetState, index: int, host_initiated: bool) -> tuple[MsrResult, int]:
    _check_modelled(index)
    if index in CET_CTL_MSRS:
        shstk, ibt = _guest_has_cet(vcpu)
        if not shstk and not ibt:
            return MsrResult.UNSUPPORTED, 0
    elif index == Msr.KVM_INTERNAL_GUEST_SSP or index in SSP_MSRS:
        if index == Msr.KVM_INTERNAL_GUEST_SSP and not host_initiated:
            return MsrResult.ERROR, 0
        if not _ssp_msr_exists(vcpu, index):
            return MsrResult.UNSUPPORTED, 0
    elif index == Msr.IA32_XSS:
        if not host_initiated and not vcpu.cpuid.guest_cpu_cap_has("xsaves"):
            return MsrResult.ERROR, 0
        return MsrResult.OK, vcpu.ia32_xss
    if index in XSTATE_MANAGED_MSRS:  # kvm_get_xstate_msr
        feature, offset = XSTATE_MANAGED_MSRS[index]
        return MsrResult.OK, vcpu.fpu.read(feature, offset)
    return MsrResult.OK, vcpu.vmcs.read(VMCS_MSRS[index])


# ----------------------------------------------------------------------------- outer level
def kvm_is_advertised_msr(vcpu: VcpuCetState, index: int) -> bool:
    """In KVM_GET_MSR_INDEX_LIST (msrs_to_save / emulated_msrs)."""
    return index in vcpu.caps.get_msr_index_list()


def _finish(vcpu: VcpuCetState, index: int, ret: MsrResult, data: int, host_initiated: bool) -> MsrResult:
    """kvm_do_msr_access(): the UNSUPPORTED rule, then guest #GP / host error."""
    if ret is MsrResult.OK:
        return ret
    if ret is MsrResult.UNSUPPORTED and host_initiated and data == 0 and kvm_is_advertised_msr(vcpu, index):
        return MsrResult.OK
    return MsrResult.ERROR if host_initiated else MsrResult.GUEST_GP


def kvm_set_msr(vcpu: VcpuCetState, index: int, data: int, host_initiated: bool = False) -> MsrResult:
    """WRMSR by the guest (``host_initiated=False``) or KVM_SET_MSRS by userspace."""
    data &= 0xFFFF_FFFF_FFFF_FFFF
    return _finish(vcpu, index, __kvm_set_msr(vcpu, index, data, host_initiated), data, host_initiated)


def kvm_get_msr(vcpu: VcpuCetState, index: int, host_initiated: bool = False) -> tuple[MsrResult, int]:
    """RDMSR by the guest or KVM_GET_MSRS by userspace; a failed read yields 0."""
    ret, data = __kvm_get_msr(vcpu, index, host_initiated)
    if ret is not MsrResult.OK:
        data = 0
    return _finish(vcpu, index, ret, data, host_initiated), data


# ----------------------------------------------------------------------------- ONE_REG
def _translate_kvm_reg(vcpu: VcpuCetState, reg_id: int) -> int:
    """kvm_translate_kvm_reg(): KVM_REG_GUEST_SSP → MSR_KVM_INTERNAL_GUEST_SSP, -EINVAL
    without guest SHSTK or for an unknown id."""
    if reg_id != KVM_REG_GUEST_SSP_ID:
        raise KvmIoctlError(errno.EINVAL, f"KVM_GET/SET_ONE_REG: unknown register id {reg_id:#x}")
    if not vcpu.cpuid.guest_cpu_cap_has("shstk"):
        raise KvmIoctlError(errno.EINVAL, "KVM_REG_GUEST_SSP: guest CPUID lacks SHSTK")
    return Msr.KVM_INTERNAL_GUEST_SSP


def get_one_reg(vcpu: VcpuCetState, reg_id: int) -> int:
    index = _translate_kvm_reg(vcpu, reg_id)
    ret, data = kvm_get_msr(vcpu, index, host_initiated=True)
    if ret is not MsrResult.OK:
        raise KvmIoctlError(errno.EINVAL, f"KVM_GET_ONE_REG {reg_id:#x} failed")
    return data


def set_one_reg(vcpu: VcpuCetState, reg_id: int, value: int) -> None:
    index = _translate_kvm_reg(vcpu, reg_id)
    if kvm_set_msr(vcpu, index, value, host_initiated=True) is not MsrResult.OK:
        raise KvmIoctlError(errno.EINVAL, f"KVM_SET_ONE_REG {reg_id:#x}: invalid value {value:#x}")
