"""KVM's CET capabilities for a host: kvm_set_cpu_caps / vmx|svm_set_cpu_caps / kvm_setup_xss_caps.

The rules run in the order of KVM 6.18's code; the first rule that clears a feature gives its
reason [K]:

1. kvm_x86_vendor_init: host S_CET.SH_STK_EN set → refuse to load (-EIO).
2. kvm_set_cpu_caps (cpuid.c): caps = KVM-known features & boot_cpu_data (CPU lacks it;
   ``ibt=off`` / no CONFIG_X86_KERNEL_IBT clears X86_FEATURE_IBT); SHSTK needs a 64-bit host
   (always true here); ``!tdp_enabled`` clears SHSTK; ``allow_smaller_maxphyaddr`` clears both.
3. vmx_set_cpu_caps: both cleared without the load-CET-state controls, without unrestricted
   guest, or without IA32_VMX_BASIC[56]. vmx_hardware_setup turns unrestricted guest off when
   EPT is off, so on VMX ``tdp=False`` also clears IBT (decision, faithful to vmx.c).
   svm_set_cpu_caps: IBT always cleared.
4. kvm_setup_xss_caps (x86.c): supported_xss = host XSS & (CET_USER|CET_KERNEL), 0 without
   XSAVES; CET bits dropped when neither feature is left; if CET_USER and CET_KERNEL are not
   both present, SHSTK and IBT are cleared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cetvm.arch.msr import Msr
from cetvm.arch.xfeatures import (
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_CET,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_MPX,
    XFEATURE_MASK_XTILE,
    XFeature,
    xfeature_name,
)
# Re-exported for the VMM, which sees the CPU only through kvm: per CPUID feature word, the bits
# the CPU under this KVM can execute. A real KVM_GET_SUPPORTED_CPUID is masked by the hardware's
# CPUID; cetvm models the host's CPUID for policy and the VMM masks the guest with this, as QEMU
# masks a TCG guest with TCG_*_FEATURES.
from cetvm.cpu.engine_features import engine_feature_words  # noqa: F401
from cetvm.kvm.errors import KvmLoadError
from cetvm.cpuid.model import CpuidModel
from cetvm.kvm.host import Host
from cetvm.kvm.supported_cpuid import kvm_get_supported_cpuid
from cetvm.kvm.xstate_size import host_xcr0, host_xss, xstate_required_size

#: KVM_SUPPORTED_XCR0 (x86.c): the XCR0 components KVM can virtualize.
KVM_SUPPORTED_XCR0 = (XFEATURE_MASK_FPSSE | XFeature.YMM.mask | XFEATURE_MASK_MPX
                      | XFEATURE_MASK_AVX512 | XFeature.PKRU.mask | XFEATURE_MASK_XTILE)
#: KVM_SUPPORTED_XSS (x86.c, 6.18): only the CET components.
KVM_SUPPORTED_XSS = XFEATURE_MASK_CET
#: Dynamic user features a process gets only after ARCH_REQ_XCOMP_GUEST_PERM (AMX tile data).
XFEATURE_MASK_USER_DYNAMIC = XFeature.XTILE_DATA.mask

#: MSRs every KVM reports as to-be-saved (msrs_to_save_base / emulated, the CET-independent part).
BASE_MSRS: tuple[int, ...] = (
    Msr.IA32_SYSENTER_CS, Msr.IA32_SYSENTER_ESP, Msr.IA32_SYSENTER_EIP,
    Msr.IA32_STAR, Msr.IA32_CSTAR, Msr.IA32_KERNEL_GS_BASE, Msr.IA32_FMASK, Msr.IA32_LSTAR,
    Msr.IA32_TIME_STAMP_COUNTER, Msr.IA32_TSC_ADJUST,
    Msr.IA32_PAT, Msr.IA32_FEATURE_CONTROL, Msr.IA32_TSC_AUX, Msr.IA32_TSC_DEADLINE,
    Msr.IA32_EFER, Msr.IA32_APIC_BASE,
)

MSR_NAMES: dict[int, str] = {int(m): m.name for m in Msr}

OFFERED = "offered"


@dataclass(frozen=True)
class FeatureDecision:
    """Whether KVM offers a feature, and the first rule that decided it."""

    offered: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"offered": self.offered, "reason": self.reason}


@dataclass(frozen=True)
class KvmCaps:
    """kvm_caps + kvm_cpu_caps for one host (what KVM_GET_SUPPORTED_CPUID is built from)."""

    host: Host
    supported_xcr0: int
    supported_xss: int
    features: frozenset[str]
    cet: dict[str, FeatureDecision] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        """kvm_cpu_cap_has(X86_FEATURE_<feature>)."""
        return feature in self.features

    def filtered_xcr0(self, guest_perm: int = 0) -> int:
        """kvm_get_filtered_xcr0(): supported XCR0 & this process's guest permissions.

        Without ARCH_REQ_XCOMP_GUEST_PERM (``guest_perm`` adds dynamic features) AMX tile data
        is not permitted, and KVM then drops TILECFG too (never report half of XTILE).
        """
        permitted = self.supported_xcr0 & (~XFEATURE_MASK_USER_DYNAMIC | guest_perm)
        if permitted & XFEATURE_MASK_XTILE != XFEATURE_MASK_XTILE:
            permitted &= ~XFEATURE_MASK_XTILE
        return permitted

    def guest_xstate_size(self, guest_perm: int = 0) -> dict[str, int]:
        """Sizes KVM reports: standard = CPUID.(0xD,0).EBX (KVM_GET_XSAVE2 size, min 4096 aside),
        compacted = CPUID.(0xD,1).EBX for XCR0 | XSS = everything supported."""
        xcr0 = self.filtered_xcr0(guest_perm)
        cpu = self.host.cpu
        compacted = (xstate_required_size(cpu, xcr0 | self.supported_xss, True)
                     if self.has("xsaves") or self.has("xsavec") else 0)
        return {"standard": xstate_required_size(cpu, xcr0, False), "compacted": compacted}

    def get_supported_cpuid(self, guest_perm: int = 0) -> CpuidModel:
        """KVM_GET_SUPPORTED_CPUID (see :mod:`cetvm.kvm.supported_cpuid`)."""
        return kvm_get_supported_cpuid(self, guest_perm)

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: base MSRs plus the CET/XSS part (kvm_probe_msr_to_save)."""
        return list(BASE_MSRS) + cet_msrs_to_save(self)


# --------------------------------------------------------------------------- load checks
def kvm_check_host_s_cet(host: Host) -> None:
    """kvm_x86_vendor_init: refuse to load if the host uses supervisor shadow stacks.

    Linux doesn't support supervisor shadow stacks, so KVM doesn't save/restore the PLx_SSP
    MSRs for the host; with S_CET.SH_STK_EN set it would clobber them → -EIO.
    """
    if host.supervisor_shstk and (host.cpu.has("shstk") or host.cpu.has("ibt")):
        raise KvmLoadError("kvm: host runs with supervisor shadow stacks (S_CET.SH_STK_EN); "
                           "KVM does not save/restore the host's PLx_SSP MSRs and refuses to load (-EIO)")


def kvm_check_vendor_module(host: Host) -> None:
    """The vendor module must match the CPU: kvm_intel's cpu_has_kvm_support() / kvm_amd's
    kvm_is_svm_supported() refuse to load on the other vendor's CPU (-EOPNOTSUPP)."""
    if host.virt == "vmx" and host.cpu.vendor == "amd":
        raise KvmLoadError("kvm_intel: the CPU is AMD (AuthenticAMD), VMX is not supported; use --virt svm")
    if host.virt == "svm" and host.cpu.vendor == "intel":
        raise KvmLoadError("kvm_amd: the CPU is Intel (GenuineIntel), SVM is not supported; use --virt vmx")


# --------------------------------------------------------------------------- CET rules
Rule = Callable[[Host], "str | None"]


def _cpu_lacks_shstk(host: Host) -> str | None:
    return None if host.cpu.has("shstk") else "CPU lacks CET (no SHSTK: CPUID.(7,0).ECX[7] clear)"


def _cpu_lacks_ibt(host: Host) -> str | None:
    if not host.cpu.has("ibt"):
        return "CPU lacks CET (no IBT: CPUID.(7,0).EDX[20] clear)"
    if host.cmdline.ibt_off:
        return "host kernel booted with ibt=off (X86_FEATURE_IBT cleared in boot_cpu_data)"
    if not host.kernel_ibt:
        return "host kernel built without CONFIG_X86_KERNEL_IBT (X86_FEATURE_IBT disabled)"
    return None


def _no_tdp_shstk(host: Host) -> str | None:
    """kvm_set_cpu_caps: KVM doesn't handle shadow-stack #PFs with shadow paging."""
    return None if host.tdp else "no TDP (shadow paging): SHSTK not supported"


def _smaller_maxphyaddr(host: Host) -> str | None:
    """kvm_set_cpu_caps: the emulator (used for reserved-GPA emulation) knows no CET."""
    if host.allow_smaller_maxphyaddr:
        return "allow_smaller_maxphyaddr: KVM's emulator does not support CET"
    return None


def _vmx_rules(host: Host) -> str | None:
    """vmx_set_cpu_caps: load-CET controls, unrestricted guest (needs EPT), VMX_BASIC[56]."""
    if host.virt != "vmx":
        return None
    if not host.vmx_load_cet_controls:
        return "VMX lacks load-CET-state entry/exit controls"
    if not host.unrestricted_guest:
        return "VMX without unrestricted guest: KVM's emulator does not enforce CET"
    if not host.tdp:
        return "VMX without EPT has no unrestricted guest: KVM's emulator does not enforce CET"
    if not host.vmx_basic_56:
        return "IA32_VMX_BASIC[56] clear: #CP cannot be injected with an error code"
    return None


def _svm_ibt(host: Host) -> str | None:
    return "SVM: KVM never offers IBT on AMD" if host.virt == "svm" else None


SHSTK_RULES: tuple[Rule, ...] = (_cpu_lacks_shstk, _no_tdp_shstk, _smaller_maxphyaddr, _vmx_rules)
IBT_RULES: tuple[Rule, ...] = (_cpu_lacks_ibt, _smaller_maxphyaddr, _vmx_rules, _svm_ibt)


def first_failing_rule(host: Host, rules: tuple[Rule, ...]) -> str | None:
    for rule in rules:
        reason = rule(host)
        if reason:
            return reason
    return None


def kvm_setup_xss_caps(host: Host, xss: int, shstk: bool, ibt: bool) -> tuple[int, str | None]:
    """kvm_setup_xss_caps(): (supported_xss, reason both CET features were cleared or None)."""
    if not host.cpu.has("xsaves"):
        return 0, "host lacks XSAVES: KVM supports no IA32_XSS state" if (shstk or ibt) else None
    if not shstk and not ibt:
        return xss & ~XFEATURE_MASK_CET, None
    if xss & XFEATURE_MASK_CET != XFEATURE_MASK_CET:
        missing = [xfeature_name(n) for n in (11, 12) if not xss >> n & 1]
        hint = " (CONFIG_X86_USER_SHADOW_STACK off)" if not xss & XFEATURE_MASK_CET_USER and not host.user_shstk else ""
        return xss & ~XFEATURE_MASK_CET, f"host XSS lacks {' and '.join(missing)}{hint}"
    return xss, None


# --------------------------------------------------------------------------- caps
#: Non-CET features cetvm tracks that KVM offers when the host CPU has them.
_PASSTHROUGH_FEATURES = ("fpu", "pae", "apic", "sep", "pge", "fxsr", "sse", "sse2", "pcid",
                         "xsave", "avx", "fsgsbase", "smep", "avx512f", "smap", "pku",
                         "amx_tile", "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd",
                         "syscall", "nx", "pdpe1gb", "lm")


def kvm_caps_for_host(host: Host) -> KvmCaps:
    """Run KVM's load-time capability code for ``host`` (see the module docstring)."""
    kvm_check_vendor_module(host)
    kvm_check_host_s_cet(host)
    cpu = host.cpu
    features = {f for f in _PASSTHROUGH_FEATURES if cpu.has(f)}
    features |= {"hypervisor", "x2apic"}  # KVM emulates both
    supported_xcr0 = host_xcr0(host) & KVM_SUPPORTED_XCR0
    if not cpu.has("mpx"):  # kvm_mpx_supported()
        supported_xcr0 &= ~XFEATURE_MASK_MPX
    else:
        features.add("mpx")
    # kvm_x86_vendor_init reads IA32_XSS only with XSAVES.
    xss = host_xss(host) & KVM_SUPPORTED_XSS if cpu.has("xsaves") else 0

    shstk_reason = first_failing_rule(host, SHSTK_RULES)
    ibt_reason = first_failing_rule(host, IBT_RULES)
    supported_xss, xss_reason = kvm_setup_xss_caps(host, xss, shstk_reason is None, ibt_reason is None)
    if xss_reason:
        shstk_reason = shstk_reason or xss_reason
        ibt_reason = ibt_reason or xss_reason
    if shstk_reason is None:
        features.add("shstk")
    if ibt_reason is None:
        features.add("ibt")
    cet = {"shstk": FeatureDecision(shstk_reason is None, shstk_reason or OFFERED),
           "ibt": FeatureDecision(ibt_reason is None, ibt_reason or OFFERED)}
    return KvmCaps(host, supported_xcr0, supported_xss, frozenset(features), cet)


# --------------------------------------------------------------------------- MSR list
def cet_msrs_to_save(caps: KvmCaps) -> list[int]:
    """kvm_probe_msr_to_save() for the CET/XSS MSRs:

    IA32_XSS if supported_xss ≠ 0; U_CET and S_CET if SHSTK or IBT; PL0-3_SSP if SHSTK;
    INT_SSP_TAB if SHSTK and LM. MSR_KVM_INTERNAL_GUEST_SSP is never listed (it is reached
    through KVM_{GET,SET}_ONE_REG only).
    """
    msrs: list[int] = []
    if caps.supported_xss:
        msrs.append(Msr.IA32_XSS)
    shstk, ibt = caps.has("shstk"), caps.has("ibt")
    if shstk or ibt:
        msrs += [Msr.IA32_U_CET, Msr.IA32_S_CET]
    if shstk:
        msrs += [Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP, Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP]
        if caps.has("lm"):
            msrs.append(Msr.IA32_INT_SSP_TAB)
    return [int(m) for m in msrs]


def msr_name(index: int) -> str:
    return MSR_NAMES.get(index, f"MSR {index:#x}")
