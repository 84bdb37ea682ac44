"""A vCPU's CPUID: KVM_SET_CPUID2, kvm_vcpu_after_set_cpuid and kvm_update_cpuid_runtime.

- KVM accepts whatever CPUID userspace gives (SHSTK without IBT, CET bits KVM does not support,
  ...): "it is userspace's responsibility to provide a sane CPUID model" (the KVM maintainers in the CET
  virtualization review). KVM only
  protects itself: :meth:`VcpuCpuid.guest_cpu_cap_has` is guest CPUID & kvm_cpu_caps
  (vcpu->arch.cpu_caps, Linux 6.13+).
- guest_supported_xcr0 = CPUID.(0xD,0).(EDX:EAX) & supported_xcr0;
  guest_supported_xss = CPUID.(0xD,1).(EDX:ECX) & supported_xss (kvm_update_cpuid_runtime).
- Runtime: CPUID.(0xD,0).EBX = standard size of XCR0; CPUID.(0xD,1).EBX = compacted size of
  XCR0 | IA32_XSS when the guest has XSAVES or XSAVEC (__kvm_update_cpuid_runtime), recomputed
  whenever XCR0 or XSS changes. Sizes come from the host CPUID (KVM's xstate_required_size).
"""

from __future__ import annotations

from cetvm.arch.cpuid_bits import FEATURES
from cetvm.cpuid.model import CpuidModel
from cetvm.kvm.caps import KvmCaps
from cetvm.kvm.xstate_size import xstate_required_size


class VcpuCpuid:
    """The CPUID table of one vCPU plus what KVM derives from it."""

    def __init__(self, caps: KvmCaps, entries: CpuidModel | None = None) -> None:
        self.caps = caps
        self.entries = entries.copy() if entries is not None else CpuidModel("empty")
        self.guest_supported_xcr0 = 0
        self.guest_supported_xss = 0
        self.kvm_vcpu_after_set_cpuid()

    def set_cpuid(self, entries: CpuidModel) -> None:
        """KVM_SET_CPUID2: take the table as given, then recompute derived state."""
        self.entries = entries.copy()
        self.kvm_vcpu_after_set_cpuid()

    def guest_cpuid_has(self, feature: str) -> bool:
        """The raw bit in the guest's CPUID."""
        return self.entries.has(feature)

    def guest_cpu_cap_has(self, feature: str) -> bool:
        """guest_cpu_cap_has(): set in guest CPUID *and* supported by KVM."""
        return self.entries.has(feature) and self.caps.has(feature)

    def kvm_vcpu_after_set_cpuid(self) -> None:
        eax, _, _, edx = self.entries.get(0xD, 0)
        self.guest_supported_xcr0 = ((edx << 32) | eax) & self.caps.supported_xcr0
        _, _, ecx, edx1 = self.entries.get(0xD, 1)
        self.guest_supported_xss = ((edx1 << 32) | ecx) & self.caps.supported_xss

    def kvm_update_cpuid_runtime(self, xcr0: int, xss: int) -> None:
        """Refresh the size fields of leaf 0xD for the guest's current XCR0 and IA32_XSS."""
        cpu = self.caps.host.cpu
        if self.entries.contains(0xD, 0):
            eax, _, ecx, edx = self.entries.get(0xD, 0)
            self.entries.set(0xD, 0, eax, xstate_required_size(cpu, xcr0, False), ecx, edx)
        if self.entries.contains(0xD, 1):
            eax, _, ecx, edx = self.entries.get(0xD, 1)
            if eax & (FEATURES["xsaves"].mask | FEATURES["xsavec"].mask):
                self.entries.set(0xD, 1, eax, xstate_required_size(cpu, xcr0 | xss, True), ecx, edx)
