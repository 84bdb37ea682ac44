"""CET and XSS MSR access as KVM 6.18 does it (__kvm_set_msr / __kvm_get_msr /
kvm_set_msr_common / vmx_set_msr, wrapped by kvm_do_msr_access) [K].

Two levels, as in KVM:

- ``__kvm_set_msr`` / ``__kvm_get_msr`` return KVM's raw codes: :attr:`MsrResult.OK` (0),
  :attr:`MsrResult.ERROR` ("return 1") or :attr:`MsrResult.UNSUPPORTED`
  (KVM_MSR_RET_UNSUPPORTED: the MSR does not exist for this guest's CPUID).
- :func:`kvm_set_msr` / :func:`kvm_get_msr` (kvm_do_msr_access) give the final outcome:
  OK, :attr:`MsrResult.GUEST_GP` (guest RDMSR/WRMSR → #GP(0)) or :attr:`MsrResult.ERROR`
  (host-initiated KVM_SET/GET_MSRS stops at this MSR). A failed read returns 0. Userspace may
  read, or write 0 to, an UNSUPPORTED MSR that KVM advertises in KVM_GET_MSR_INDEX_LIST
  (ignore_msrs=0 assumed).

Decisions: IA32_INT_SSP_TAB needs guest SHSTK *and* LM (kvm_cet_is_msr_accessible). Guest WRMSR to XSS
without XSAVES is UNSUPPORTED; RDMSR of XSS fails only for the guest without XSAVES (userspace
may always read it). Canonical checks use 48-bit linear addresses.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cetvm.arch.apic import X2APIC_MSRS, apic_base_reset_value, apic_base_write_error
from cetvm.arch.msr import (CET_CTL_MSRS, EFER_DEFINED_INTEL, SSP_MSRS, VMX_CAPABILITY_MSRS, ArchCapabilities, DebugCtl,
                            Efer, FeatureControl, MiscEnable, Msr)
from cetvm.arch.regs import Cr0, canonicalize, is_canonical
from cetvm.arch.vmx import KVM_REG_GUEST_SSP_ID, VmcsField
from cetvm.arch.xfeatures import XFeature
from cetvm.cpu.engine_features import ENGINE_MSRS
from cetvm.kvm.cet_rules import kvm_is_valid_ssp, kvm_is_valid_u_s_cet
from cetvm.kvm.errors import KvmInvalidArgument, KvmNotSupported
from cetvm.kvm.host import Host
from cetvm.kvm.nested_caps import NestedVmxMsrs, nested_vmx_setup_ctls_msrs, vmcs12_cet_fields_exist, vmcs_enum_max_index
from cetvm.kvm.timekeeping import KVMCLOCK_EMULATED_MSRS, TIME_MSRS, VcpuTime
from cetvm.kvm.vcpu import VcpuArch
from cetvm.kvm.vmcs12 import vmcs12_fields


class MsrResult(enum.Enum):
    OK = "ok"
    GUEST_GP = "#GP"
    ERROR = "error"
    UNSUPPORTED = "unsupported"
    #: KVM_MSR_RET_FILTERED: the access was denied by KVM_X86_SET_MSR_FILTER.
    FILTERED = "filtered"


#: XSAVE-managed MSRs: (component, offset in component) [SDM Vol. 1 §13.5.6;
#: KVM is_xstate_managed_msr()].
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
MODELLED_MSRS = frozenset(int(m) for m in (*CET_CTL_MSRS, *SSP_MSRS, Msr.IA32_XSS,
                                           Msr.KVM_INTERNAL_GUEST_SSP))


def is_xstate_managed_msr(index: int) -> bool:
    """is_xstate_managed_msr(): U_CET and PL0-3_SSP live in the guest FPU's xstate."""
    return index in XSTATE_MANAGED_MSRS


def _check_modelled(index: int) -> None:
    if index not in MODELLED_MSRS:
        raise KvmNotSupported(f"MSR {index:#x}: cetvm.kvm models only the CET MSRs and IA32_XSS")


def _guest_has_cet(vcpu: VcpuArch) -> tuple[bool, bool]:
    return vcpu.cpuid.guest_cpu_cap_has("shstk"), vcpu.cpuid.guest_cpu_cap_has("ibt")


def _ssp_msr_exists(vcpu: VcpuArch, index: int) -> bool:
    if not vcpu.cpuid.guest_cpu_cap_has("shstk"):
        return False
    return index != Msr.IA32_INT_SSP_TAB or vcpu.cpuid.guest_cpu_cap_has("lm")


# ----------------------------------------------------------------------------- raw level
def __kvm_set_msr(vcpu: VcpuArch, index: int, data: int, host_initiated: bool) -> MsrResult:
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


def _store_msr(vcpu: VcpuArch, index: int, data: int) -> None:
    if index in XSTATE_MANAGED_MSRS:  # kvm_set_xstate_msr: loads the guest FPU
        feature, offset = XSTATE_MANAGED_MSRS[index]
        vcpu.fpu.write(feature, offset, data)
    elif index in VMCS_MSRS:
        vcpu.vmcs.write(VMCS_MSRS[index], data)
    elif index == Msr.IA32_XSS and data != vcpu.ia32_xss:
        vcpu.ia32_xss = data
        vcpu.cpuid.kvm_update_cpuid_runtime(vcpu.xcr0, vcpu.ia32_xss)


def __kvm_get_msr(vcpu: VcpuArch, index: int, host_initiated: bool) -> tuple[MsrResult, int]:
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
def kvm_is_advertised_msr(vcpu: VcpuArch, index: int) -> bool:
    """In KVM_GET_MSR_INDEX_LIST (msrs_to_save / emulated_msrs)."""
    return index in vcpu.caps.get_msr_index_list()


def _finish(vcpu: VcpuArch, index: int, ret: MsrResult, data: int, host_initiated: bool) -> MsrResult:
    """kvm_do_msr_access(): the UNSUPPORTED rule, then guest #GP / host error."""
    if ret is MsrResult.OK:
        return ret
    if ret is MsrResult.UNSUPPORTED and host_initiated and data == 0 and kvm_is_advertised_msr(vcpu, index):
        return MsrResult.OK
    return MsrResult.ERROR if host_initiated else MsrResult.GUEST_GP


def kvm_set_msr(vcpu: VcpuArch, index: int, data: int, host_initiated: bool = False) -> MsrResult:
    """WRMSR by the guest (``host_initiated=False``) or KVM_SET_MSRS by userspace."""
    data &= 0xFFFF_FFFF_FFFF_FFFF
    return _finish(vcpu, index, __kvm_set_msr(vcpu, index, data, host_initiated), data, host_initiated)


def kvm_get_msr(vcpu: VcpuArch, index: int, host_initiated: bool = False) -> tuple[MsrResult, int]:
    """RDMSR by the guest or KVM_GET_MSRS by userspace; a failed read yields 0."""
    ret, data = __kvm_get_msr(vcpu, index, host_initiated)
    if ret is not MsrResult.OK:
        data = 0
    return _finish(vcpu, index, ret, data, host_initiated), data


# ----------------------------------------------------------------------------- ONE_REG
def _translate_kvm_reg(vcpu: VcpuArch, reg_id: int) -> int:
    """kvm_translate_kvm_reg(): KVM_REG_GUEST_SSP → MSR_KVM_INTERNAL_GUEST_SSP, -EINVAL
    without guest SHSTK or for an unknown id."""
    if reg_id != KVM_REG_GUEST_SSP_ID:
        raise KvmInvalidArgument(f"KVM_GET/SET_ONE_REG: unknown register id {reg_id:#x}")
    if not vcpu.cpuid.guest_cpu_cap_has("shstk"):
        raise KvmInvalidArgument("KVM_REG_GUEST_SSP: guest CPUID lacks SHSTK")
    return Msr.KVM_INTERNAL_GUEST_SSP


def get_one_reg(vcpu: VcpuArch, reg_id: int) -> int:
    index = _translate_kvm_reg(vcpu, reg_id)
    ret, data = kvm_get_msr(vcpu, index, host_initiated=True)
    if ret is not MsrResult.OK:
        raise KvmInvalidArgument(f"KVM_GET_ONE_REG {reg_id:#x} failed")
    return data


def set_one_reg(vcpu: VcpuArch, reg_id: int, value: int) -> None:
    index = _translate_kvm_reg(vcpu, reg_id)
    if kvm_set_msr(vcpu, index, value, host_initiated=True) is not MsrResult.OK:
        raise KvmInvalidArgument(f"KVM_SET_ONE_REG {reg_id:#x}: invalid value {value:#x}")


# ============================================================================= KVM's own MSRs
# kvm_set_msr_common / kvm_get_msr_common for the MSRs outside CET that cetvm's KVM emulates or
# checks itself [K x86.c, lapic.c]. Decisions (tested in tests/kvm_api/test_kvm_api_user_msrs.py):
#
# - cetvm's KVM has no in-kernel local APIC (as KVM without KVM_CREATE_IRQCHIP). IA32_APIC_BASE
#   is still KVM's: vcpu->arch.apic_base with kvm_apic_set_base()'s checks. Its RESET value is
#   the architectural 0xFEE00000 | EN | BSP (SDM Vol. 3 §11.4.4), INIT keeps it. A VMM that
#   owns the APIC denies 0x1B with KVM_X86_SET_MSR_FILTER to see the guest's accesses.
# - x2APIC MSRs 0x800-0x8FF: kvm_x2apic_msr_read/write() fail ("return 1") without an
#   in-kernel APIC, i.e. #GP, or KVM_EXIT_X86_RDMSR/WRMSR with reason INVAL when userspace
#   enabled it. Filters never cover them (api.rst KVM_X86_SET_MSR_FILTER).
# - IA32_PAT: kvm_pat_valid() on writes; the value lives in the CPU (VMCS GUEST_IA32_PAT).
# - IA32_MISC_ENABLE: KVM's software copy, RESET value PEBS_UNAVAILABLE | BTS_UNAVAILABLE
#   (kvm_vcpu_reset). Decision: any value a guest writes is stored (KVM filters only the MWAIT
#   bit, which cetvm's CPUID never offers).
# - IA32_UCODE_REV (0x8B): vcpu->arch.microcode_version (0x100000000), guest writes ignored.
# - IA32_FEATURE_CONTROL, IA32_TSC_DEADLINE: software copies (no in-kernel APIC timer).
# - IA32_SMBASE (0x9E): vcpu->arch.smbase (:mod:`cetvm.kvm.smm`), host-initiated only — a
#   guest RDMSR/WRMSR fails (#GP), KVM_GET/SET_MSRS read and write it (no value check).
# - IA32_TIME_STAMP_COUNTER, IA32_TSC_ADJUST and the kvmclock MSRs: KVM's timekeeping
#   (:mod:`cetvm.kvm.timekeeping`); KVM intercepts the TSC MSR (its writes move the offset).
# - Everything else the CPU holds (EFER, STAR..., FS/GS bases, SYSENTER, TSC_AUX) passes
#   through to the CPU (:data:`CPU_HELD_MSRS`); when KVM itself writes one (an intercepted
#   guest WRMSR, or KVM_SET_MSRS) it applies __kvm_set_msr's value rules first
#   (:func:`kvm_cpu_held_msr_value`).
# - Any other MSR is unknown to KVM: KVM_MSR_RET_UNSUPPORTED → #GP, or a userspace exit with
#   reason UNKNOWN.
MISC_ENABLE_BTS_UNAVAIL = int(MiscEnable.BTS_UNAVAILABLE)
MISC_ENABLE_PEBS_UNAVAIL = int(MiscEnable.PEBS_UNAVAILABLE)
UCODE_REV_DEFAULT = 0x1_0000_0000
PAT_RESET = 0x0007_0406_0007_0406
#: MSRs KVM emulates in software (per vCPU), advertised by KVM_GET_MSR_INDEX_LIST (emulated_msrs).
EMULATED_MSRS: tuple[int, ...] = (int(Msr.IA32_UCODE_REV), int(Msr.IA32_SMBASE), int(Msr.IA32_MISC_ENABLE),
                                  int(Msr.IA32_ARCH_CAPABILITIES),
                                  *KVMCLOCK_EMULATED_MSRS)
#: MSRs of KVM_GET_MSR_INDEX_LIST that KVM keeps in software, with their RESET values.
SOFTWARE_MSR_RESET: dict[int, int] = {
    int(Msr.IA32_FEATURE_CONTROL): 0,
    int(Msr.IA32_TSC_DEADLINE): 0,
    int(Msr.IA32_UCODE_REV): UCODE_REV_DEFAULT,
    int(Msr.IA32_MISC_ENABLE): MISC_ENABLE_PEBS_UNAVAIL | MISC_ENABLE_BTS_UNAVAIL,
}


#: MSRs the CPU holds and checks itself; KVM lets the guest reach them directly (the APIC base
#: and PAT are KVM's own: kvm_set_apic_base, kvm_pat_valid; the TSC is KVM's too: kvm_set_tsc).
CPU_HELD_MSRS: frozenset[int] = ENGINE_MSRS - {int(Msr.IA32_APIC_BASE), int(Msr.IA32_PAT),
                                               int(Msr.IA32_TIME_STAMP_COUNTER)}


def kvm_pat_valid(data: int) -> bool:
    """kvm_pat_valid(): every byte is a memory type 0, 1, 4, 5, 6 or 7 [SDM §11.12.2]."""
    return all((data >> (8 * i)) & 0xFF in (0, 1, 4, 5, 6, 7) for i in range(8))


def kvm_apic_set_base_valid(old: int, new: int, maxphyaddr: int, x2apic: bool, host_initiated: bool) -> bool:
    """kvm_apic_set_base(): the architectural rule of :func:`cetvm.arch.apic.apic_base_write_error`
    (reserved bits, EXTD without EN, and for the guest the forbidden mode transitions)."""
    return apic_base_write_error(old, new, maxphyaddr, x2apic, host_initiated) is None


def guest_maxphyaddr(vcpu: VcpuArch) -> int:
    """cpuid_query_maxphyaddr(): CPUID.80000008H:EAX[7:0], 36 without that leaf."""
    return vcpu.cpuid.entries.phys_addr_bits


# ----------------------------------------------------------------------------- MTRR, MCE, PERF_CAPABILITIES
# The MSRs of CPUID features the guest sees that KVM emulates in software (every feature the
# guest CPUID shows has working MSRs, see tests/vmm/test_guest_cpuid_honesty.py):
#
# - MTRR (CPUID.1.EDX[12]): kvm_mtrr_get_msr/kvm_mtrr_set_msr [K mtrr.c]. MTRRcap is read-only
#   0x508 (WC, fixed ranges, KVM_NR_VAR_MTRR = 8); MTRRdefType, the 11 fixed-range MSRs and the
#   8 variable pairs are stored after kvm_mtrr_valid()'s checks (memory types 0/1/4/5/6,
#   reserved bits, bits above MAXPHYADDR).
# - MCE/MCA (CPUID.1.EDX[7,14]): get_msr_mce/set_msr_mce [K x86.c] with KVM's default
#   mcg_cap = KVM_MAX_MCE_BANKS (32 banks, no MCG_CTL_P/CMCI_P: userspace did not call
#   KVM_X86_SETUP_MCE). MCG_CAP is read-only; MCG_CTL does not exist without MCG_CTL_P; MCi_CTL
#   takes 0 or all ones; a guest writes only 0 to MCi_STATUS.
# - IA32_PERF_CAPABILITIES (CPUID.1.ECX[15] PDCM): vcpu->arch.perf_capabilities. cetvm's KVM has
#   no vPMU (the engine has no performance counters: enable_pmu=0), so kvm_caps.supported_perf_cap
#   is 0: the guest reads 0 when its CPUID shows PDCM and gets #GP otherwise; only userspace may
#   write, and only 0 (kvm_set_msr_common: ``data & ~kvm_caps.supported_perf_cap`` fails).
MSR_MTRRCAP = 0xFE
MSR_MTRR_DEF_TYPE = 0x2FF
MTRRCAP_VALUE = 0x500 | 8
MTRR_VAR_MSRS = frozenset(range(0x200, 0x210))
MTRR_FIXED_MSRS = frozenset({0x250, 0x258, 0x259, *range(0x268, 0x270)})
MSR_MCG_CAP = 0x179
MSR_MCG_STATUS = 0x17A
MSR_MCG_CTL = 0x17B
MSR_MC0_CTL = 0x400
KVM_MAX_MCE_BANKS = 32
MCG_CTL_P = 1 << 8
MSR_PERF_CAPABILITIES = 0x345
SUPPORTED_PERF_CAP = 0

# - IA32_ARCH_CAPABILITIES (CPUID.(7,0).EDX[29], which KVM always shows: it emulates the MSR):
#   vcpu->arch.arch_capabilities, set at vCPU creation to kvm_get_arch_capabilities(); the guest
#   reads it (#GP without the CPUID bit), only userspace writes it, within what KVM supports.
_AC = ArchCapabilities
#: KVM_SUPPORTED_ARCH_CAP less what names a feature cetvm's CPU lacks: IBRS_ALL (no
#: IA32_SPEC_CTRL), TSX_CTRL (no TSX), FB_CLEAR (VERW clears no buffers), RSBA.
KVM_SUPPORTED_ARCH_CAP = int(_AC.RDCL_NO | _AC.SKIP_L1DFL_VMENTRY | _AC.SSB_NO | _AC.MDS_NO | _AC.IF_PSCHANGE_MC_NO
                             | _AC.TAA_NO | _AC.SBDR_SSDP_NO | _AC.FBSDP_NO | _AC.PSDP_NO | _AC.GDS_NO
                             | _AC.RFDS_NO)
#: What AMD processors are not susceptible to (Linux's cpu_vuln_whitelist: NO_MELTDOWN, NO_MDS,
#: no TSX, NO_MMIO): the *_NO facts KVM adds from the host's bug bits.
_AMD_NOT_AFFECTED = int(_AC.RDCL_NO | _AC.MDS_NO | _AC.TAA_NO | _AC.SBDR_SSDP_NO | _AC.FBSDP_NO | _AC.PSDP_NO
                        | _AC.GDS_NO | _AC.RFDS_NO)


def kvm_get_arch_capabilities(host: Host) -> int:
    """kvm_get_arch_capabilities() [K x86.c]: the host's supported bits, PSCHANGE_MC_NO (KVM's
    shadow paging handles iTLB multihit) and SKIP_L1DFL_VMENTRY (KVM flushes L1D itself where
    needed), and each *_NO the host's bug bits allow — Intel hosts from their own MSR, AMD
    hosts from Linux's whitelist. TAA_NO only with RTM on the host ("TAA_NO is meaningless
    without TSX")."""
    host_value = host.arch_capabilities or 0
    not_affected = _AMD_NOT_AFFECTED if host.vendor == "amd" else host_value
    data = host_value & KVM_SUPPORTED_ARCH_CAP
    data |= int(_AC.IF_PSCHANGE_MC_NO | _AC.SKIP_L1DFL_VMENTRY)
    data |= not_affected & int(_AC.RDCL_NO | _AC.SSB_NO | _AC.MDS_NO | _AC.RFDS_NO | _AC.GDS_NO)
    if not host.cpu.has("rtm"):
        data &= ~int(_AC.TAA_NO)
    elif not_affected & _AC.TAA_NO:
        data |= int(_AC.TAA_NO)
    return data
_MEMTYPES = (0, 1, 4, 5, 6)


def kvm_mtrr_valid(index: int, data: int, maxphyaddr: int) -> bool:
    """kvm_mtrr_valid() [K mtrr.c]."""
    if index in MTRR_FIXED_MSRS:
        return all((data >> (8 * i)) & 0xFF in _MEMTYPES for i in range(8))
    if index == MSR_MTRR_DEF_TYPE:
        return not data & ~0xCFF and data & 0xFF in _MEMTYPES
    if index in MTRR_VAR_MSRS:
        reserved = ~((1 << maxphyaddr) - 1) & 0xFFFF_FFFF_FFFF_FFFF
        if index & 1 == 0:  # PHYSBASE: type in 7:0, 11:8 reserved
            return data & 0xFF in _MEMTYPES and not data & (reserved | 0xF00)
        return not data & (reserved | 0x7FF)  # PHYSMASK: 10:0 reserved, 11 = valid
    return False


#: MSRs KVM's kvm_get_msr_common reads as 0 for any guest (no vPMU: the legacy K7/P6 counters
#: and event selects fall through to "data = 0"; platform, AMD configuration and RAPL MSRs KVM
#: stubs out) [K x86.c].
LEGACY_PMU_MSRS = frozenset({*range(0xC001_0000, 0xC001_0008), 0xC1, 0xC2, 0x186, 0x187})
READ_ZERO_MSRS = LEGACY_PMU_MSRS | frozenset({
    0x17,                      # IA32_PLATFORM_ID
    0x2A,                      # IA32_EBL_CR_POWERON
    0xCE,                      # PLATFORM_INFO (guest_can_read_msr_platform_info, value 0)
    0x199,                     # IA32_PERF_CTL
    0x1DB, 0x1DC, 0x1DD, 0x1DE,  # last branch / last exception records (no LBR)
    0x606, 0x611, 0x619, 0x639, 0x641,  # RAPL power unit and energy status
    0xC001_0010, 0xC001_0112, 0xC001_0113, 0xC001_0055, 0xC001_001F, 0xC001_0058,  # K8 SYSCFG..
    0xC001_0117,               # VM_HSAVE_PA
    0xC001_102A, 0xC001_1022, 0xC001_1023, 0xC001_102C,  # BU_CFG2, DC_CFG, TW_CFG, EX_CFG
})
#: Of those, the ones whose guest writes KVM accepts and ignores (the legacy counters take any
#: value; the AMD configuration MSRs are "break;" in kvm_set_msr_common).
WRITE_IGNORED_MSRS = LEGACY_PMU_MSRS | frozenset({0xC001_001F, 0xC001_0117, 0xC001_102A, 0xC001_1022,
                                                  0xC001_1023, 0xC001_102C})
#: IA32_POWER_CTL: vcpu->arch.msr_ia32_power_ctl, read/write.
MSR_IA32_POWER_CTL = 0x1FC


def _mce_bank_msr(index: int) -> bool:
    return MSR_MC0_CTL <= index < MSR_MC0_CTL + 4 * KVM_MAX_MCE_BANKS


@dataclass
class KvmMsrState:
    """vcpu->arch's copies of the non-CET MSRs KVM emulates (apic_base, the software MSRs,
    MTRRs, machine-check banks, PERF_CAPABILITIES) and its timekeeping (``time``: the TSC
    and kvmclock, :mod:`cetvm.kvm.timekeeping`; None only for a state no vCPU owns)."""

    apic_base: int = apic_base_reset_value(True)
    software: dict[int, int] = field(default_factory=lambda: dict(SOFTWARE_MSR_RESET))
    mtrr: dict[int, int] = field(default_factory=dict)
    mce: dict[int, int] = field(default_factory=dict)
    mcg_cap: int = KVM_MAX_MCE_BANKS
    perf_capabilities: int = 0
    #: vcpu->arch.arch_capabilities (:func:`kvm_get_arch_capabilities` at creation; RESET and
    #: INIT keep it, as KVM)
    arch_capabilities: int = 0
    time: VcpuTime | None = None

    def reset(self, init_event: bool, bsp: bool = True) -> None:
        """kvm_vcpu_reset(): RESET restores every value; INIT keeps them (SDM Table 10-1), but
        both disable kvmclock (kvmclock_reset)."""
        if self.time is not None:
            self.time.reset()
        if not init_event:
            self.apic_base = apic_base_reset_value(bsp)
            self.software = dict(SOFTWARE_MSR_RESET)
            self.mtrr = {}
            self.mce = {}


def _feature_msr_get(vcpu: VcpuArch, msrs: KvmMsrState, index: int,
                     host_initiated: bool) -> tuple[MsrResult, int] | None:
    """MTRR / MCE / PERF_CAPABILITIES reads (None: not one of them)."""
    if index == MSR_MTRRCAP:
        return MsrResult.OK, MTRRCAP_VALUE
    if index == MSR_MTRR_DEF_TYPE or index in MTRR_FIXED_MSRS or index in MTRR_VAR_MSRS:
        return MsrResult.OK, msrs.mtrr.get(index, 0)
    if index == MSR_MCG_CAP:
        return MsrResult.OK, msrs.mcg_cap
    if index == MSR_MCG_STATUS:
        return MsrResult.OK, msrs.mce.get(index, 0)
    if index == MSR_MCG_CTL:
        return (MsrResult.OK, msrs.mce.get(index, 0)) if msrs.mcg_cap & MCG_CTL_P else (MsrResult.ERROR, 0)
    if _mce_bank_msr(index):
        if (index - MSR_MC0_CTL) // 4 >= msrs.mcg_cap & 0xFF:
            return MsrResult.ERROR, 0
        return MsrResult.OK, msrs.mce.get(index, 0)
    if index == MSR_PERF_CAPABILITIES:
        if not host_initiated and not vcpu.cpuid.guest_cpuid_has("pdcm"):
            return MsrResult.ERROR, 0
        return MsrResult.OK, msrs.perf_capabilities
    if index == Msr.IA32_ARCH_CAPABILITIES:
        if not host_initiated and not vcpu.cpuid.guest_cpuid_has("arch_capabilities"):
            return MsrResult.ERROR, 0
        return MsrResult.OK, msrs.arch_capabilities
    if index in READ_ZERO_MSRS:
        return MsrResult.OK, 0
    if index == MSR_IA32_POWER_CTL:
        return MsrResult.OK, msrs.mce.get(index, 0)
    return None


def _feature_msr_set(vcpu: VcpuArch, msrs: KvmMsrState, index: int, data: int,
                     host_initiated: bool) -> MsrResult | None:
    """MTRR / MCE / PERF_CAPABILITIES writes (None: not one of them)."""
    if index == MSR_MTRRCAP:
        return MsrResult.ERROR
    if index == MSR_MTRR_DEF_TYPE or index in MTRR_FIXED_MSRS or index in MTRR_VAR_MSRS:
        if not kvm_mtrr_valid(index, data, guest_maxphyaddr(vcpu)):
            return MsrResult.ERROR
        msrs.mtrr[index] = data
        return MsrResult.OK
    if index == MSR_MCG_CAP:
        return MsrResult.UNSUPPORTED
    if index in (MSR_MCG_STATUS, MSR_MCG_CTL):
        if index == MSR_MCG_CTL and (not msrs.mcg_cap & MCG_CTL_P or data not in (0, 0xFFFF_FFFF_FFFF_FFFF)):
            return MsrResult.ERROR
        msrs.mce[index] = data
        return MsrResult.OK
    if _mce_bank_msr(index):
        offset = (index - MSR_MC0_CTL) % 4
        if (index - MSR_MC0_CTL) // 4 >= msrs.mcg_cap & 0xFF:
            return MsrResult.ERROR
        if offset == 0 and data not in (0, 0xFFFF_FFFF_FFFF_FFFF):
            return MsrResult.ERROR
        if offset == 1 and data and not host_initiated:
            return MsrResult.ERROR
        msrs.mce[index] = data
        return MsrResult.OK
    if index == MSR_PERF_CAPABILITIES:
        if not host_initiated or data & ~SUPPORTED_PERF_CAP:
            return MsrResult.ERROR
        msrs.perf_capabilities = data
        return MsrResult.OK
    if index == Msr.IA32_ARCH_CAPABILITIES:
        if not host_initiated or data & ~kvm_get_arch_capabilities(vcpu.caps.host):
            return MsrResult.ERROR
        msrs.arch_capabilities = data
        return MsrResult.OK
    if index in WRITE_IGNORED_MSRS:
        return MsrResult.OK
    if index == MSR_IA32_POWER_CTL:
        msrs.mce[index] = data
        return MsrResult.OK
    return None


def feature_control_valid_bits(vcpu: VcpuArch) -> int:
    """vmx->msr_ia32_feature_control_valid_bits: LOCKED always, the VMXON enables when the
    guest may use VMX (vmx_vcpu_after_set_cpuid with nested_vmx_allowed)."""
    valid = int(FeatureControl.LOCKED)
    if vcpu.caps.host.nested_vmx and vcpu.cpuid.guest_cpuid_has("vmx"):
        valid |= int(FeatureControl.VMXON_INSIDE_SMX | FeatureControl.VMXON_OUTSIDE_SMX)
    return valid


def vmx_feature_control_msr_valid(vcpu: VcpuArch, old: int, data: int, host_initiated: bool) -> bool:
    """vmx_feature_control_msr_valid(): the guest cannot write it once LOCKED; only valid bits."""
    if not host_initiated and old & FeatureControl.LOCKED:
        return False
    return not data & ~feature_control_valid_bits(vcpu)


def vmx_capability_msr(vcpu: VcpuArch, index: int, host_initiated: bool) -> tuple[MsrResult, int]:
    """vmx_get_msr() for IA32_VMX_BASIC .. IA32_VMX_VMFUNC: #GP without VMX in the guest CPUID
    (userspace may read them whenever kvm_intel has nested=1) [K vmx.c, nested.c]."""
    from_guest_ok = vcpu.cpuid.guest_cpuid_has("vmx") or host_initiated
    if not vcpu.caps.host.nested_vmx or not from_guest_ok:
        return MsrResult.UNSUPPORTED if not vcpu.caps.host.nested_vmx else MsrResult.ERROR, 0
    return MsrResult.OK, nested_vmx_msrs_for(vcpu).value(index)


def nested_vmx_msrs_for(vcpu: VcpuArch) -> NestedVmxMsrs:
    """The vCPU's struct nested_vmx_msrs (a pure function of KVM's caps and the guest CPUID)."""
    fields = vmcs12_fields(vmcs12_cet_fields_exist(vcpu.caps))
    return nested_vmx_setup_ctls_msrs(vcpu.caps, vcpu.cpuid, vmcs_enum_max_index(fields))


#: DEBUGCTL bits KVM drops instead of failing the write when it does not support them
#: (vmx_is_valid_debugctl: "kvm_pr_unimpl_wrmsr" for BTF and LBR).
DEBUGCTL_IGNORED = int(DebugCtl.BTF | DebugCtl.LBR)


def vmx_get_supported_debugctl(vcpu: VcpuArch, host_initiated: bool) -> int:
    """vmx_get_supported_debugctl(): the IA32_DEBUGCTL bits a guest may set. Only RTM debugging
    (with RTM in the guest CPUID, or for userspace): cetvm's KVM has no PMU and so no LBR
    virtualization (LBR, FREEZE_LBRS_ON_PMI), and its CPUID model has no bus-lock detection."""
    return int(DebugCtl.RTM_DEBUG) if host_initiated or vcpu.cpuid.guest_cpu_cap_has("rtm") else 0


def vmx_set_debugctl(vcpu: VcpuArch, data: int, host_initiated: bool) -> bool:
    """vmx_set_msr(MSR_IA32_DEBUGCTLMSR): vmx_is_valid_debugctl (an unsupported bit other than
    BTF/LBR fails), then the supported bits go into the current VMCS's GUEST_IA32_DEBUGCTL
    (vmx_guest_debugctl_write) — vmcs02's while L2 runs."""
    supported = vmx_get_supported_debugctl(vcpu, host_initiated)
    if data & ~supported & ~DEBUGCTL_IGNORED:
        return False
    vcpu.vmcs.write(VmcsField.GUEST_IA32_DEBUGCTL, data & supported)
    return True


def kvm_common_set_msr(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int, data: int,
                       host_initiated: bool) -> MsrResult:
    """kvm_set_msr_common() for the non-CET MSRs (raw result, see the decisions above)."""
    if index == Msr.IA32_DEBUGCTL:
        return MsrResult.OK if vmx_set_debugctl(vcpu, data, host_initiated) else MsrResult.ERROR
    if index in VMX_CAPABILITY_MSRS:  # vmx_set_vmx_msr(): read-only to the guest; userspace
        ret, value = vmx_capability_msr(vcpu, index, host_initiated)  # may restore the same value
        if ret is not MsrResult.OK:
            return ret
        return MsrResult.OK if host_initiated and data == value else MsrResult.ERROR
    if index == Msr.IA32_FEATURE_CONTROL:
        if not vmx_feature_control_msr_valid(vcpu, msrs.software[index], data, host_initiated):
            return MsrResult.ERROR
        msrs.software[index] = data
        return MsrResult.OK
    if index == Msr.IA32_APIC_BASE:
        if not kvm_apic_set_base_valid(msrs.apic_base, data, guest_maxphyaddr(vcpu),
                                       vcpu.cpuid.guest_cpuid_has("x2apic"), host_initiated):
            return MsrResult.ERROR
        msrs.apic_base = data
        return MsrResult.OK
    if index == Msr.IA32_PAT:
        if not kvm_pat_valid(data):
            return MsrResult.ERROR
        cpu.set_msr(index, data)
        return MsrResult.OK
    if index in X2APIC_MSRS:
        return MsrResult.ERROR  # kvm_x2apic_msr_write(): no in-kernel APIC
    if index == Msr.IA32_SMBASE:
        if not host_initiated:
            return MsrResult.ERROR
        vcpu.smbase = data
        return MsrResult.OK
    if index in TIME_MSRS and msrs.time is not None:
        return MsrResult.OK if msrs.time.set_msr(index, data, host_initiated) else MsrResult.ERROR
    feature = _feature_msr_set(vcpu, msrs, index, data, host_initiated)
    if feature is not None:
        return feature
    if index == Msr.IA32_UCODE_REV:
        if host_initiated:
            msrs.software[index] = data
        return MsrResult.OK
    if index in msrs.software:
        msrs.software[index] = data
        return MsrResult.OK
    if index in CPU_HELD_MSRS:
        value = kvm_cpu_held_msr_value(vcpu, cpu, index, data, host_initiated)
        if value is None:
            return MsrResult.ERROR
        cpu.set_msr(index, value)
        return MsrResult.OK
    return MsrResult.UNSUPPORTED


def kvm_common_get_msr(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int,
                       host_initiated: bool) -> tuple[MsrResult, int]:
    """kvm_get_msr_common() for the non-CET MSRs."""
    if index == Msr.IA32_DEBUGCTL:  # vmx_get_msr: the current VMCS's GUEST_IA32_DEBUGCTL
        return MsrResult.OK, vcpu.vmcs.read(VmcsField.GUEST_IA32_DEBUGCTL)
    if index in VMX_CAPABILITY_MSRS:
        return vmx_capability_msr(vcpu, index, host_initiated)
    if index == Msr.IA32_APIC_BASE:
        return MsrResult.OK, msrs.apic_base
    if index in X2APIC_MSRS:
        return MsrResult.ERROR, 0  # kvm_x2apic_msr_read(): no in-kernel APIC
    if index == Msr.IA32_SMBASE:
        return (MsrResult.OK, vcpu.smbase) if host_initiated else (MsrResult.ERROR, 0)
    if index in TIME_MSRS and msrs.time is not None:
        value = msrs.time.get_msr(index, host_initiated)
        return (MsrResult.ERROR, 0) if value is None else (MsrResult.OK, value)
    feature = _feature_msr_get(vcpu, msrs, index, host_initiated)
    if feature is not None:
        return feature
    if index in msrs.software:
        return MsrResult.OK, msrs.software[index]
    if index == Msr.IA32_PAT or index in CPU_HELD_MSRS:
        return MsrResult.OK, cpu.msr(index)
    return MsrResult.UNSUPPORTED, 0


#: MSRs holding a linear address: a non-canonical value fails (__kvm_set_msr, is_noncanonical_msr_address).
_ADDRESS_MSRS = frozenset(int(m) for m in (Msr.IA32_LSTAR, Msr.IA32_CSTAR, Msr.IA32_FS_BASE, Msr.IA32_GS_BASE,
                                           Msr.IA32_KERNEL_GS_BASE))
#: SYSENTER_EIP/ESP: made canonical instead of refused (__kvm_set_msr).
_SYSENTER_ADDRESS_MSRS = frozenset(int(m) for m in (Msr.IA32_SYSENTER_ESP, Msr.IA32_SYSENTER_EIP))
#: The widest IA32_SYSENTER_CS value cetvm's CPU holds: the 16-bit selector.
SYSENTER_CS_MAX = 0xFFFF


def kvm_set_efer_value(vcpu: VcpuArch, old: int, new: int, paging: bool, host_initiated: bool) -> int | None:
    """set_efer(): the EFER to store, or None ("return 1").

    Reserved bits (efer_reserved_bits: all but SCE, LME, LMA and NXE on VMX) always fail. For
    the guest, __kvm_valid_efer (LME/LMA need guest LM, NXE needs guest NX) and no LME toggle
    while paging. LMA is not writable: the stored value keeps the vCPU's current LMA, for
    userspace too (``efer &= ~EFER_LMA; efer |= vcpu->arch.efer & EFER_LMA``).
    """
    if new & ~EFER_DEFINED_INTEL:
        return None
    if not host_initiated:
        if new & (Efer.LME | Efer.LMA) and not vcpu.cpuid.guest_cpuid_has("lm"):
            return None
        if new & Efer.NXE and not vcpu.cpuid.guest_cpuid_has("nx"):
            return None
        if paging and (old ^ new) & Efer.LME:
            return None
    return (new & ~Efer.LMA) | (old & Efer.LMA)


def kvm_cpu_held_msr_value(vcpu: VcpuArch, cpu, index: int, data: int, host_initiated: bool) -> int | None:
    """__kvm_set_msr()'s value rules for the MSRs the CPU holds, for the guest (reached only
    when a filter makes KVM intercept them) and for KVM_SET_MSRS alike: the value to store, or
    None when KVM fails the write ("return 1").

    - LSTAR, CSTAR, FS/GS/KERNEL_GS_BASE: non-canonical (48-bit) fails.
    - SYSENTER_EIP/ESP: made canonical (``__canonical_address``), never refused — KVM's
      choice so that VM entry cannot fail and 64-bit SYSENTER stays deterministic.
    - TSC_AUX: bits 63:32 fail for an Intel-compatible guest; otherwise they are dropped.
    - EFER: :func:`kvm_set_efer_value`.
    - SYSENTER_CS: decision — KVM keeps 32 bits (vmcs_write32); cetvm's CPU holds the 16-bit
      selector, so a wider value is refused rather than truncated.
    """
    if index in _ADDRESS_MSRS:
        return data if is_canonical(data) else None
    if index in _SYSENTER_ADDRESS_MSRS:
        return canonicalize(data)
    if index == Msr.IA32_TSC_AUX:
        if data >> 32 and vcpu.cpuid.entries.vendor != "amd":
            return None
        return data & 0xFFFF_FFFF
    if index == Msr.IA32_SYSENTER_CS:
        return None if data > SYSENTER_CS_MAX else data
    if index == Msr.IA32_EFER:
        return kvm_set_efer_value(vcpu, cpu.msr(index), data, bool(cpu.cr0 & Cr0.PG), host_initiated)
    return data


# ----------------------------------------------------------------------------- guest access, raw
def kvm_guest_get_msr_raw(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int) -> tuple[MsrResult, int]:
    """A guest RDMSR as kvm_get_msr_ignored_check() sees it before kvm_do_msr_access() turns
    the raw code into #GP: OK, ERROR (→ KVM_MSR_EXIT_REASON_INVAL) or UNSUPPORTED
    (→ KVM_MSR_EXIT_REASON_UNKNOWN). The caller puts the guest FPU for xstate-managed MSRs."""
    if index in MODELLED_MSRS:
        ret, data = __kvm_get_msr(vcpu, index, host_initiated=False)
    else:
        ret, data = kvm_common_get_msr(vcpu, msrs, cpu, index, host_initiated=False)
    return ret, data if ret is MsrResult.OK else 0


def kvm_guest_set_msr_raw(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int, data: int) -> MsrResult:
    """A guest WRMSR, raw result (see :func:`kvm_guest_get_msr_raw`)."""
    data &= 0xFFFF_FFFF_FFFF_FFFF
    if index in MODELLED_MSRS:
        return __kvm_set_msr(vcpu, index, data, host_initiated=False)
    return kvm_common_set_msr(vcpu, msrs, cpu, index, data, host_initiated=False)


def kvm_host_get_msr(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int) -> tuple[bool, int]:
    """KVM_GET_MSRS for one non-CET MSR (host_initiated): (ok, value)."""
    ret, data = kvm_common_get_msr(vcpu, msrs, cpu, index, host_initiated=True)
    return ret is MsrResult.OK, data


def kvm_host_set_msr(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int, data: int) -> bool:
    """KVM_SET_MSRS for one non-CET MSR (host_initiated: KVM's value checks apply, the guest's
    CPUID-dependent ones do not, see :func:`kvm_cpu_held_msr_value`)."""
    return kvm_common_set_msr(vcpu, msrs, cpu, index, data, host_initiated=True) is MsrResult.OK
