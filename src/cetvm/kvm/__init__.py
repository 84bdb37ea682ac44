"""The hypervisor model: KVM 6.18's CET capability, CPUID, MSR and CR policy.

The policy modules: :mod:`host` (the host
KVM loads on), :mod:`caps` (kvm_caps, reasons, KVM_GET_MSR_INDEX_LIST), :mod:`supported_cpuid`
(KVM_GET_SUPPORTED_CPUID), :mod:`cpuid_runtime` (KVM_SET_CPUID2 and runtime leaf 0xD sizes),
:mod:`msr` (CET/XSS MSR access, ONE_REG), :mod:`cr` (CR0.WP / CR4.CET), :mod:`vcpu`,
:mod:`guest_fpu` (where the state lives; the VMCS is the CPU's, :mod:`cetvm.cpu.vmcs`).

The KVM-shaped API on top of the CPU: :mod:`api` (Kvm → Vm → KvmVcpu, run()), :mod:`vcpu_run`
(in-kernel exit handling, kvm_run exits), :mod:`vmx` (CET controls, MSR interception, VM
entry/exit, guest FPU load/put), :mod:`reset` (RESET/INIT), :mod:`smm` (KVM_SMI, the SMRAM
state-save map, RSM), :mod:`state` (save/restore).
They import the CPU engine, so they are not re-exported here (``from cetvm.kvm.api import Kvm``).
"""

from cetvm.kvm.caps import FeatureDecision, KvmCaps, kvm_caps_for_host
from cetvm.kvm.errors import (
    KvmBadAddress,
    KvmError,
    KvmExists,
    KvmInvalidArgument,
    KvmIoctlError,
    KvmLoadError,
    KvmNoMemory,
    KvmNotSupported,
    KvmTooBig,
)
from cetvm.kvm.host import Host
from cetvm.kvm.msr import MsrResult, get_one_reg, kvm_get_msr, kvm_set_msr, set_one_reg
from cetvm.kvm.vcpu import VcpuArch

__all__ = [
    "FeatureDecision", "Host", "KvmBadAddress", "KvmCaps", "KvmError", "KvmExists", "KvmInvalidArgument",
    "KvmIoctlError", "KvmLoadError", "KvmNoMemory", "KvmNotSupported", "KvmTooBig", "MsrResult",
    "VcpuArch", "get_one_reg", "kvm_caps_for_host", "kvm_get_msr", "kvm_set_msr", "set_one_reg",
]
