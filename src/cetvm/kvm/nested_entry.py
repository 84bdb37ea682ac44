"""Nested VM entry and exit: vmcs12 → vmcs02 + the CPU's state, L2's exits back to L1
[K nested.c nested_vmx_run, nested_vmx_enter_non_root_mode, prepare_vmcs02,
nested_vmx_reflect_vmexit, nested_vmx_vmexit, load_vmcs12_host_state; SDM Vol. 3 ch. 27-29].

VM entry (VMLAUNCH/VMRESUME by L1), in KVM's order:

1. permission (#UD outside VMX operation, #GP at CPL > 0), VMfailInvalid without a current
   VMCS, VMfailValid 4/5 for the launch state (decision: VMfailValid 26, "events blocked by MOV
   SS", is not checked: the engine does not tell a MOV-SS shadow from an STI one), then the control checks
   (VMfailValid 7: each control within the TRUE_ capability MSRs, no CR3-target values,
   bitmap addresses, the event-injection fields with the IA32_VMX_BASIC[56] rule of "Refine
   error code injection to nested VM"), the host-state checks (VMfailValid 8: fixed CR0/CR4
   bits, CR3 width, canonical addresses, selectors, EFER vs. the host address-space size, and
   with VM_EXIT_LOAD_CET_STATE the host CET state: nested_vmx_check_cet_state_common plus the
   64-bit canonical checks).
2. guest-state checks (fixed CR0/CR4 bits, PAT, VMCS link pointer, EFER vs. IA-32e mode, the
   guest CET state with VM_ENTRY_LOAD_CET_STATE, RFLAGS and activity state) — a failure is a
   VM exit to L1 with reason 33 | bit 31 (EXIT_REASON_INVALID_STATE | FAILED_VMENTRY) and L1's
   host state loaded, as nested_vmx_enter_non_root_mode does.
3. vmcs02 = L0's vmcs01 controls merged with vmcs12's: exception bitmap OR-ed (a #PF error-code
   mask/match intercepts every #PF), the MSR bitmap "exit if either L0 or L1 intercepts",
   CR0/CR4 guest/host masks OR-ed with vmcs12's read shadows, L0's load-CET-state controls.
   CET: GUEST_S_CET/SSP/INTR_SSP_TABLE of vmcs02 come from vmcs12 when L1 sets
   VM_ENTRY_LOAD_CET_STATE, otherwise from L1's values at VMLAUNCH (pre_vmenter_*), so L2
   runs with L1's CET state (prepare_vmcs02_rare / prepare_vmcs02).
4. L2's state goes into the CPU: CR0/CR3/CR4, EFER (vmcs12's with VM_ENTRY_LOAD_IA32_EFER,
   else LMA/LME from the IA-32e-mode control), segments with their access rights, GDTR/IDTR,
   RSP/RIP/RFLAGS, SYSENTER, PAT; an event in VM_ENTRY_INTR_INFO is injected.

Paging (decision): no EPT is offered to L1, so L2's CR3 is loaded into the CPU as it is and
L2's guest-physical addresses are L1's guest-physical addresses — exactly the architecture of
VMX without EPT (no shadow page tables are needed because cetvm's CPU walks guest page tables
itself).

L2's exits (nested_vmx_reflect_vmexit → nested_vmx_l1_wants_exit): CPUID, VMCALL, XSETBV,
the VMX instructions and a triple fault always go to L1; exceptions per vmcs12's exception
bitmap (#PF with the error-code mask/match); MSR accesses per L1's MSR bitmap (all without
one); I/O per unconditional I/O exiting or the I/O bitmaps; HLT per HLT exiting; CR accesses per
vmcs12's masks; an external interrupt with external-interrupt exiting. Reflection saves L2's
state into vmcs12 (guest fields, the CET fields always: sync_vmcs02_to_vmcs12_rare), fills the
exit information, loads vmcs12's host state into the CPU (HOST_S_CET/SSP/INTR_SSP_TABLE with
VM_EXIT_LOAD_CET_STATE; otherwise L1 resumes with its pre-entry CET values, KVM's vmcs01
fields) and L1 runs at HOST_RIP. Everything else is L0's: I/O, MMIO and HLT that L1 does not
intercept go to userspace as for L1, the instruction budget pauses L2.

The MSR-load/store lists are :mod:`cetvm.kvm.nested_msr_lists`. vmcs02's execution controls are
L0's OR-ed with L1's (:func:`vmcs02_exec_controls`), so an L2 HLT that L1 does not intercept is
KVM's (KVM_EXIT_HLT for userspace, as for L1). L1 may enter L2 in the HLT activity state; with
no event injected the vCPU halts at once (KVM_EXIT_HLT), an injected event wakes it. External-
interrupt exits acknowledge the interrupt when L1 sets "acknowledge interrupt on exit".

Not modelled (decisions): IDT-vectoring information (always 0: cetvm's CPU exits before an
event is delivered), the preemption timer, MTF, NMI windows, NMI exiting to L1 (an NMI for L1
waits until L1 runs: :mod:`cetvm.kvm.nmi`), the wait-for-SIPI activity state.
"""

from __future__ import annotations

from cetvm.arch import Cr0, Cr4, Vector, VECTORS_WITH_ERROR_CODE, is_canonical
from cetvm.arch.msr import Efer, Msr
from cetvm.arch.regs import RFLAGS_FIXED, RFLAGS_RESERVED, RFLAGS_VM
from cetvm.arch.vmx import (
    AR_DPL_SHIFT, AR_L, AR_P, AR_S, AR_TYPE, AR_TYPE_ACCESSED, AR_TYPE_CODE, AR_UNUSABLE,
    ENTRY_FAIL_DEFAULT, ENTRY_FAIL_PDPTE, ENTRY_FAIL_VMCS_LINK_PTR, INTR_INFO_DELIVER_CODE, INTR_INFO_VALID, INTR_TYPE_EXT_INTR,
    INTR_TYPE_HARD_EXCEPTION, INTR_TYPE_NMI, INTR_TYPE_OTHER_EVENT, INTR_TYPE_PRIV_SW_EXCEPTION,
    INTR_TYPE_SOFT_EXCEPTION, INTR_TYPE_SOFT_INTR, INTR_INFO_TYPE_SHIFT, VMX_EXIT_REASONS_FAILED_VMENTRY,
    ExitReason as VmxExitReason, GuestActivityState, PinBasedControls, CpuBasedControls, SecondaryControls,
    VmcsField as F, VmEntryControls, VmExitControls, VmxAbort, VmxInsnError,
)
from cetvm.cpu.exits import ExitReason, VmExit
from cetvm.cpu.paging import pae_pdptes_valid
from cetvm.cpu.state import GPR_NAMES, DescriptorTable, Segment, Sregs
from cetvm.cpu.vmcs import Vmcs
from cetvm.kvm.cet_rules import kvm_is_valid_u_s_cet
from cetvm.kvm.msr import guest_maxphyaddr, kvm_pat_valid, vmx_get_supported_debugctl
from cetvm.kvm.nested import (
    INVALID_GPA, NestedVcpu, handle_invept_invvpid, handle_vmclear, handle_vmptrld, handle_vmptrst, handle_vmread,
    handle_vmwrite, handle_vmxoff, handle_vmxon, nested_cr0_valid, nested_cr4_valid, nested_vmx_allowed,
    nested_vmx_check_permission, nested_vmx_fail, nested_vmx_fail_invalid, page_address_valid,
)
from cetvm.kvm.nested_caps import VMCS12_REVISION, NestedVmxMsrs
from cetvm.kvm.nested_guest_segments import guest_segments_valid
from cetvm.kvm.nested_msr_lists import (
    ENTRY_LOAD, EXIT_LOAD, nested_vmx_check_msr_switch_controls, nested_vmx_load_msr, nested_vmx_store_msr,
)
from cetvm.kvm.vmcs12 import Vmcs12

#: Segment register → (selector, base, limit, access-rights) vmcs12 fields.
GUEST_SEGMENTS: dict[str, tuple[F, F, F, F]] = {
    name: (getattr(F, f"GUEST_{name.upper()}_SELECTOR"), getattr(F, f"GUEST_{name.upper()}_BASE"),
           getattr(F, f"GUEST_{name.upper()}_LIMIT"), getattr(F, f"GUEST_{name.upper()}_AR_BYTES"))
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
}
#: VMX access rights: bit 16 = unusable [SDM Vol. 3 Table 25-2].
AR_MASK = 0xF0FF
SEGMENT_RPL_TI = 7
#: EFER bits a guest may have on VMX (efer_reserved_bits' complement): SCE, LME, LMA, NXE.
EFER_VALID = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE)
#: The activity states L1 may enter L2 in: IA32_VMX_MISC[6] (HLT) is reported, wait-for-SIPI
#: and shutdown are not (:mod:`cetvm.kvm.nested_caps`).
GUEST_ACTIVITY_OFFERED = frozenset({GuestActivityState.ACTIVE, GuestActivityState.HLT})
#: The events VM entry may inject into the HLT activity state: external interrupts, NMIs, #DB and
#: #MC hardware exceptions, other events [SDM Vol. 3 §28.3.1.5].
HLT_INJECTABLE_VECTORS = frozenset({Vector.DB, Vector.MC})
#: vmcs01 execution controls vmcs02 does not inherit (prepare_vmcs02_early): L0's window
#: requests (set on vmcs02 itself when L0 needs one) and the TPR shadow.
VMCS01_ONLY_EXEC = int(CpuBasedControls.INTERRUPT_WINDOW_EXITING | CpuBasedControls.NMI_WINDOW_EXITING
                       | CpuBasedControls.USE_TPR_SHADOW)
#: Secondary controls vmcs02 takes from vmcs12 only (prepare_vmcs02_early).
VMCS12_ONLY_PROC2 = int(SecondaryControls.VIRTUALIZE_APIC_ACCESSES | SecondaryControls.DESCRIPTOR_TABLE_EXITING
                        | SecondaryControls.ENABLE_RDTSCP | SecondaryControls.ENABLE_INVPCID
                        | SecondaryControls.ENABLE_XSAVES)
#: Pin-based controls of vmcs12 that never reach vmcs02 (KVM emulates the preemption timer and
#: posted interrupts for L2; neither is offered here).
VMCS12_EMULATED_PIN = int(PinBasedControls.PREEMPTION_TIMER | PinBasedControls.POSTED_INTERRUPTS)
DR7_RESET = 0x400


# ============================================================================ state transfer
def vmx_ar(seg: Segment) -> int:
    """A segment's VMX access rights (unusable when not present) [SDM Vol. 3 §25.4.1]. A loaded
    code or data segment is accessed: the processor sets the descriptor's accessed bit when it
    loads the selector [SDM Vol. 3 §3.4.5.1] (the engine's IRET and far transfers do not, so the
    bit is set here, as the hardware's segment cache would hold it)."""
    if not seg.present:
        return AR_UNUSABLE
    ar = (seg.attributes >> 8) & AR_MASK
    return ar | AR_TYPE_ACCESSED if ar & AR_S else ar


def segment_from_vmcs(selector: int, base: int, limit: int, ar: int) -> Segment:
    return Segment(selector & 0xFFFF, base, limit & 0xFFFF_FFFF, 0 if ar & AR_UNUSABLE else (ar & AR_MASK) << 8)


def _sregs_segment_name(name: str) -> str:
    return "ldt" if name == "ldtr" else name


def load_vmcs12_guest_state(vcpu: NestedVcpu, vmcs12: Vmcs12) -> None:
    """prepare_vmcs02 (guest state): the CPU takes L2's registers from vmcs12."""
    cpu = vcpu.cpu
    r = vmcs12.read
    entry = r(F.VM_ENTRY_CONTROLS)
    ia32e = bool(entry & VmEntryControls.IA32E_MODE_GUEST)
    if entry & VmEntryControls.LOAD_IA32_EFER:
        efer = r(F.GUEST_IA32_EFER)
    else:  # nested_vmx_calc_efer()
        efer = cpu.msr(Msr.IA32_EFER) & ~int(Efer.LMA | Efer.LME)
        if ia32e:
            efer |= int(Efer.LMA | Efer.LME)
    sregs = Sregs(
        gdt=DescriptorTable(r(F.GUEST_GDTR_BASE), r(F.GUEST_GDTR_LIMIT) & 0xFFFF),
        idt=DescriptorTable(r(F.GUEST_IDTR_BASE), r(F.GUEST_IDTR_LIMIT) & 0xFFFF),
        cr0=r(F.GUEST_CR0), cr2=cpu.get_sregs().cr2, cr3=r(F.GUEST_CR3), cr4=r(F.GUEST_CR4), efer=efer)
    for name, (sel, base, limit, ar) in GUEST_SEGMENTS.items():
        setattr(sregs, _sregs_segment_name(name), segment_from_vmcs(r(sel), r(base), r(limit), r(ar)))
    _load_cpu_state(vcpu, sregs, rsp=r(F.GUEST_RSP), rip=r(F.GUEST_RIP), rflags=r(F.GUEST_RFLAGS))
    cpu.set_msr(Msr.IA32_SYSENTER_CS, r(F.GUEST_SYSENTER_CS) & 0xFFFF)
    cpu.set_msr(Msr.IA32_SYSENTER_ESP, r(F.GUEST_SYSENTER_ESP))
    cpu.set_msr(Msr.IA32_SYSENTER_EIP, r(F.GUEST_SYSENTER_EIP))
    if entry & VmEntryControls.LOAD_IA32_PAT:
        cpu.set_msr(Msr.IA32_PAT, r(F.GUEST_IA32_PAT))
    if entry & VmEntryControls.LOAD_DEBUG_CONTROLS:  # else L2 runs with L1's DR7
        cpu.set_reg("dr7", r(F.GUEST_DR7))


def _load_cpu_state(vcpu: NestedVcpu, sregs: Sregs, *, rsp: int, rip: int, rflags: int) -> None:
    """Load a whole register context (VM entry or exit): system registers, then RSP/RIP/RFLAGS;
    the CPU's translations and TLB are flushed (CR3 may have changed) and KVM's cached CR0/CR4
    follow."""
    cpu = vcpu.cpu
    cpu.set_sregs(sregs)
    cpu.write_cr(3, sregs.cr3)
    cpu.flush_tlb()
    cpu.set_reg("rsp", rsp)
    cpu.set_reg("rflags", rflags)
    cpu.set_reg("rip", rip)
    vcpu.state.cr0, vcpu.state.cr4 = sregs.cr0, sregs.cr4


def sync_vmcs02_to_vmcs12(vcpu: NestedVcpu, vmcs12: Vmcs12) -> None:
    """sync_vmcs02_to_vmcs12 (+ _rare): L2's state from the CPU into vmcs12's guest fields; the
    CET fields from vmcs02 (the CPU saved them at the exit); the IA-32e-mode entry control
    follows EFER.LMA (IA32_VMX_MISC[5])."""
    cpu, nested = vcpu.cpu, vcpu.nested
    sregs = cpu.get_sregs()
    w = vmcs12.write
    w(F.GUEST_CR0, sregs.cr0)
    w(F.GUEST_CR3, sregs.cr3)
    w(F.GUEST_CR4, sregs.cr4)
    for name, (sel, base, limit, ar) in GUEST_SEGMENTS.items():
        seg = getattr(sregs, _sregs_segment_name(name))
        w(sel, seg.selector)
        w(base, seg.base)
        w(limit, seg.limit)
        w(ar, vmx_ar(seg))
    w(F.GUEST_GDTR_BASE, sregs.gdt.base)
    w(F.GUEST_GDTR_LIMIT, sregs.gdt.limit)
    w(F.GUEST_IDTR_BASE, sregs.idt.base)
    w(F.GUEST_IDTR_LIMIT, sregs.idt.limit)
    w(F.GUEST_RSP, cpu.reg("rsp"))
    w(F.GUEST_RIP, cpu.rip)
    w(F.GUEST_RFLAGS, cpu.reg("rflags"))
    w(F.GUEST_SYSENTER_CS, cpu.msr(Msr.IA32_SYSENTER_CS))
    w(F.GUEST_SYSENTER_ESP, cpu.msr(Msr.IA32_SYSENTER_ESP))
    w(F.GUEST_SYSENTER_EIP, cpu.msr(Msr.IA32_SYSENTER_EIP))
    w(F.GUEST_INTERRUPTIBILITY_INFO, 0)
    w(F.GUEST_ACTIVITY_STATE, GuestActivityState.ACTIVE)  # no in-kernel irqchip: mp_state stays RUNNABLE
    exit_ctl, entry = vmcs12.read(F.VM_EXIT_CONTROLS), vmcs12.read(F.VM_ENTRY_CONTROLS)
    if exit_ctl & VmExitControls.SAVE_IA32_EFER:
        w(F.GUEST_IA32_EFER, sregs.efer)
    if exit_ctl & VmExitControls.SAVE_IA32_PAT:
        w(F.GUEST_IA32_PAT, cpu.msr(Msr.IA32_PAT))
    if exit_ctl & VmExitControls.SAVE_DEBUG_CONTROLS:
        w(F.GUEST_DR7, cpu.reg("dr7"))
        w(F.GUEST_IA32_DEBUGCTL, vcpu.state.vmcs.read(F.GUEST_IA32_DEBUGCTL))
    ia32e = int(VmEntryControls.IA32E_MODE_GUEST) if sregs.efer & Efer.LMA else 0
    w(F.VM_ENTRY_CONTROLS, (entry & ~int(VmEntryControls.IA32E_MODE_GUEST)) | ia32e)
    vmcs02 = nested.vmcs02
    if vmcs02 is not None:
        for field in (F.GUEST_S_CET, F.GUEST_SSP, F.GUEST_INTR_SSP_TABLE):
            w(field, vmcs02.read(field))


def load_vmcs12_host_state(vcpu: NestedVcpu, vmcs12: Vmcs12) -> None:
    """load_vmcs12_host_state(): L1 resumes from vmcs12's host-state area [SDM Vol. 3 §29.5]."""
    cpu, r = vcpu.cpu, vmcs12.read
    exit_ctl = r(F.VM_EXIT_CONTROLS)
    ia32e = bool(exit_ctl & VmExitControls.HOST_ADDR_SPACE_SIZE)
    if exit_ctl & VmExitControls.LOAD_IA32_EFER:
        efer = r(F.HOST_IA32_EFER)
    else:
        efer = cpu.msr(Msr.IA32_EFER) & ~int(Efer.LMA | Efer.LME)
        if ia32e:
            efer |= int(Efer.LMA | Efer.LME)
    code = Segment.code64(r(F.HOST_CS_SELECTOR)) if ia32e else Segment.code32(r(F.HOST_CS_SELECTOR))

    def data(field: F, base: int = 0) -> Segment:
        flat = Segment.data(r(field))
        return Segment(flat.selector, base, 0xFFFF_FFFF, flat.attributes)

    tr = Segment(r(F.HOST_TR_SELECTOR), r(F.HOST_TR_BASE), 0x67, 0x8B00)  # busy 64-bit TSS, present
    sregs = Sregs(cs=code, ds=data(F.HOST_DS_SELECTOR), es=data(F.HOST_ES_SELECTOR), ss=data(F.HOST_SS_SELECTOR),
                  fs=data(F.HOST_FS_SELECTOR, r(F.HOST_FS_BASE)), gs=data(F.HOST_GS_SELECTOR, r(F.HOST_GS_BASE)),
                  tr=tr, ldt=Segment(0, 0, 0, 0),
                  gdt=DescriptorTable(r(F.HOST_GDTR_BASE), 0xFFFF), idt=DescriptorTable(r(F.HOST_IDTR_BASE), 0xFFFF),
                  cr0=r(F.HOST_CR0) | int(Cr0.ET), cr2=cpu.get_sregs().cr2, cr3=r(F.HOST_CR3), cr4=r(F.HOST_CR4),
                  efer=efer)
    _load_cpu_state(vcpu, sregs, rsp=r(F.HOST_RSP), rip=r(F.HOST_RIP), rflags=RFLAGS_FIXED)
    cpu.set_reg("dr7", DR7_RESET)
    cpu.set_msr(Msr.IA32_SYSENTER_CS, r(F.HOST_IA32_SYSENTER_CS) & 0xFFFF)
    cpu.set_msr(Msr.IA32_SYSENTER_ESP, r(F.HOST_IA32_SYSENTER_ESP))
    cpu.set_msr(Msr.IA32_SYSENTER_EIP, r(F.HOST_IA32_SYSENTER_EIP))
    if exit_ctl & VmExitControls.LOAD_IA32_PAT:
        cpu.set_msr(Msr.IA32_PAT, r(F.HOST_IA32_PAT))
    vmcs01 = vcpu.state.vmcs
    vmcs01.write(F.GUEST_IA32_DEBUGCTL, 0)  # with DR7 = 0x400 [SDM Vol. 3 §29.5.1]
    if exit_ctl & VmExitControls.LOAD_CET_STATE:  # cet_vmcs_fields_set(vmcs01, host_*)
        vmcs01.write(F.GUEST_S_CET, r(F.HOST_S_CET))
        vmcs01.write(F.GUEST_SSP, r(F.HOST_SSP))
        vmcs01.write(F.GUEST_INTR_SSP_TABLE, r(F.HOST_INTR_SSP_TABLE))
    if nested_vmx_load_msr(vcpu, vmcs12, EXIT_LOAD):
        nested_vmx_abort(vcpu, VmxAbort.LOAD_HOST_MSR_FAIL)


def nested_vmx_abort(vcpu: NestedVcpu, indicator: VmxAbort) -> None:
    """nested_vmx_abort(): a VMX abort [SDM Vol. 3 §29.7] — KVM makes a triple-fault request,
    so the vCPU shuts down (KVM_EXIT_SHUTDOWN) before it runs again."""
    vcpu.nested.vmx_abort = int(indicator)


# ============================================================================ checks
def _ctl_valid(value: int, allowed: tuple[int, int]) -> bool:
    """vmx_control_verify(): the bits that must be 1 are, no bit outside the allowed 1-settings."""
    must, may = allowed
    return value & must == must and not value & ~may


def _bitmap_valid(vcpu: NestedVcpu, gpa: int) -> bool:
    return page_address_valid(vcpu.state, gpa)


def nested_check_vm_entry_event(msrs: NestedVmxMsrs, vmcs12: Vmcs12) -> bool:
    """nested_check_vm_entry_controls' event-injection part with "Refine error code injection
    to nested VM": in protected mode a hardware exception may come with or without an error
    code when IA32_VMX_BASIC[56] is reported to L1 (#CP included); otherwise the error code
    must match the vector [SDM Vol. 3 §27.2.1.3]."""
    info = vmcs12.read(F.VM_ENTRY_INTR_INFO)
    if not info & INTR_INFO_VALID:
        return True
    has_error_code = bool(info & INTR_INFO_DELIVER_CODE)
    intr_type, vector = (info >> 8) & 7, info & 0xFF
    prot_mode = bool(vmcs12.read(F.GUEST_CR0) & Cr0.PE)
    if intr_type == 1 or intr_type == INTR_TYPE_OTHER_EVENT:  # reserved; MTF is not offered
        return False
    if (intr_type == INTR_TYPE_NMI and vector != Vector.NMI) or (intr_type == INTR_TYPE_HARD_EXCEPTION and vector > 31):
        return False
    if not prot_mode or intr_type != INTR_TYPE_HARD_EXCEPTION:
        if has_error_code:
            return False
    elif not msrs.no_hw_errcode_cc and has_error_code != (vector in VECTORS_WITH_ERROR_CODE):
        return False
    if has_error_code and vmcs12.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE) >> 16:
        return False
    if info & 0x7FFF_F000:  # reserved bits 30:12
        return False
    if intr_type in (INTR_TYPE_SOFT_EXCEPTION, INTR_TYPE_SOFT_INTR, INTR_TYPE_PRIV_SW_EXCEPTION):
        length = vmcs12.read(F.VM_ENTRY_INSTRUCTION_LEN)
        if length > 15 or length == 0:
            return False
    return True


def nested_vmx_check_controls(vcpu: NestedVcpu, vmcs12: Vmcs12) -> bool:
    """nested_check_vm_execution_controls / _exit_ / _entry_controls: True when valid."""
    msrs, r = vcpu.nested.msrs, vmcs12.read
    proc = r(F.CPU_BASED_VM_EXEC_CONTROL)
    proc2 = r(F.SECONDARY_VM_EXEC_CONTROL) if proc & CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS else 0
    if not (_ctl_valid(r(F.PIN_BASED_VM_EXEC_CONTROL), msrs.true_pin) and _ctl_valid(proc, msrs.true_proc)
            and _ctl_valid(proc2, (0, msrs.proc2)) and _ctl_valid(r(F.VM_EXIT_CONTROLS), msrs.true_exit)
            and _ctl_valid(r(F.VM_ENTRY_CONTROLS), msrs.true_entry)):
        return False
    if r(F.CR3_TARGET_COUNT) > 0:  # nested_cpu_vmx_misc_cr3_count() is 0
        return False
    if proc & CpuBasedControls.USE_IO_BITMAPS and not (_bitmap_valid(vcpu, r(F.IO_BITMAP_A))
                                                        and _bitmap_valid(vcpu, r(F.IO_BITMAP_B))):
        return False
    if proc & CpuBasedControls.USE_MSR_BITMAPS and not _bitmap_valid(vcpu, r(F.MSR_BITMAP)):
        return False
    if not nested_vmx_check_msr_switch_controls(vcpu, vmcs12):
        return False
    return nested_check_vm_entry_event(msrs, vmcs12)


def nested_vmx_check_cet_state_common(vcpu: NestedVcpu, s_cet: int, ssp: int, ssp_tbl: int) -> bool:
    """nested_vmx_check_cet_state_common(): S_CET valid for this guest (kvm_is_valid_u_s_cet),
    SSP 4-byte aligned, the SSP table canonical. True when valid."""
    cpuid = vcpu.state.cpuid
    return (kvm_is_valid_u_s_cet(s_cet, cpuid.guest_cpu_cap_has("shstk"), cpuid.guest_cpu_cap_has("ibt"))
            and not ssp & 3 and is_canonical(ssp_tbl))


def _cet_state_valid(vcpu: NestedVcpu, s_cet: int, ssp: int, ssp_tbl: int, ia32e: bool) -> bool:
    """The common CET check, then S_CET and SSP canonical for a 64-bit context, their bits 63:32
    clear otherwise."""
    if not nested_vmx_check_cet_state_common(vcpu, s_cet, ssp, ssp_tbl):
        return False
    if ia32e:
        return is_canonical(s_cet) and is_canonical(ssp)
    return not s_cet >> 32 and not ssp >> 32


def _legal_cr3(vcpu: NestedVcpu, cr3: int) -> bool:
    """kvm_vcpu_is_legal_cr3(): no bit at or above MAXPHYADDR."""
    return not cr3 >> guest_maxphyaddr(vcpu.state)


def nested_vmx_check_host_state(vcpu: NestedVcpu, vmcs12: Vmcs12) -> bool:
    """nested_vmx_check_address_space_size + nested_vmx_check_host_state: True when valid."""
    r, msrs = vmcs12.read, vcpu.nested.msrs
    exit_ctl = r(F.VM_EXIT_CONTROLS)
    ia32e = bool(exit_ctl & VmExitControls.HOST_ADDR_SPACE_SIZE)
    if ia32e != bool(vcpu.cpu.msr(Msr.IA32_EFER) & Efer.LMA):
        return False
    if not (nested_cr0_valid(r(F.HOST_CR0)) and nested_cr4_valid(msrs, r(F.HOST_CR4)) and _legal_cr3(vcpu, r(F.HOST_CR3))):
        return False
    if not (is_canonical(r(F.HOST_IA32_SYSENTER_ESP)) and is_canonical(r(F.HOST_IA32_SYSENTER_EIP))):
        return False
    if exit_ctl & VmExitControls.LOAD_IA32_PAT and not kvm_pat_valid(r(F.HOST_IA32_PAT)):
        return False
    if ia32e:
        if not r(F.HOST_CR4) & Cr4.PAE:
            return False
    elif (r(F.VM_ENTRY_CONTROLS) & VmEntryControls.IA32E_MODE_GUEST or r(F.HOST_CR4) & Cr4.PCIDE
          or r(F.HOST_RIP) >> 32):
        return False
    selectors = (F.HOST_CS_SELECTOR, F.HOST_SS_SELECTOR, F.HOST_DS_SELECTOR, F.HOST_ES_SELECTOR,
                 F.HOST_FS_SELECTOR, F.HOST_GS_SELECTOR, F.HOST_TR_SELECTOR)
    if any(r(s) & SEGMENT_RPL_TI for s in selectors) or not r(F.HOST_CS_SELECTOR) or not r(F.HOST_TR_SELECTOR):
        return False
    if not r(F.HOST_SS_SELECTOR) and not ia32e:
        return False
    bases = (F.HOST_FS_BASE, F.HOST_GS_BASE, F.HOST_GDTR_BASE, F.HOST_IDTR_BASE, F.HOST_TR_BASE, F.HOST_RIP)
    if not all(is_canonical(r(b)) for b in bases):
        return False
    if exit_ctl & VmExitControls.LOAD_IA32_EFER:
        efer = r(F.HOST_IA32_EFER)
        if efer & ~EFER_VALID or ia32e != bool(efer & Efer.LMA) or ia32e != bool(efer & Efer.LME):
            return False
    if exit_ctl & VmExitControls.LOAD_CET_STATE:
        return _cet_state_valid(vcpu, r(F.HOST_S_CET), r(F.HOST_SSP), r(F.HOST_INTR_SSP_TABLE), ia32e)
    return True


def nested_vmx_check_vmcs_link_ptr(vcpu: NestedVcpu, vmcs12: Vmcs12) -> bool:
    """nested_vmx_check_vmcs_link_ptr(): all ones, or a page in RAM holding a vmcs12 revision
    without the shadow bit (no VMCS shadowing is offered)."""
    ptr = vmcs12.read(F.VMCS_LINK_POINTER)
    if ptr == INVALID_GPA:
        return True
    if not page_address_valid(vcpu.state, ptr) or not vcpu.cpu.is_ram(ptr, 4):
        return False
    return int.from_bytes(vcpu.cpu.read_phys(ptr, 4), "little") == VMCS12_REVISION


def nested_vmx_check_guest_state(vcpu: NestedVcpu, vmcs12: Vmcs12) -> int | None:
    """nested_vmx_check_guest_state() and the hardware guest-state checks cetvm makes for
    vmcs02: None when valid, else the exit qualification of the failed entry."""
    r, msrs = vmcs12.read, vcpu.nested.msrs
    entry = r(F.VM_ENTRY_CONTROLS)
    ia32e = bool(entry & VmEntryControls.IA32E_MODE_GUEST)
    cr0, cr4 = r(F.GUEST_CR0), r(F.GUEST_CR4)
    if not nested_cr0_valid(cr0) or not nested_cr4_valid(msrs, cr4):
        return ENTRY_FAIL_DEFAULT
    if entry & VmEntryControls.LOAD_IA32_PAT and not kvm_pat_valid(r(F.GUEST_IA32_PAT)):
        return ENTRY_FAIL_DEFAULT
    if entry & VmEntryControls.LOAD_DEBUG_CONTROLS and r(F.GUEST_DR7) >> 32:  # kvm_dr7_valid
        return ENTRY_FAIL_DEFAULT
    if not nested_vmx_check_vmcs_link_ptr(vcpu, vmcs12):
        return ENTRY_FAIL_VMCS_LINK_PTR
    if entry & VmEntryControls.LOAD_IA32_EFER:
        efer = r(F.GUEST_IA32_EFER)
        if (efer & ~EFER_VALID or ia32e != bool(efer & Efer.LMA)
                or (cr0 & Cr0.PG and ia32e != bool(efer & Efer.LME))):
            return ENTRY_FAIL_DEFAULT
    if not guest_activity_state_valid(vmcs12) or r(F.GUEST_INTERRUPTIBILITY_INFO) & ~0x1F:
        return ENTRY_FAIL_DEFAULT
    if entry & VmEntryControls.LOAD_CET_STATE and not _cet_state_valid(
            vcpu, r(F.GUEST_S_CET), r(F.GUEST_SSP), r(F.GUEST_INTR_SSP_TABLE), ia32e):
        return ENTRY_FAIL_DEFAULT
    if not guest_registers_valid(vcpu, vmcs12, ia32e):
        return ENTRY_FAIL_DEFAULT
    if cr0 & Cr0.PG and cr4 & Cr4.PAE and not ia32e and not _pdptes_valid(vcpu, r(F.GUEST_CR3)):
        return ENTRY_FAIL_PDPTE
    return None


def _pdptes_valid(vcpu: NestedVcpu, cr3: int) -> bool:
    """nested_vmx_load_cr3() for an L2 in PAE paging without nested EPT: load_pdptrs() must
    succeed (the PDPT is RAM, no reserved bit set in a present PDPTE)."""
    cpu = vcpu.cpu
    if not cpu.is_ram(cr3 & 0xFFFF_FFE0, 32):
        return False
    return pae_pdptes_valid(lambda gpa: int.from_bytes(cpu.read_phys(gpa, 8), "little"), cr3,
                            guest_maxphyaddr(vcpu.state))




def guest_activity_state_valid(vmcs12: Vmcs12) -> bool:
    """nested_check_guest_non_reg_state() and the hardware checks of the activity state [SDM
    Vol. 3 §28.3.1.5]: a state the implementation offers (:data:`GUEST_ACTIVITY_OFFERED`); HLT
    only with SS.DPL = 0, and an event injected into it only an external interrupt, an NMI, a
    #DB or #MC hardware exception, or an "other event"."""
    state = vmcs12.read(F.GUEST_ACTIVITY_STATE)
    if state not in GUEST_ACTIVITY_OFFERED:
        return False
    if state != GuestActivityState.HLT:
        return True
    if (vmcs12.read(F.GUEST_SS_AR_BYTES) >> AR_DPL_SHIFT) & 3:
        return False
    info = vmcs12.read(F.VM_ENTRY_INTR_INFO)
    if not info & INTR_INFO_VALID:
        return True
    intr_type = (info >> INTR_INFO_TYPE_SHIFT) & 7
    if intr_type == INTR_TYPE_HARD_EXCEPTION:
        return info & 0xFF in HLT_INJECTABLE_VECTORS
    return intr_type in (INTR_TYPE_EXT_INTR, INTR_TYPE_NMI, INTR_TYPE_OTHER_EVENT)
TSS_BUSY_64 = 0xB


def guest_registers_valid(vcpu: NestedVcpu, vmcs12: Vmcs12, ia32e: bool) -> bool:
    """The hardware checks of the guest registers cetvm's CPU makes for vmcs02 [SDM Vol. 3
    §28.3.1.2-28.3.1.4], the ones whose violation would give L2 a state the CPU cannot run:
    CR3 within MAXPHYADDR; RFLAGS reserved bits clear and bit 1 set; in IA-32e mode CR4.PAE,
    CR0.PG, a canonical RIP and a 64-bit or compatibility-mode code segment; CS usable, present,
    code; TR usable, present, a busy TSS; GDTR/IDTR limits of 16 bits and canonical bases;
    canonical IA32_SYSENTER_ESP/EIP [§28.3.1.1]; the
    segment-register checks (:func:`cetvm.kvm.nested_guest_segments.guest_segments_valid`)."""
    r = vmcs12.read
    cr0, cr4 = r(F.GUEST_CR0), r(F.GUEST_CR4)
    rflags = r(F.GUEST_RFLAGS)
    if not _legal_cr3(vcpu, r(F.GUEST_CR3)) or rflags & RFLAGS_RESERVED or not rflags & RFLAGS_FIXED:
        return False
    cs_ar, tr_ar = r(F.GUEST_CS_AR_BYTES), r(F.GUEST_TR_AR_BYTES)
    if cs_ar & AR_UNUSABLE or not cs_ar & AR_P or not cs_ar & AR_S or not cs_ar & AR_TYPE_CODE:
        return False
    if tr_ar & AR_UNUSABLE or not tr_ar & AR_P or tr_ar & AR_S or tr_ar & AR_TYPE != TSS_BUSY_64 and ia32e:
        return False
    if r(F.GUEST_GDTR_LIMIT) >> 16 or r(F.GUEST_IDTR_LIMIT) >> 16:
        return False
    if not all(is_canonical(r(f)) for f in (F.GUEST_GDTR_BASE, F.GUEST_IDTR_BASE, F.GUEST_FS_BASE, F.GUEST_GS_BASE,
                                             F.GUEST_TR_BASE, F.GUEST_SYSENTER_ESP, F.GUEST_SYSENTER_EIP)):
        return False
    if not guest_segments_valid(r, ia32e, vm86=bool(rflags & RFLAGS_VM)):
        return False
    if ia32e:
        return bool(cr4 & Cr4.PAE and cr0 & Cr0.PG) and is_canonical(r(F.GUEST_RIP))
    return not cs_ar & AR_L and not r(F.GUEST_RIP) >> 32


# ============================================================================ vmcs02
class MergedMsrBitmap:
    """The vmcs02 MSR bitmap (nested_vmx_prepare_msr_bitmap): an MSR exits if L0 intercepts it
    for L1 or L1 intercepts it for L2 in either direction (cetvm's CPU has one bitmap for reads
    and writes; the direction is checked when the exit is reflected)."""

    def __init__(self, l0, l1_intercepts: frozenset[int] | None) -> None:
        self.l0 = l0
        self.l1 = l1_intercepts

    def __contains__(self, index: object) -> bool:
        return self.l1 is None or index in self.l1 or index in self.l0


#: The MSR ranges of an MSR bitmap and the offsets of their read/write halves [SDM §25.6.9].
MSR_BITMAP_LOW = range(0, 0x2000)
MSR_BITMAP_HIGH = range(0xC000_0000, 0xC000_2000)


def msr_bitmap_bit(bitmap: bytes, index: int, write: bool) -> bool:
    """The bit for ``index`` in a 4 KiB MSR bitmap; an MSR outside both ranges always exits."""
    if index in MSR_BITMAP_LOW:
        base, bit = 0x000, index
    elif index in MSR_BITMAP_HIGH:
        base, bit = 0x400, index - 0xC000_0000
    else:
        return True
    base += 0x800 if write else 0
    return bool(bitmap[base + bit // 8] >> (bit % 8) & 1)


def l1_msr_intercepts(bitmap: bytes) -> frozenset[int]:
    """Every MSR index L1's bitmap intercepts in either direction."""
    out = set()
    for half, first in ((0x000, 0), (0x400, 0xC000_0000)):
        for direction in (0, 0x800):
            for byte_index in range(0x400):
                byte = bitmap[half + direction + byte_index]
                if byte:
                    out.update(first + byte_index * 8 + b for b in range(8) if byte >> b & 1)
    return frozenset(out)


def vmcs02_exec_controls(vmcs01: Vmcs, vmcs12: Vmcs12) -> tuple[int, int, int]:
    """prepare_vmcs02_early(): vmcs02's pin-based, primary and secondary execution controls —
    L0's (vmcs01) OR-ed with L1's, so an exit either wants happens (L0's HLT exiting makes an L2
    HLT that L1 does not intercept KVM's: KVM_EXIT_HLT for userspace, as for L1); every I/O
    exits (unconditional I/O exiting, no I/O bitmaps: L1's bitmaps are consulted on the exit);
    the MSR-bitmap control and bitmap are L0's (the merged bitmap); the secondary controls of
    :data:`VMCS12_ONLY_PROC2` come from vmcs12 alone."""
    r = vmcs12.read
    pin = vmcs01.read(F.PIN_BASED_VM_EXEC_CONTROL) | (r(F.PIN_BASED_VM_EXEC_CONTROL) & ~VMCS12_EMULATED_PIN)
    exec01 = vmcs01.read(F.CPU_BASED_VM_EXEC_CONTROL)
    exec12 = r(F.CPU_BASED_VM_EXEC_CONTROL)
    exec02 = (exec01 & ~VMCS01_ONLY_EXEC) | exec12
    exec02 = (exec02 | CpuBasedControls.UNCONDITIONAL_IO_EXITING) & ~int(CpuBasedControls.USE_IO_BITMAPS)
    msr_bitmaps = int(CpuBasedControls.USE_MSR_BITMAPS)
    exec02 = (exec02 & ~msr_bitmaps) | (exec01 & msr_bitmaps)
    proc2 = vmcs01.read(F.SECONDARY_VM_EXEC_CONTROL) & ~VMCS12_ONLY_PROC2
    if exec12 & CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS:
        proc2 |= r(F.SECONDARY_VM_EXEC_CONTROL)
    return pin, exec02, proc2


def prepare_vmcs02(vcpu: NestedVcpu, vmcs12: Vmcs12) -> Vmcs:
    """prepare_vmcs02_early / prepare_vmcs02(_rare): the VMCS the CPU runs L2 with."""
    vmcs01, r, cpu = vcpu.state.vmcs, vmcs12.read, vcpu.cpu
    vmcs02 = Vmcs()
    for field, value in zip((F.PIN_BASED_VM_EXEC_CONTROL, F.CPU_BASED_VM_EXEC_CONTROL, F.SECONDARY_VM_EXEC_CONTROL),
                            vmcs02_exec_controls(vmcs01, vmcs12)):
        vmcs02.write(field, value)
    if r(F.VM_ENTRY_CONTROLS) & VmEntryControls.LOAD_DEBUG_CONTROLS:
        debugctl = r(F.GUEST_IA32_DEBUGCTL) & vmx_get_supported_debugctl(vcpu.state, False)
    else:  # vmx->nested.pre_vmenter_debugctl
        debugctl = vmcs01.read(F.GUEST_IA32_DEBUGCTL)
    vmcs02.write(F.GUEST_IA32_DEBUGCTL, debugctl)
    for field in (F.VM_ENTRY_CONTROLS, F.VM_EXIT_CONTROLS, F.HOST_S_CET, F.HOST_SSP, F.HOST_INTR_SSP_TABLE):
        vmcs02.write(field, vmcs01.read(field))
    bitmap = r(F.EXCEPTION_BITMAP) | vmcs01.read(F.EXCEPTION_BITMAP)
    if r(F.PAGE_FAULT_ERROR_CODE_MASK) or r(F.PAGE_FAULT_ERROR_CODE_MATCH):
        bitmap |= 1 << Vector.PF
    vmcs02.write(F.EXCEPTION_BITMAP, bitmap)
    vmcs02.write(F.CR0_GUEST_HOST_MASK, r(F.CR0_GUEST_HOST_MASK) | vmcs01.read(F.CR0_GUEST_HOST_MASK))
    vmcs02.write(F.CR0_READ_SHADOW, r(F.CR0_READ_SHADOW))
    mask01, mask12 = vmcs01.read(F.CR4_GUEST_HOST_MASK), r(F.CR4_GUEST_HOST_MASK)
    vmcs02.write(F.CR4_GUEST_HOST_MASK, mask01 | mask12)
    vmcs02.write(F.CR4_READ_SHADOW, (r(F.CR4_READ_SHADOW) & mask12) | (r(F.GUEST_CR4) & mask01 & ~mask12))
    l1 = None
    if r(F.CPU_BASED_VM_EXEC_CONTROL) & CpuBasedControls.USE_MSR_BITMAPS:
        l1 = l1_msr_intercepts(cpu.read_phys(r(F.MSR_BITMAP), 0x1000)) if cpu.is_ram(r(F.MSR_BITMAP), 0x1000) else None
    vmcs02.set_msr_bitmap(MergedMsrBitmap(vmcs01.msr_bitmap, l1))
    if r(F.VM_ENTRY_CONTROLS) & VmEntryControls.LOAD_CET_STATE:
        cet = (r(F.GUEST_S_CET), r(F.GUEST_SSP), r(F.GUEST_INTR_SSP_TABLE))
    else:
        pre = vcpu.nested.pre_vmenter
        cet = (pre.s_cet, pre.ssp, pre.ssp_tbl)
    for field, value in zip((F.GUEST_S_CET, F.GUEST_SSP, F.GUEST_INTR_SSP_TABLE), cet):
        vmcs02.write(field, value)
    return vmcs02


# ============================================================================ entry
def enter_guest_mode(vcpu: NestedVcpu, vmcs02: Vmcs) -> None:
    """vmx_switch_vmcs(vmcs02) + enter_guest_mode(): KVM's loaded VMCS (``state.vmcs``, which
    its MSR and exit code use) and the CPU's current VMCS become vmcs02; vmcs01 waits."""
    nested = vcpu.nested
    nested.vmcs01 = vcpu.state.vmcs
    nested.vmcs02 = vmcs02
    vcpu.state.vmcs = vmcs02
    vcpu.cpu.vmptrld(vmcs02)
    nested.guest_mode = True


def leave_guest_mode(vcpu: NestedVcpu) -> None:
    """leave_guest_mode() + vmx_switch_vmcs(vmcs01)."""
    nested = vcpu.nested
    if nested.vmcs01 is not None:
        vcpu.state.vmcs = nested.vmcs01
    vcpu.cpu.vmptrld(vcpu.state.vmcs)
    nested.guest_mode = False
    nested.vmcs02 = None
    nested.vmcs01 = None


def nested_vmx_run(vcpu: NestedVcpu, exit_: VmExit, launch: bool) -> bool:
    """nested_vmx_run(): VMLAUNCH (``launch``) or VMRESUME (module docstring). True when L2
    was entered in the HLT activity state with nothing to wake it (:func:`l2_enters_halted`):
    the vCPU halts at once (kvm_emulate_halt_noskip; without an in-kernel irqchip that is
    KVM_EXIT_HLT for userspace, RIP at L2's next instruction)."""
    if not nested_vmx_check_permission(vcpu):
        return False
    nested, cpu = vcpu.nested, vcpu.cpu
    if nested.cached_vmcs12 is None:
        nested_vmx_fail_invalid(cpu, exit_)
        return False
    vmcs12 = nested.vmcs12
    if launch and vmcs12.launch_state:
        nested_vmx_fail(vcpu, exit_, VmxInsnError.VMLAUNCH_NONCLEAR_VMCS)
        return False
    if not launch and not vmcs12.launch_state:
        nested_vmx_fail(vcpu, exit_, VmxInsnError.VMRESUME_NONLAUNCHED_VMCS)
        return False
    if not nested_vmx_check_controls(vcpu, vmcs12):
        nested_vmx_fail(vcpu, exit_, VmxInsnError.ENTRY_INVALID_CONTROL_FIELD)
        return False
    if not nested_vmx_check_host_state(vcpu, vmcs12):
        nested_vmx_fail(vcpu, exit_, VmxInsnError.ENTRY_INVALID_HOST_STATE_FIELD)
        return False
    cpu.retire_emulated()
    vmcs01 = vcpu.state.vmcs
    # L1's CET state at VMLAUNCH (the CPU saved it into vmcs01 at this exit): pre_vmenter_*
    nested.pre_vmenter.s_cet = vmcs01.read(F.GUEST_S_CET)
    nested.pre_vmenter.ssp = vmcs01.read(F.GUEST_SSP)
    nested.pre_vmenter.ssp_tbl = vmcs01.read(F.GUEST_INTR_SSP_TABLE)
    failure = nested_vmx_check_guest_state(vcpu, vmcs12)
    if failure is not None:  # nested_vmx_entry_failure → load L1's host state
        cpu.set_reg("rip", exit_.rip + exit_.instruction_length)
        _fill_exit_info(vmcs12, VmxExitReason.ENTRY_FAIL_GUEST_STATE | VMX_EXIT_REASONS_FAILED_VMENTRY, failure)
        load_vmcs12_host_state(vcpu, vmcs12)
        return False
    enter_guest_mode(vcpu, prepare_vmcs02(vcpu, vmcs12))
    load_vmcs12_guest_state(vcpu, vmcs12)
    failed_msr = nested_vmx_load_msr(vcpu, vmcs12, ENTRY_LOAD)
    if failed_msr:  # vmentry_fail_vmexit_guest_mode: L2's state is dropped, L1 resumes at HOST_RIP
        leave_guest_mode(vcpu)
        _fill_exit_info(vmcs12, VmxExitReason.MSR_LOAD_FAIL | VMX_EXIT_REASONS_FAILED_VMENTRY, failed_msr)
        load_vmcs12_host_state(vcpu, vmcs12)
        return False
    vmcs12.launch_state = 1
    _inject_entry_event(cpu, vmcs12)
    return l2_enters_halted(vmcs12)


def l2_enters_halted(vmcs12: Vmcs12) -> bool:
    """nested_vmx_run(): an entry into the HLT activity state halts L2 unless the entry injects
    an event (which wakes it: the CPU delivers it and L2 is active) [SDM Vol. 3 §28.7]; the
    NMI- and interrupt-window exits that would also wake it are not offered to L1."""
    return (vmcs12.read(F.GUEST_ACTIVITY_STATE) == GuestActivityState.HLT
            and not vmcs12.read(F.VM_ENTRY_INTR_INFO) & INTR_INFO_VALID)


def _inject_entry_event(cpu, vmcs12: Vmcs12) -> None:
    """VM-entry event injection [SDM Vol. 3 §28.6]: the event is delivered through L2's IDT
    first thing in L2 (cetvm's CPU delivers it at the next run) — an external interrupt too,
    whatever L2's RFLAGS.IF (injection is not subject to interrupt blocking). An NMI goes into
    vmcs02's VM_ENTRY_INTR_INFO (prepare_vmcs02_early), whose entry delivers it and blocks NMIs
    in L2 until its IRET."""
    info = vmcs12.read(F.VM_ENTRY_INTR_INFO)
    if not info & INTR_INFO_VALID:
        return
    if (info >> INTR_INFO_TYPE_SHIFT) & 7 == INTR_TYPE_NMI:
        cpu.vmcs.write(F.VM_ENTRY_INTR_INFO, info)
        return
    vector = info & 0xFF
    error_code = vmcs12.read(F.VM_ENTRY_EXCEPTION_ERROR_CODE) if info & INTR_INFO_DELIVER_CODE else None
    cpu.inject_exception(vector, error_code)


# ============================================================================ exit
def _fill_exit_info(vmcs12: Vmcs12, reason: int, qualification: int, intr_info: int = 0, error_code: int = 0,
                    length: int = 0, insn_info: int = 0) -> None:
    """prepare_vmcs12's exit-information fields; the entry event's valid bit is cleared."""
    w = vmcs12.write
    w(F.VM_EXIT_REASON, reason)
    w(F.EXIT_QUALIFICATION, qualification)
    w(F.VM_EXIT_INTR_INFO, intr_info)
    w(F.VM_EXIT_INTR_ERROR_CODE, error_code)
    w(F.VM_EXIT_INSTRUCTION_LEN, length)
    w(F.VMX_INSTRUCTION_INFO, insn_info)
    w(F.IDT_VECTORING_INFO, 0)
    w(F.VM_ENTRY_INTR_INFO, vmcs12.read(F.VM_ENTRY_INTR_INFO) & ~INTR_INFO_VALID)


def nested_vmx_vmexit(vcpu: NestedVcpu, reason: int, qualification: int = 0, intr_info: int = 0,
                      error_code: int = 0, length: int = 0, insn_info: int = 0) -> None:
    """nested_vmx_vmexit(): L2 → L1 (module docstring). The exiting instruction does not retire."""
    nested, cpu = vcpu.nested, vcpu.cpu
    vmcs12 = nested.vmcs12
    cpu.cancel_pending_exit()
    sync_vmcs02_to_vmcs12(vcpu, vmcs12)
    _fill_exit_info(vmcs12, reason, qualification, intr_info, error_code, length, insn_info)
    if not nested_vmx_store_msr(vcpu, vmcs12):  # prepare_vmcs12: L2's MSRs, still in guest mode
        nested_vmx_abort(vcpu, VmxAbort.SAVE_GUEST_MSR_FAIL)
    leave_guest_mode(vcpu)
    load_vmcs12_host_state(vcpu, vmcs12)


def reflect_cpu_exit(vcpu: NestedVcpu, exit_: VmExit) -> None:
    """Reflect a CPU exit of L2 with the exit information the CPU recorded in vmcs02."""
    vmcs02 = vcpu.nested.vmcs02
    exception = exit_.exception
    reason = vmcs02.read(F.VM_EXIT_REASON)
    intr_info = vmcs02.read(F.VM_EXIT_INTR_INFO) if exception is not None else 0
    error_code = exception.error_code or 0 if exception is not None else 0
    qualification = exception.cr2 if exception is not None and exception.cr2 is not None else exit_.qualification
    nested_vmx_vmexit(vcpu, reason, qualification, intr_info, error_code, exit_.instruction_length,
                      exit_.instruction_info)


# ============================================================================ L1 wants it?
def _exit_handled_io(vcpu: NestedVcpu, vmcs12: Vmcs12, port: int, size: int) -> bool:
    """nested_vmx_exit_handled_io(): unconditional I/O exiting, or any bit of the accessed ports
    in I/O bitmap A (ports 0-0x7FFF) / B (0x8000-0xFFFF) [SDM Vol. 3 §26.1.3]."""
    proc = vmcs12.read(F.CPU_BASED_VM_EXEC_CONTROL)
    if not proc & CpuBasedControls.USE_IO_BITMAPS:
        return bool(proc & CpuBasedControls.UNCONDITIONAL_IO_EXITING)
    cpu = vcpu.cpu
    for p in range(port, port + size):
        if p > 0xFFFF:
            return True
        bitmap = vmcs12.read(F.IO_BITMAP_A if p < 0x8000 else F.IO_BITMAP_B)
        byte = bitmap + (p & 0x7FFF) // 8
        if not cpu.is_ram(byte, 1) or cpu.read_phys(byte, 1)[0] >> (p % 8) & 1:
            return True
    return False


def _exit_handled_msr(vcpu: NestedVcpu, vmcs12: Vmcs12, index: int, write: bool) -> bool:
    """nested_vmx_exit_handled_msr(): without MSR bitmaps every access exits to L1."""
    if not vmcs12.read(F.CPU_BASED_VM_EXEC_CONTROL) & CpuBasedControls.USE_MSR_BITMAPS:
        return True
    gpa = vmcs12.read(F.MSR_BITMAP)
    if not vcpu.cpu.is_ram(gpa, 0x1000):
        return True
    return msr_bitmap_bit(vcpu.cpu.read_phys(gpa, 0x1000), index, write)


def _exit_handled_cr(vcpu: NestedVcpu, vmcs12: Vmcs12, qualification: int) -> bool:
    """nested_vmx_exit_handled_cr(): a MOV to CR0/CR4 that changes a bit L1 owns (its mask)
    away from L1's read shadow."""
    cr = qualification & 0xF
    if cr not in (0, 4):
        return True
    mask = vmcs12.read(F.CR0_GUEST_HOST_MASK if cr == 0 else F.CR4_GUEST_HOST_MASK)
    shadow = vmcs12.read(F.CR0_READ_SHADOW if cr == 0 else F.CR4_READ_SHADOW)
    value = vcpu.cpu.reg(GPR_NAMES[(qualification >> 8) & 0xF])
    return bool(mask & (value ^ shadow))


def _exit_handled_exception(vmcs12: Vmcs12, vector: int, error_code: int | None) -> bool:
    """nested_vmx_l1_wants_exit(EXCEPTION_NMI): the exception bitmap; a #PF exits when bit 14
    equals "error code & PFEC_MASK == PFEC_MATCH" [SDM Vol. 3 §26.2]."""
    bitmap = vmcs12.read(F.EXCEPTION_BITMAP)
    if vector == Vector.PF:
        match = (error_code or 0) & vmcs12.read(F.PAGE_FAULT_ERROR_CODE_MASK) == vmcs12.read(F.PAGE_FAULT_ERROR_CODE_MATCH)
        return bool(bitmap >> Vector.PF & 1) == match
    return bool(bitmap >> vector & 1)


#: CPU exits L1 always gets (nested_vmx_l1_wants_exit returns true).
ALWAYS_REFLECTED = frozenset({ExitReason.CPUID, ExitReason.INVD, ExitReason.VMCALL, ExitReason.XSETBV,
                              ExitReason.VMX_INSTRUCTION, ExitReason.TRIPLE_FAULT})


#: vmcs12 controls with which L1, not KVM, handles L2's CR8.
_L1_CR8_CONTROLS = int(CpuBasedControls.USE_TPR_SHADOW | CpuBasedControls.CR8_LOAD_EXITING
                       | CpuBasedControls.CR8_STORE_EXITING)


def nested_vmx_l1_wants_exit(vcpu: NestedVcpu, exit_: VmExit) -> bool:
    vmcs12 = vcpu.nested.vmcs12
    reason = exit_.reason
    if reason in ALWAYS_REFLECTED:
        return True
    if reason is ExitReason.EXCEPTION and exit_.exception is not None:
        return _exit_handled_exception(vmcs12, exit_.exception.vector, exit_.exception.error_code)
    if reason is ExitReason.HLT:
        return bool(vmcs12.read(F.CPU_BASED_VM_EXEC_CONTROL) & CpuBasedControls.HLT_EXITING)
    if reason is ExitReason.IO and exit_.io is not None:
        return _exit_handled_io(vcpu, vmcs12, exit_.io.port, exit_.io.size)
    if reason in (ExitReason.RDMSR, ExitReason.WRMSR) and exit_.msr is not None:
        return _exit_handled_msr(vcpu, vmcs12, exit_.msr.index, reason is ExitReason.WRMSR)
    if reason is ExitReason.CR_ACCESS:
        return _exit_handled_cr(vcpu, vmcs12, exit_.qualification)
    return False


def nested_vmx_reflect_vmexit(vcpu: NestedVcpu, exit_: VmExit) -> bool:
    """nested_vmx_reflect_vmexit(): True when the exit went to L1 (L0 handles it otherwise)."""
    if not nested_vmx_l1_wants_exit(vcpu, exit_):
        return False
    if exit_.reason is ExitReason.TRIPLE_FAULT:
        nested_vmx_vmexit(vcpu, VmxExitReason.TRIPLE_FAULT)
        return True
    reflect_cpu_exit(vcpu, exit_)
    return True


def nested_l2_owns_cr8(vcpu: NestedVcpu) -> bool:
    """L2 runs and L1 virtualizes CR8 for it (vmcs12 has the TPR shadow or CR8-load/store
    exiting); otherwise L2's MOV to CR8 writes the vCPU's TPR, as L1's does (KVM handles it)."""
    nested = vcpu.nested
    return nested.guest_mode and bool(nested.vmcs12.read(F.CPU_BASED_VM_EXEC_CONTROL) & _L1_CR8_CONTROLS)


def nested_exit_on_intr(vcpu: NestedVcpu) -> bool:
    """nested_exit_on_intr(): L2 runs and L1 set external-interrupt exiting."""
    nested = vcpu.nested
    return nested.guest_mode and bool(nested.vmcs12.read(F.PIN_BASED_VM_EXEC_CONTROL)
                                      & PinBasedControls.EXTERNAL_INTERRUPT_EXITING)


def nested_interrupt_exit_due(vcpu: NestedVcpu) -> bool:
    """An external interrupt is pending while L2 runs with external-interrupt exiting: VM exit
    to L1 with reason 1, as vmx_check_nested_events does. With "acknowledge interrupt on exit"
    in vmcs12 the interrupt is acknowledged and its vector is in VM_EXIT_INTR_INFO (valid,
    type external interrupt); without it the interrupt stays pending, for L1 [SDM Vol. 3 §29.2.2]."""
    cpu, nested = vcpu.cpu, vcpu.nested
    vector = cpu.pending_interrupt if cpu.pending_interrupt is not None else nested.irq_for_l1
    if vector is None or not nested_exit_on_intr(vcpu):
        return False
    cpu.cancel_interrupt()
    if nested.vmcs12.read(F.VM_EXIT_CONTROLS) & VmExitControls.ACK_INTR_ON_EXIT:
        nested.irq_for_l1 = None
        intr_info = INTR_INFO_VALID | INTR_TYPE_EXT_INTR << INTR_INFO_TYPE_SHIFT | vector
        nested_vmx_vmexit(vcpu, VmxExitReason.EXTERNAL_INTERRUPT, intr_info=intr_info)
        return True
    nested.irq_for_l1 = vector
    nested_vmx_vmexit(vcpu, VmxExitReason.EXTERNAL_INTERRUPT)
    return True


def nested_irq_for_l1_waits(vcpu: NestedVcpu) -> bool:
    """The interrupt an external-interrupt exit left pending goes to L1 as soon as L1 can take it
    (IF = 1, no STI/MOV SS shadow: KVM's interrupt window); True while L1 cannot yet — the run
    loop then steps L1 one instruction at a time, so an ``sti; nop; cli`` window is not missed."""
    nested, cpu = vcpu.nested, vcpu.cpu
    if nested.irq_for_l1 is None or nested.guest_mode:
        return False
    if cpu.pending_interrupt is None and cpu.interrupt_window_open:
        cpu.inject_interrupt(nested.irq_for_l1)
        nested.irq_for_l1 = None
        return False
    return True


# ============================================================================ dispatch
def handle_vmx_instruction(vcpu: NestedVcpu, exit_: VmExit) -> bool:
    """The VMX instruction exits of L1 (kvm_vmx_exit_handlers): #UD without VMX in the guest
    CPUID (nested_vmx_allowed), otherwise KVM's handler. True when the vCPU halts (an entry
    into a halted L2, :func:`nested_vmx_run`)."""
    if not nested_vmx_allowed(vcpu.state):
        vcpu.cpu.inject_exception(Vector.UD)
        return False
    reason = exit_.vmx_reason
    if reason in (VmxExitReason.VMLAUNCH, VmxExitReason.VMRESUME):
        return nested_vmx_run(vcpu, exit_, launch=reason == VmxExitReason.VMLAUNCH)
    handlers = {
        VmxExitReason.VMON: handle_vmxon, VmxExitReason.VMOFF: handle_vmxoff,
        VmxExitReason.VMCLEAR: handle_vmclear, VmxExitReason.VMPTRLD: handle_vmptrld,
        VmxExitReason.VMPTRST: handle_vmptrst, VmxExitReason.VMREAD: handle_vmread,
        VmxExitReason.VMWRITE: handle_vmwrite, VmxExitReason.INVEPT: handle_invept_invvpid,
        VmxExitReason.INVVPID: handle_invept_invvpid,
    }
    handlers[reason](vcpu, exit_)
    return False

