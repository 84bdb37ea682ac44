"""RESET and INIT of a vCPU: kvm_vcpu_reset(), kvm_xstate_reset(), vmx_vcpu_reset() [K x86.c,
vmx.c 6.18 (the INIT xstate patch of the CET series); SDM Vol. 3 10.1.1 Table 10-1].

What INIT and RESET do here, as KVM does:

- GPRs are zeroed, RDX = CPUID.1.EAX (0x600 without leaf 1), RFLAGS = 2, RIP = 0xFFF0,
  CS = 0xF000 with base 0xFFFF0000, the other segments 0 with limit 0xFFFF, GDTR/IDTR limit
  0xFFFF, CR3 = CR4 = EFER = 0, CR0 = ET | (RESET ? CD | NW : the old CD | NW).
- RESET only: XCR0 = x87 and IA32_XSS = 0 (__kvm_set_xcr / __kvm_set_msr in the !init_event
  branch). INIT leaves XCR0, XSS and all other MSRs (STAR, LSTAR, PAT, ...) alone.
- kvm_xstate_reset(): RESET relies on the zero-allocated fpstate and touches nothing; INIT
  zeroes (supported_xcr0 | supported_xss) & (BNDREGS | BNDCSR | CET_USER | CET_KERNEL) and
  leaves every other component alone; with no such component supported it does not touch the
  FPU at all. When the guest FPU is loaded it is put first and loaded again afterwards.
- vmx_vcpu_reset(): GUEST_SSP and GUEST_INTR_SSP_TABLE := 0 if KVM supports SHSTK,
  GUEST_S_CET := 0 if it supports SHSTK or IBT — on RESET and INIT.
"""

from __future__ import annotations

from cetvm.arch.regs import Cr0
from cetvm.arch.vmx import VmcsField
from cetvm.arch.xfeatures import XFEATURE_MASK_CET, XFEATURE_MASK_MPX, XFeature
from cetvm.cpu.state import DescriptorTable, Regs, Segment, Sregs
from cetvm.kvm.vcpu import VcpuArch
from cetvm.xstate.layout import bits_of
from cetvm.kvm.vmx import kvm_load_guest_fpu, kvm_put_guest_fpu

#: Components KVM zeroes on INIT (XFEATURE_MASK_BNDREGS | BNDCSR | CET_USER | CET_KERNEL).
XSTATE_CLEAR_ON_INIT_MASK = XFEATURE_MASK_MPX | XFEATURE_MASK_CET
RESET_RIP = 0xFFF0
RESET_CS_SELECTOR = 0xF000
RESET_CS_BASE = 0xFFFF_0000
#: Access rights after RESET in descriptor-high-dword position (VMX AR << 8): present,
#: code/data, accessed; CS execute/read 0x9B, data read/write 0x93, TR busy TSS 0x8B, LDTR 0x82.
AR_CODE = 0x9B << 8
AR_DATA = 0x93 << 8
AR_TR = 0x8B << 8
AR_LDTR = 0x82 << 8


def xstate_clear_on_init(vcpu: VcpuArch) -> int:
    """(supported_xcr0 | supported_xss) & XSTATE_CLEAR_ON_INIT_MASK."""
    return (vcpu.caps.supported_xcr0 | vcpu.caps.supported_xss) & XSTATE_CLEAR_ON_INIT_MASK


def kvm_xstate_reset(vcpu: VcpuArch, cpu, init_event: bool) -> None:
    """kvm_xstate_reset()'s helper: clear selected components on INIT only."""
    fpstate = vcpu.fpu
    if not init_event or fpstate is None:
        return  # zero-allocated at vCPU creation: nothing to do on RESET
    mask = xstate_clear_on_init(vcpu)
    if not mask:
        return
    was_loaded = fpstate.loaded
    kvm_put_guest_fpu(vcpu, cpu)
    for n in bits_of(mask):
        fpstate.clear_component(n)
    if was_loaded:
        kvm_load_guest_fpu(vcpu, cpu)


def vmx_vcpu_reset_cet(vcpu: VcpuArch) -> None:
    """The CET part of vmx_vcpu_reset() (both RESET and INIT)."""
    if vcpu.caps.has("shstk"):
        vcpu.vmcs.write(VmcsField.GUEST_SSP, 0)
        vcpu.vmcs.write(VmcsField.GUEST_INTR_SSP_TABLE, 0)
    if vcpu.caps.has("shstk") or vcpu.caps.has("ibt"):
        vcpu.vmcs.write(VmcsField.GUEST_S_CET, 0)


def reset_regs(vcpu: VcpuArch) -> Regs:
    """GPRs zero, RDX = CPUID.1.EAX or 0x600, RFLAGS fixed bit, RIP 0xFFF0."""
    entries = vcpu.cpuid.entries
    rdx = entries.get(1)[0] if entries.contains(1) else 0x600
    return Regs(rdx=rdx, rip=RESET_RIP, rflags=0x2)


def reset_sregs(old_cr0: int, init_event: bool) -> Sregs:
    """Segment and control registers after RESET/INIT (vmx_vcpu_reset, kvm_vcpu_reset)."""
    def data() -> Segment:
        return Segment(0, 0, 0xFFFF, AR_DATA)

    cr0 = int(Cr0.ET)
    cr0 |= old_cr0 & (Cr0.NW | Cr0.CD) if init_event else int(Cr0.NW | Cr0.CD)
    return Sregs(cs=Segment(RESET_CS_SELECTOR, RESET_CS_BASE, 0xFFFF, AR_CODE),
                 ds=data(), es=data(), fs=data(), gs=data(), ss=data(),
                 tr=Segment(0, 0, 0xFFFF, AR_TR), ldt=Segment(0, 0, 0xFFFF, AR_LDTR),
                 gdt=DescriptorTable(0, 0xFFFF), idt=DescriptorTable(0, 0xFFFF),
                 cr0=cr0, cr2=0, cr3=0, cr4=0, efer=0)


def reset_xcr0_xss(vcpu: VcpuArch) -> None:
    """RESET only: XCR0 = x87, IA32_XSS = 0, with the runtime CPUID update."""
    vcpu.xcr0 = XFeature.X87.mask
    vcpu.ia32_xss = 0
    vcpu.cpuid.kvm_update_cpuid_runtime(vcpu.xcr0, vcpu.ia32_xss)
