"""KVM_GET_SUPPORTED_CPUID: the host's CPUID masked by what KVM can virtualize (__do_cpuid_func).

Faithful where it matters for CET (compared with real KVM in tests/kvm): leaf 7's SHSTK/IBT bits
follow :class:`cetvm.kvm.caps.KvmCaps`, CET_SSS (7.1 EDX[18]) is never reported, and leaf 0xD is
built exactly as cpuid.c does:

- 0xD.0: EAX/EDX &= permitted XCR0; EBX = ECX = xstate_required_size(permitted XCR0, standard).
- 0xD.1: EAX = host EAX & {XSAVEOPT, XSAVEC, XGETBV1, XSAVES, XFD} & KVM caps; EBX =
  xstate_required_size(XCR0 | XSS, compacted) when XSAVES or XSAVEC is reported, else 0;
  ECX/EDX &= supported_xss.
- 0xD.n (n ≥ 2): only for permitted XCR0 / supported XSS components; EAX/EBX/ECX from the
  host (ECX[2] XFD cleared without XFD), EDX = 0.

Other leaves pass through with KVM's well-known edits: leaf 1 sets HYPERVISOR and X2APIC,
shows VMX only with kvm_intel nested=1 and clears the runtime bits OSXSAVE/OSPKE; 0x80000008 keeps EAX (address sizes) only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cetvm.arch.cpuid_bits import CET_SSS, FEATURES, IBT, SHSTK, Reg
from cetvm.cpuid.model import CpuidModel
from cetvm.kvm.xstate_size import xstate_required_size

if TYPE_CHECKING:  # annotations only: caps builds on this module
    from cetvm.kvm.caps import KvmCaps

#: KVM's highest basic leaf (cpuid.c caps leaf 0.EAX).
KVM_MAX_BASIC_LEAF = 0x24
_D1_EAX_FEATURES = ("xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd")
_OSPKE = 1 << 4  # CPUID.(7,0).ECX[4]


def _bit(value: int, mask: int, on: bool) -> int:
    return (value | mask) if on else (value & ~mask)


def kvm_get_supported_cpuid(caps: KvmCaps, guest_perm: int = 0) -> CpuidModel:
    host = caps.host.cpu
    out = CpuidModel(f"kvm-supported:{host.name}")
    _leaf_0(host, out)
    _leaf_1(host, out, caps.host.nested_vmx)
    _leaf_7(caps, out)
    _leaf_d(caps, out, guest_perm)
    _ext_leaves(host, out)
    return out


def _leaf_0(host: CpuidModel, out: CpuidModel) -> None:
    eax, ebx, ecx, edx = host.get(0)
    out.set(0, 0, min(eax, KVM_MAX_BASIC_LEAF), ebx, ecx, edx)


def _leaf_1(host: CpuidModel, out: CpuidModel, nested_vmx: bool) -> None:
    """Leaf 1; VMX only with kvm_intel nested=1 (vmx_set_cpu_caps: ``if (nested)
    kvm_cpu_cap_set(X86_FEATURE_VMX)``)."""
    eax, ebx, ecx, edx = host.get(1)
    ecx = _bit(ecx, FEATURES["vmx"].mask, nested_vmx)
    ecx |= FEATURES["hypervisor"].mask | FEATURES["x2apic"].mask
    ecx &= ~FEATURES["osxsave"].mask
    out.set(1, 0, eax, ebx, ecx, edx)


ARCH_CAPABILITIES = FEATURES["arch_capabilities"]


def _leaf_7(caps: KvmCaps, out: CpuidModel) -> None:
    host = caps.host.cpu
    if host.max_basic_leaf < 7:
        return
    eax, ebx, ecx, edx = host.get(7, 0)
    ecx = _bit(ecx, SHSTK.mask, caps.has("shstk")) & ~_OSPKE
    edx = _bit(edx, IBT.mask, caps.has("ibt")) | ARCH_CAPABILITIES.mask  # KVM emulates the MSR
    out.set(7, 0, min(eax, 2), ebx, ecx, edx)
    if eax >= 1:
        regs = list(host.get(7, 1))
        regs[CET_SSS.reg] &= ~CET_SSS.mask  # KVM never advertises CET_SSS
        out.set(7, 1, *regs)
    if eax >= 2:
        out.set(7, 2, *host.get(7, 2))


def _leaf_d(caps: KvmCaps, out: CpuidModel, guest_perm: int) -> None:
    host = caps.host.cpu
    if host.max_basic_leaf < 0xD:
        return
    xcr0 = caps.filtered_xcr0(guest_perm)
    xss = caps.supported_xss
    eax, _, _, edx = host.get(0xD, 0)
    std = xstate_required_size(host, xcr0, False)
    out.set(0xD, 0, eax & xcr0 & 0xFFFF_FFFF, std, std, edx & (xcr0 >> 32))
    if not xcr0:
        return
    eax1, _, ecx1, edx1 = host.get(0xD, 1)
    allowed = 0
    for name in _D1_EAX_FEATURES:
        if caps.has(name):
            allowed |= FEATURES[name].mask
    eax1 &= allowed
    compacted = FEATURES["xsaves"].mask | FEATURES["xsavec"].mask
    ebx1 = xstate_required_size(host, xcr0 | xss, True) if eax1 & compacted else 0
    out.set(0xD, 1, eax1, ebx1, ecx1 & xss & 0xFFFF_FFFF, edx1 & (xss >> 32))
    for i in range(2, 64):
        if xcr0 >> i & 1:
            s_state = False
        elif xss >> i & 1:
            s_state = True
        else:
            continue
        a, b, c, _ = host.get(0xD, i)
        if not a or (c & 1) != s_state:  # KVM WARNs and drops the subleaf
            continue
        if not caps.has("xfd"):
            c &= ~4
        out.set(0xD, i, a, b, c, 0)


def _ext_leaves(host: CpuidModel, out: CpuidModel) -> None:
    top = host.max_ext_leaf
    if not top:
        return
    eax, ebx, ecx, edx = host.get(0x8000_0000)
    out.set(0x8000_0000, 0, min(eax, 0x8000_0021) if eax >= 0x8000_0000 else eax, ebx, ecx, edx)
    if top >= 0x8000_0001:
        out.set(0x8000_0001, 0, *host.get(0x8000_0001))
    if top >= 0x8000_0008:
        out.set(0x8000_0008, 0, host.get(0x8000_0008)[Reg.EAX] & 0xFFFF, 0, 0, 0)
