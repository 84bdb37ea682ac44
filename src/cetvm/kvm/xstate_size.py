"""XSAVE sizes as KVM computes them, and the host xfeature masks KVM starts from.

:func:`xstate_required_size` is KVM's own helper (arch/x86/kvm/cpuid.c): it walks CPUID leaf
0xD of the *host* CPU, so it belongs to the KVM model rather than to the xstate layer.

:func:`host_xcr0` and :func:`host_xss` stand for what KVM reads at load time
(kvm_x86_vendor_init: ``kvm_host.xcr0 = xgetbv(0)``, ``rdmsrq(MSR_IA32_XSS, kvm_host.xss)``),
i.e. what the host kernel's FPU framework enabled (arch/x86/kernel/fpu/xstate.c
fpu__init_system_xstate: CPU-enumerated components whose feature the kernel uses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cetvm.arch.cpuid_bits import Reg
from cetvm.arch.xfeatures import XFEATURE_MASK_FPSSE, XSAVE_EXTENDED_OFFSET

if TYPE_CHECKING:  # pragma: no cover
    from cetvm.cpuid.model import CpuidModel
    from cetvm.kvm.host import Host

#: Components KVM itself never sizes (x87 and SSE live in the legacy region) [K cpuid.c].
XFEATURE_MASK_EXTEND = ~XFEATURE_MASK_FPSSE & 0xFFFF_FFFF_FFFF_FFFF

def _align64(value: int) -> int:
    return (value + 63) & ~63


def xstate_required_size(cpu: "CpuidModel", xstate_bv: int, compacted: bool) -> int:
    """KVM's xstate_required_size(): bytes of an XSAVE area holding ``xstate_bv``.

    Starts at 576 (legacy region + header); for each component i ≥ 2 in the mask takes
    CPUID.(0xD,i): standard format → offset EBX; compacted → running end, aligned to 64 when
    ECX[1] is set; the size is the largest offset + EAX.
    """
    ret = XSAVE_EXTENDED_OFFSET
    mask = xstate_bv & XFEATURE_MASK_EXTEND
    for i in range(2, 64):
        if not mask >> i & 1:
            continue
        eax, ebx, ecx, _ = cpu.get(0xD, i)
        offset = (_align64(ret) if ecx & 2 else ret) if compacted else ebx
        ret = max(ret, offset + eax)
    return ret


def xstate_compacted_offset(cpu: "CpuidModel", feature: int, mask: int) -> int:
    """Offset of component ``feature`` in a compacted area with XCOMP_BV = ``mask`` [SDM 13.4.3]."""
    off = XSAVE_EXTENDED_OFFSET
    for i in range(2, 64):
        if not mask >> i & 1:
            continue
        _, _, ecx, _ = cpu.get(0xD, i)
        if ecx & 2:
            off = _align64(off)
        if i == feature:
            return off
        off += cpu.get(0xD, i)[Reg.EAX]
    raise ValueError(f"component {feature} is not in mask {mask:#x}")


def host_fpu(host: "Host"):  # -> cetvm.xstate.HostFpu
    """The host kernel's FPU framework for this host (fpu__init_system_xstate model)."""
    from cetvm.xstate import HostFpu

    return HostFpu.from_host(host.cpu, user_shstk=host.user_shstk)


def host_xcr0(host: "Host") -> int:
    """kvm_host.xcr0: XCR0 the host kernel runs with (0 without XSAVE)."""
    return host_fpu(host).xcr0 if host.cpu.has("xsave") else 0


def host_xss(host: "Host") -> int:
    """kvm_host.xss: IA32_XSS the host kernel runs with (0 without XSAVES).

    Per the host FPU model: CET_USER only with CONFIG_X86_USER_SHADOW_STACK
    (``host.user_shstk``), CET_KERNEL (guest-only) whenever the CPU has SHSTK.
    """
    return host_fpu(host).xss if host.cpu.has("xsaves") else 0
