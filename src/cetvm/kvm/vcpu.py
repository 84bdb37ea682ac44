"""``vcpu->arch`` of one vCPU (the part of it cetvm models), kept where KVM keeps it.

- U_CET, PL0-3_SSP: guest FPU xstate (:class:`GuestFpu`; CET_USER and CET_KERNEL components).
- S_CET, SSP, INTR_SSP_TABLE: the VMCS (GUEST_S_CET, GUEST_SSP, GUEST_INTR_SSP_TABLE).
- IA32_XSS, XCR0, CR0, CR4: vcpu->arch.
- SMM (:mod:`cetvm.kvm.smm`): hflags (HF_SMM, HF_SMM_INSIDE_NMI), smbase, smi_pending,
  smi_count.
- NMIs (:mod:`cetvm.kvm.nmi`): nmi_queued, nmi_pending, nmi_injected; the NMI mask is the
  VMCS's GUEST_INTERRUPTIBILITY_INFO (vmx_get/set_nmi_mask), not a copy here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cetvm.arch.regs import Cr0
from cetvm.arch.smm import SMBASE_RESET
from cetvm.cpuid.model import CpuidModel
from cetvm.kvm.caps import KvmCaps
from cetvm.kvm.cpuid_runtime import VcpuCpuid
from cetvm.kvm.guest_fpu import GuestFpu
from cetvm.cpu.vmcs import Vmcs

#: CR0 at RESET: ET | CD | NW [SDM Vol. 3 10.1.1].
CR0_RESET = int(Cr0.ET | Cr0.CD | Cr0.NW)


@dataclass
class VcpuArch:
    """struct kvm_vcpu_arch: CPUID, guest FPU, the VMCS, CR0/CR4/XCR0/IA32_XSS."""

    caps: KvmCaps
    cpuid: VcpuCpuid
    fpu: GuestFpu
    vmcs: Vmcs = field(default_factory=Vmcs)
    cr0: int = CR0_RESET
    cr4: int = 0
    xcr0: int = 1
    ia32_xss: int = 0
    #: HF_SMM / HF_SMM_INSIDE_NMI (:class:`cetvm.kvm.smm.HFlag`)
    hflags: int = 0
    smbase: int = SMBASE_RESET
    smi_pending: bool = False
    smi_count: int = 0
    #: NMIs from KVM_NMI not yet processed, NMIs pending (process_nmi), an NMI injection in
    #: flight (:mod:`cetvm.kvm.nmi`)
    nmi_queued: int = 0
    nmi_pending: int = 0
    nmi_injected: bool = False

    @classmethod
    def create(cls, caps: KvmCaps, cpuid: CpuidModel | None = None) -> "VcpuArch":
        """KVM_CREATE_VCPU (+ KVM_SET_CPUID2 when ``cpuid`` is given)."""
        fpu = GuestFpu(caps.host.cpu, caps.supported_xcr0 | caps.supported_xss)
        vcpu = cls(caps=caps, cpuid=VcpuCpuid(caps), fpu=fpu)
        if cpuid is not None:
            vcpu.set_cpuid(cpuid)
        return vcpu

    def set_cpuid(self, entries: CpuidModel) -> None:
        """KVM_SET_CPUID2: kvm_set_cpuid() runs the runtime update on the new table."""
        self.cpuid.set_cpuid(entries)
        self.cpuid.kvm_update_cpuid_runtime(self.xcr0, self.ia32_xss)
