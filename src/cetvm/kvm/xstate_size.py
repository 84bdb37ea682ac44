"""XSAVE sizes as KVM computes them, and the host xfeature masks KVM starts from.

The layout maths live in :mod:`cetvm.xstate` (:class:`~cetvm.xstate.XsaveLayout` for sizes and
offsets, :class:`~cetvm.xstate.HostFpu` for the host kernel's FPU configuration); this module
only gives them KVM's names and KVM's guards:

- :func:`xstate_required_size` is KVM's helper of that name. It walks
  CPUID leaf 0xD of the *host* CPU for every component i ≥ 2 of the mask: that is exactly
  :meth:`XsaveLayout.standard_size` / :meth:`XsaveLayout.compacted_size` of the host layout.
- :func:`host_xcr0` / :func:`host_xss` stand for what KVM reads at load time
  (kvm_x86_vendor_init: ``kvm_host.xcr0 = xgetbv(0)`` only with XSAVE,
  ``rdmsrq(MSR_IA32_XSS, kvm_host.xss)`` only with XSAVES), i.e. :attr:`HostFpu.xcr0` and
  :attr:`HostFpu.xss` of the host kernel's FPU framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cetvm.arch.xfeatures import XFEATURE_MASK_FPSSE
from cetvm.xstate import HostFpu, XsaveLayout

if TYPE_CHECKING:  # pragma: no cover
    from cetvm.cpuid.model import CpuidModel
    from cetvm.kvm.host import Host

#: Components KVM itself never sizes (x87 and SSE live in the legacy region) [K cpuid.c].
XFEATURE_MASK_EXTEND = ~XFEATURE_MASK_FPSSE & 0xFFFF_FFFF_FFFF_FFFF


def host_layout(cpu: "CpuidModel") -> XsaveLayout:
    """The XSAVE layout the host CPU enumerates (CPUID leaf 0xD)."""
    return XsaveLayout.from_cpuid(cpu)


def xstate_required_size(cpu: "CpuidModel", xstate_bv: int, compacted: bool) -> int:
    """KVM's xstate_required_size(): bytes of an XSAVE area holding ``xstate_bv`` (≥ 576)."""
    layout = host_layout(cpu)
    mask = xstate_bv & XFEATURE_MASK_EXTEND
    return layout.compacted_size(mask) if compacted else layout.standard_size(mask)


def xstate_compacted_offset(cpu: "CpuidModel", feature: int, mask: int) -> int:
    """Offset of component ``feature`` in a compacted area with XCOMP_BV = ``mask`` [SDM 13.4.3]."""
    return host_layout(cpu).compacted_offset(feature, mask)


def host_fpu(host: "Host") -> HostFpu:
    """The host kernel's FPU framework for this host (fpu__init_system_xstate model)."""
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
