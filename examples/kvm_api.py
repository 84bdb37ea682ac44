"""Script the hypervisor the way a VMM drives /dev/kvm: what does KVM do with a guest's CET MSRs?

Run: .venv/bin/python examples/kvm_api.py
"""

from cetvm.arch import KVM_REG_GUEST_SSP_ID, Msr
from cetvm.kvm import Host
from cetvm.kvm.api import Kvm, KvmIoctlError
from cetvm.cpuid import get_model

kvm = Kvm(Host(get_model("sapphire-rapids")))
vm = kvm.create_vm()
vm.set_user_memory_region(0, 0, 16 << 20)
vcpu = vm.create_vcpu()
vcpu.set_cpuid(kvm.get_supported_cpuid())          # the guest sees SHSTK and IBT

# Userspace writes (host-initiated): valid values land where KVM keeps them.
print("set U_CET/PL3_SSP:", vcpu.set_msrs([(Msr.IA32_U_CET, 0x1), (Msr.IA32_PL3_SSP, 0x7FFF_F000)]), "of 2")
print("misaligned PL3_SSP:", vcpu.set_msrs([(Msr.IA32_PL3_SSP, 0x7FFF_F001)]), "of 1 (KVM rejects it)")
print("U_CET, PL3_SSP now:", [hex(v) for _, v in vcpu.get_msrs([Msr.IA32_U_CET, Msr.IA32_PL3_SSP])])
vcpu.set_one_reg(KVM_REG_GUEST_SSP_ID, 0x10_0000)
print("GUEST_SSP (ONE_REG):", hex(vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID)))

# Hide SHSTK: the PLx_SSP MSRs and the SSP register disappear for this guest.
no_shstk = kvm.get_supported_cpuid()
no_shstk.set_feature("shstk", False)
vcpu.set_cpuid(no_shstk)
print("PL3_SSP without SHSTK:", vcpu.set_msrs([(Msr.IA32_PL3_SSP, 0x1000)]), "of 1")
try:
    vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID)
except KvmIoctlError as exc:
    print("GUEST_SSP without SHSTK:", exc)
