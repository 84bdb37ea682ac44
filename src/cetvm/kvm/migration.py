"""Can a VM's state migrate from host A to host B? The checks QEMU and KVM make on the destination.

A VMM (QEMU) migrating a guest creates the destination vCPU with the *guest's* CPUID (the one the
source gave it; with ``-cpu host`` that is the source's KVM_GET_SUPPORTED_CPUID), then restores
xstate (KVM_SET_XSAVE), MSRs (KVM_SET_MSRS for every MSR it saved) and the rest. Each check below
is one reason that restore fails or the guest breaks [QEMU kvm_get_msrs()/kvm_put_msrs(), KVM kvm_probe_msr_to_save()]:

1. :func:`check_kvm_loads` — kvm_x86_vendor_init on the destination: no KVM, no VM.
2. :func:`check_vendor` — cross-vendor migration. Decision (cetvm): a blocker. The guest kernel
   picked vendor-specific paths at boot (SYSENTER/SYSCALL in compat mode, errata, PMU) and KVM
   only partly emulates the other vendor (em_syscall()'s vendor check, svm's emulation of the
   Intel SYSENTER MSRs); QEMU refuses a vendor mismatch for ``-cpu host``.
3. :func:`check_cpuid_features` — QEMU's x86_cpu_filter_features(): every feature the guest was
   given must be in the destination's KVM_GET_SUPPORTED_CPUID, else QEMU refuses to start the
   destination ("enforce", the default for migratable CPU models). CET features come first and
   carry the destination's reason from :class:`~cetvm.kvm.caps.KvmCaps`.
4. :func:`check_xcr0` / :func:`check_xss` — KVM_SET_XSAVE rejects XSTATE_BV bits outside the
   guest-supported XCR0 (fpu_copy_uabi_to_guest_fpstate → -EINVAL); KVM_SET_MSRS(IA32_XSS)
   rejects bits outside kvm_caps.supported_xss (kvm_set_msr_common: ``data & ~kvm_caps.supported_xss``
   → 1). The XSS case is the CET restore bug: the source saved CET_U/CET_S state in IA32_XSS
   that the destination cannot take.
5. :func:`check_msrs` — QEMU saves every MSR of the source's KVM_GET_MSR_INDEX_LIST the guest
   uses; on the destination KVM_SET_MSRS stops at the first MSR KVM does not know and QEMU
   asserts the count ("kvm_put_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed").
6. :func:`check_xstate_size` — the source's KVM_GET_XSAVE2 image (max(4096, standard size of
   the guest XCR0)) must fit the destination's KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) buffer; and
   (warning) the standard-format offsets the guest read from CPUID 0xD at boot should match the
   destination hardware's [SDM Vol. 1 13.4.1: the hardware writes at *its* enumerated offsets].

:func:`restricted_cpuid` is the way out a VMM offers: start the guest with the intersection CPUID
(features both sides offer); :attr:`MigrationReport.restricted_cpuid_loses` lists what the guest
gives up, and :attr:`MigrationReport.restricted_cpuid_suffices` whether that alone would make the
migration possible (not across vendors, not to a host where KVM does not load; True when the
migration is possible as it is, since nothing needs restricting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from cetvm.arch.cpuid_bits import FEATURES, LEAF_XSTATE
from cetvm.arch.msr import Msr
from cetvm.arch.xfeatures import xfeature_name
from cetvm.kvm.caps import KvmCaps, kvm_caps_for_host, msr_name
from cetvm.kvm.errors import KvmLoadError
from cetvm.kvm.guest_fpu import KVM_XSAVE_MIN_SIZE
from cetvm.kvm.host import Host
from cetvm.kvm.xstate_size import host_layout, xstate_required_size

if TYPE_CHECKING:  # pragma: no cover
    from cetvm.cpuid.model import CpuidModel

#: Feature flags the guest does not "have" from KVM: runtime bits KVM computes (OSXSAVE).
RUNTIME_FEATURES = frozenset({"osxsave"})
#: CET feature flags, reported before every other feature.
CET_FEATURES = ("shstk", "ibt")
#: XFEATURE_MASK_USER_DYNAMIC: components that need ARCH_REQ_XCOMP_GUEST_PERM (AMX tile data).
_USER_DYNAMIC = 1 << 18
_U32 = 0xFFFF_FFFF


class Severity(str, Enum):
    BLOCKER = "blocker"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One reason the migration fails (blocker) or may misbehave (warning)."""

    severity: Severity
    what: str
    why: str

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity.value, "what": self.what, "why": self.why}


@dataclass(frozen=True)
class MigrationReport:
    """The verdict of :func:`check_migration`."""

    source: str
    destination: str
    findings: tuple[Finding, ...]
    restricted_cpuid_loses: tuple[str, ...] = ()
    restricted_cpuid_suffices: bool = False
    blockers: tuple[Finding, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blockers",
                           tuple(f for f in self.findings if f.severity is Severity.BLOCKER))

    @property
    def migratable(self) -> bool:
        return not self.blockers

    def to_json(self) -> dict[str, object]:
        return {"from": self.source, "to": self.destination, "migratable": self.migratable,
                "findings": [f.to_json() for f in self.findings],
                "restricted_cpuid_loses": list(self.restricted_cpuid_loses),
                "restricted_cpuid_suffices": self.restricted_cpuid_suffices}


def _blocker(what: str, why: str) -> Finding:
    return Finding(Severity.BLOCKER, what, why)


# --------------------------------------------------------------------------- guest state
def guest_xcr0(guest: "CpuidModel") -> int:
    """XCR0 bits the guest may enable: CPUID.(0xD,0).EDX:EAX [SDM Vol. 1 13.2]."""
    if guest.max_basic_leaf < LEAF_XSTATE:
        return 0
    eax, _, _, edx = guest.get(LEAF_XSTATE, 0)
    return eax | edx << 32


def guest_xss(guest: "CpuidModel") -> int:
    """IA32_XSS bits the guest may set: CPUID.(0xD,1).EDX:ECX [SDM Vol. 1 13.2]."""
    if guest.max_basic_leaf < LEAF_XSTATE:
        return 0
    _, _, ecx, edx = guest.get(LEAF_XSTATE, 1)
    return ecx | edx << 32


def guest_features(guest: "CpuidModel") -> list[str]:
    """Named features the guest was given, CET first (runtime bits excluded)."""
    names = [n for n in FEATURES if n not in RUNTIME_FEATURES and guest.has(n)]
    return sorted(names, key=lambda n: (n not in CET_FEATURES, list(FEATURES).index(n)))


def msr_used_by_guest(index: int, guest: "CpuidModel") -> bool:
    """Whether QEMU saves this MSR for the guest: the CET/XSS MSRs only when the guest has the
    feature that gives them meaning (kvm_msr_allowed via guest_cpu_cap_has in KVM's
    kvm_{get,set}_msr_common); every other listed MSR always."""
    shstk, ibt = guest.has("shstk"), guest.has("ibt")
    if index == Msr.IA32_XSS:
        return guest.has("xsaves") and guest_xss(guest) != 0
    if index in (Msr.IA32_U_CET, Msr.IA32_S_CET):
        return shstk or ibt
    if index in (Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP, Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP):
        return shstk
    if index == Msr.IA32_INT_SSP_TAB:
        return shstk and guest.has("lm")
    return True


def _components(mask: int) -> str:
    return ", ".join(xfeature_name(i) for i in range(64) if mask >> i & 1)


# --------------------------------------------------------------------------- checks
def check_kvm_loads(host: Host, side: str) -> tuple[KvmCaps | None, list[Finding]]:
    """kvm_x86_vendor_init on ``host``: a :class:`KvmLoadError` means no VM there at all."""
    try:
        return kvm_caps_for_host(host), []
    except KvmLoadError as exc:
        return None, [_blocker(f"KVM does not load on the {side} ({host.name})", str(exc))]


def check_vendor(guest: "CpuidModel", dst: KvmCaps) -> list[Finding]:
    """Cross-vendor migration is refused (decision in the module docstring, item 2)."""
    if guest.vendor == dst.host.vendor:
        return []
    return [_blocker(f"CPU vendor: guest sees {guest.vendor_string}, destination is {dst.host.cpu.vendor_string}",
                     "cross-vendor migration: the guest kernel chose vendor-specific code at boot and KVM "
                     "only partly emulates the other vendor (em_syscall vendor check, SYSENTER MSRs on SVM); "
                     "QEMU refuses a vendor mismatch")]


def missing_feature_reason(name: str, dst: KvmCaps) -> str:
    """Why the destination's KVM_GET_SUPPORTED_CPUID lacks ``name``: KvmCaps' CET reason (for IBT
    on SVM also svm_set_cpu_caps' rule, which holds whatever the CPU has), or whether the CPU
    itself lacks it."""
    if name in dst.cet:
        reason = dst.cet[name].reason
        if name == "ibt" and dst.host.virt == "svm" and "SVM" not in reason:
            reason += "; and destination is AMD: KVM never offers IBT on SVM"
        return reason
    bit = FEATURES[name]
    if not dst.host.cpu.has(name):
        return (f"destination CPU lacks it (CPUID.({bit.leaf:#x},{bit.subleaf}).{bit.reg.name}[{bit.bit}] clear)")
    return "destination KVM does not offer it (not in KVM_GET_SUPPORTED_CPUID)"


def check_cpuid_features(guest: "CpuidModel", dst: KvmCaps) -> list[Finding]:
    """x86_cpu_filter_features(): every guest feature must be in the destination's
    KVM_GET_SUPPORTED_CPUID (QEMU "enforce" refuses to start otherwise)."""
    supported = dst.get_supported_cpuid()
    return [_blocker(f"CPUID feature {name.upper()}",
                     f"{missing_feature_reason(name, dst)}; QEMU x86_cpu_filter_features refuses a guest "
                     "CPUID the destination's KVM_GET_SUPPORTED_CPUID lacks")
            for name in guest_features(guest) if not supported.has(name)]


def check_xcr0(guest: "CpuidModel", dst: KvmCaps) -> list[Finding]:
    """KVM_SET_XSAVE / __kvm_set_xcr: XCR0 bits outside the destination's supported_xcr0 fail."""
    extra = guest_xcr0(guest) & ~dst.supported_xcr0
    if not extra:
        return []
    return [_blocker(f"XCR0 components not supported by the destination: {_components(extra)} ({extra:#x})",
                     f"destination supported_xcr0 is {dst.supported_xcr0:#x}; KVM_SET_XSAVE rejects "
                     "XSTATE_BV bits outside it (-EINVAL) and __kvm_set_xcr refuses the guest's XCR0")]


def check_xss(guest: "CpuidModel", dst: KvmCaps) -> list[Finding]:
    """kvm_set_msr_common(MSR_IA32_XSS): ``data & ~kvm_caps.supported_xss`` fails the restore."""
    extra = guest_xss(guest) & ~dst.supported_xss
    if not extra:
        return []
    return [_blocker(f"IA32_XSS components not supported by the destination: {_components(extra)} ({extra:#x})",
                     f"destination supported_xss is {dst.supported_xss:#x}; KVM_SET_MSRS(IA32_XSS) fails "
                     "(kvm_set_msr_common rejects bits outside kvm_caps.supported_xss): the source saved "
                     "CET state the destination cannot take")]


def check_msrs(guest: "CpuidModel", src: KvmCaps, dst: KvmCaps) -> list[Finding]:
    """MSRs of the source's KVM_GET_MSR_INDEX_LIST the guest uses must be in the destination's."""
    dst_list = set(dst.get_msr_index_list())
    missing = [i for i in src.get_msr_index_list() if msr_used_by_guest(i, guest) and i not in dst_list]
    if not missing:
        return []
    names = ", ".join(msr_name(i) for i in missing)
    return [_blocker(f"MSRs missing from the destination's KVM_GET_MSR_INDEX_LIST: {names}",
                     "QEMU saves every listed MSR the guest uses; on the destination KVM_SET_MSRS stops at "
                     "the first MSR KVM does not support and kvm_put_msrs fails")]


def check_xstate_size(guest: "CpuidModel", src: KvmCaps, dst: KvmCaps) -> list[Finding]:
    """The KVM_GET_XSAVE2 image must fit the destination's buffer; standard-format offsets
    enumerated to the guest should match the destination hardware (warning)."""
    xcr0 = guest_xcr0(guest)
    perm = xcr0 & _USER_DYNAMIC
    src_size = max(KVM_XSAVE_MIN_SIZE, xstate_required_size(src.host.cpu, xcr0, False))
    dst_size = max(KVM_XSAVE_MIN_SIZE, dst.guest_xstate_size(perm)["standard"])
    findings: list[Finding] = []
    if src_size > dst_size:
        findings.append(_blocker(f"guest xstate is {src_size} bytes, destination XSAVE buffer {dst_size} bytes",
                                 "KVM_SET_XSAVE takes at most KVM_CAP_XSAVE2 bytes on the destination "
                                 "(kvm_vcpu_ioctl_x86_set_xsave); the saved image does not fit"))
    src_layout, dst_layout = host_layout(src.host.cpu), host_layout(dst.host.cpu)
    for i in range(2, 64):
        if not (xcr0 & dst.supported_xcr0) >> i & 1:
            continue
        a, b = src_layout.standard_offset(i), dst_layout.standard_offset(i)
        if a != b:
            findings.append(Finding(Severity.WARNING, f"XSAVE offset of {xfeature_name(i)}: guest CPUID says {a}, "
                                                      f"destination hardware uses {b}",
                                    "the guest read standard-format offsets from CPUID 0xD at boot; XSAVE on "
                                    "the destination writes at the hardware's offsets [SDM Vol. 1 13.4.1]"))
    return findings


# --------------------------------------------------------------------------- restricted CPUID
def restricted_cpuid(guest: "CpuidModel", dst: KvmCaps) -> tuple["CpuidModel", list[str]]:
    """The intersection CPUID: the guest's, without what the destination lacks; and what the
    guest loses, each with the destination's reason."""
    supported = dst.get_supported_cpuid()
    out = guest.copy()
    loses: list[str] = []
    for name in guest_features(guest):
        if not supported.has(name):
            out.set_feature(name, False)
            loses.append(f"{name.upper()} ({missing_feature_reason(name, dst)})")
    if guest.max_basic_leaf >= LEAF_XSTATE:
        xcr0, xss = guest_xcr0(guest), guest_xss(guest)
        eax, ebx, ecx, edx = out.get(LEAF_XSTATE, 0)
        out.set(LEAF_XSTATE, 0, eax & dst.supported_xcr0 & _U32, ebx, ecx, edx & dst.supported_xcr0 >> 32)
        eax, ebx, ecx, edx = out.get(LEAF_XSTATE, 1)
        out.set(LEAF_XSTATE, 1, eax, ebx, ecx & dst.supported_xss & _U32, edx & dst.supported_xss >> 32)
        for i in range(64):
            for register, mask, supported in (("XCR0", xcr0, dst.supported_xcr0), ("IA32_XSS", xss, dst.supported_xss)):
                if (mask & ~supported) >> i & 1:
                    loses.append(f"{register} component {xfeature_name(i)} (destination KVM does not support it)")
    return out, loses


# --------------------------------------------------------------------------- the whole check
def _findings(guest: "CpuidModel", src: KvmCaps, dst: KvmCaps) -> list[Finding]:
    return (check_vendor(guest, dst) + check_cpuid_features(guest, dst) + check_xcr0(guest, dst)
            + check_xss(guest, dst) + check_msrs(guest, src, dst) + check_xstate_size(guest, src, dst))


def check_migration(src: Host, dst: Host, guest_cpuid: "CpuidModel | None" = None) -> MigrationReport:
    """Can a guest running on ``src`` (with ``guest_cpuid``, default: the source's
    KVM_GET_SUPPORTED_CPUID, i.e. ``-cpu host``) be restored on ``dst``? See the module docstring."""
    src_caps, src_load = check_kvm_loads(src, "source")
    dst_caps, dst_load = check_kvm_loads(dst, "destination")
    if src_caps is None or dst_caps is None:
        return MigrationReport(src.name, dst.name, tuple(src_load + dst_load))
    guest = guest_cpuid if guest_cpuid is not None else src_caps.get_supported_cpuid()
    findings = _findings(guest, src_caps, dst_caps)
    if not any(f.severity is Severity.BLOCKER for f in findings):
        return MigrationReport(src.name, dst.name, tuple(findings), restricted_cpuid_suffices=True)
    restricted, loses = restricted_cpuid(guest, dst_caps)
    suffices = not any(f.severity is Severity.BLOCKER for f in _findings(restricted, src_caps, dst_caps))
    return MigrationReport(src.name, dst.name, tuple(findings), tuple(loses), suffices)
