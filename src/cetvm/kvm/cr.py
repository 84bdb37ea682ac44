"""CR0/CR4 rules for CET (kvm_is_valid_cr4 / kvm_set_cr0 / kvm_set_cr4 / kvm_is_valid_sregs)
[K x86.c; SDM Vol. 3 2.5]. ``True`` = accepted; for a guest MOV to CR a
``False`` is #GP(0), for KVM_SET_SREGS it is -EINVAL."""

from __future__ import annotations

from cetvm.arch.msr import EFER_DEFINED_INTEL, Efer
from cetvm.arch.qemu_features import QEMU_FEATURES
from cetvm.arch.regs import Cr0, Cr4
from cetvm.kvm.cpuid_runtime import VcpuCpuid
from cetvm.kvm.vcpu import VcpuArch


#: The CR4 bits KVM knows (CR4_RESERVED_BITS is the complement) [K x86.h].
CR4_KNOWN_BITS = int(Cr4.VME | Cr4.PVI | Cr4.TSD | Cr4.DE | Cr4.PSE | Cr4.PAE | Cr4.MCE | Cr4.PGE | Cr4.PCE
                     | Cr4.OSFXSR | Cr4.PCIDE | Cr4.OSXSAVE | Cr4.SMEP | Cr4.FSGSBASE | Cr4.OSXMMEXCPT | Cr4.LA57
                     | Cr4.VMXE | Cr4.SMAP | Cr4.PKE | Cr4.UMIP | Cr4.PKS | Cr4.CET | Cr4.LAM_SUP)
#: CR4_RESERVED_BITS: every bit KVM does not know (SMXE and bits 63:29 among them).
CR4_RESERVED_BITS = ~CR4_KNOWN_BITS & 0xFFFF_FFFF_FFFF_FFFF
#: CR4 bits reserved unless the guest CPUID shows the feature (QEMU feature names).
CR4_FEATURE_BITS: tuple[tuple[int, str], ...] = (
    (Cr4.OSXSAVE, "xsave"), (Cr4.SMEP, "smep"), (Cr4.SMAP, "smap"), (Cr4.FSGSBASE, "fsgsbase"),
    (Cr4.PKE, "pku"), (Cr4.LA57, "la57"), (Cr4.UMIP, "umip"), (Cr4.VMXE, "vmx"), (Cr4.PCIDE, "pcid"),
    (Cr4.LAM_SUP, "lam"), (Cr4.PKS, "pks"),
)


def _guest_shows(cpuid: VcpuCpuid, name: str) -> bool:
    """The guest CPUID shows the feature ``name`` (QEMU's name for it)."""
    bit = QEMU_FEATURES[name]
    entries = cpuid.entries
    return entries.contains(bit.leaf, bit.subleaf) and bool(entries.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask)


def cr4_reserved_bits(cpuid: VcpuCpuid) -> int:
    """__cr4_reserved_bits(guest_cpuid_has) [K x86.h]: every bit KVM does not know, and each
    feature bit whose feature the guest CPUID lacks; CR4.CET unless the guest has SHSTK or IBT
    (guest_cpu_cap_has: KVM must support it too)."""
    reserved = CR4_RESERVED_BITS
    for bit, feature in CR4_FEATURE_BITS:
        if not _guest_shows(cpuid, feature):
            reserved |= int(bit)
    if not (cpuid.guest_cpu_cap_has("shstk") or cpuid.guest_cpu_cap_has("ibt")):
        reserved |= int(Cr4.CET)
    return reserved


def kvm_is_valid_cr4(vcpu: VcpuArch, cr4: int) -> bool:
    return not cr4 & cr4_reserved_bits(vcpu.cpuid)


def kvm_set_cr4(vcpu: VcpuArch, cr4: int) -> bool:
    """Guest MOV to CR4: reserved CET bit, or CR4.CET while CR0.WP=0 → #GP."""
    if not kvm_is_valid_cr4(vcpu, cr4):
        return False
    if cr4 & Cr4.CET and not vcpu.cr0 & Cr0.WP:
        return False
    vcpu.cr4 = cr4
    return True


def kvm_set_cr0(vcpu: VcpuArch, cr0: int) -> bool:
    """Guest MOV to CR0: clearing WP while CR4.CET=1 → #GP."""
    if not cr0 & Cr0.WP and vcpu.cr4 & Cr4.CET:
        return False
    vcpu.cr0 = cr0
    return True


def kvm_is_valid_sregs(vcpu: VcpuArch, cr0: int, cr4: int) -> bool:
    """KVM_SET_SREGS (CET part): CR4 must be valid and CR4.CET needs CR0.WP."""
    if not kvm_is_valid_cr4(vcpu, cr4):
        return False
    return not (cr4 & Cr4.CET and not cr0 & Cr0.WP)


def cr0_invalid_reason(cr0: int) -> str | None:
    """Why kvm_is_valid_cr0() refuses ``cr0``: reserved bits 63:32, NW without CD, PG without PE."""
    if cr0 >> 32:
        return f"CR0 {cr0:#x} sets reserved bits 63:32"
    if cr0 & Cr0.NW and not cr0 & Cr0.CD:
        return "CR0.NW without CR0.CD"
    if cr0 & Cr0.PG and not cr0 & Cr0.PE:
        return "CR0.PG without CR0.PE"
    return None


def kvm_is_valid_cr0(cr0: int) -> bool:
    """kvm_is_valid_cr0()."""
    return cr0_invalid_reason(cr0) is None


def kvm_is_illegal_gpa(gpa: int, maxphyaddr: int) -> bool:
    """kvm_vcpu_is_illegal_gpa(): a guest-physical address with bits at or above MAXPHYADDR."""
    return gpa >> maxphyaddr != 0


def kvm_is_valid_sregs_state(vcpu: VcpuArch, *, cr0: int, cr3: int, cr4: int, efer: int,
                             cs_long: bool, maxphyaddr: int) -> str | None:
    """kvm_is_valid_sregs() in full: None if KVM_SET_SREGS accepts the state, else why not.

    Long mode (EFER.LME and CR0.PG) needs CR4.PAE, EFER.LMA and a CR3 below MAXPHYADDR; outside
    long mode neither EFER.LMA nor a 64-bit CS is allowed; then kvm_is_valid_cr4 (reserved bits;
    CR4.CET needs guest SHSTK or IBT) and kvm_is_valid_cr0, plus the CET rule that CR4.CET needs
    CR0.WP. Decision: EFER's reserved bits (efer_reserved_bits) are refused too — KVM's
    vmx_set_efer stores them and the next VM entry fails, an exit cetvm does not have.
    """
    if efer & Efer.LME and cr0 & Cr0.PG:
        if not cr4 & Cr4.PAE:
            return "long mode without CR4.PAE"
        if not efer & Efer.LMA:
            return "EFER.LME and CR0.PG without EFER.LMA"
        if kvm_is_illegal_gpa(cr3, maxphyaddr):
            return f"CR3 {cr3:#x} beyond MAXPHYADDR ({maxphyaddr} bits)"
    elif efer & Efer.LMA or cs_long:
        return "EFER.LMA or a 64-bit CS outside long mode"
    why = cr0_invalid_reason(cr0)
    if why is not None:
        return why
    reserved = cr4 & cr4_reserved_bits(vcpu.cpuid) & ~Cr4.CET
    if reserved:
        return f"CR4 {cr4:#x} sets bits {reserved:#x} reserved for this guest (its CPUID lacks the feature)"
    if not kvm_is_valid_sregs(vcpu, cr0, cr4):
        return f"CR4 {cr4:#x} rejected (CR4.CET needs guest SHSTK or IBT, and CR0.WP)"
    if efer & ~EFER_DEFINED_INTEL:
        return f"EFER {efer:#x} sets reserved bits {efer & ~EFER_DEFINED_INTEL:#x}"
    return None
