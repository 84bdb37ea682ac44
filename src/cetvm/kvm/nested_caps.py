"""The IA32_VMX_* capability MSRs KVM reports to L1 (nested_vmx_setup_ctls_msrs and
nested_vmx_entry_exit_ctls_update / nested_vmx_cr_fixed1_bits_update after KVM_SET_CPUID2)
[K nested.c; SDM Vol. 3 App. A].

What KVM 6.18 reports and what cetvm reports: KVM offers L1 every control it can nest on the
host; cetvm's KVM reports the subset its nested VMX implements (:mod:`cetvm.kvm.nested`), so a
guest hypervisor never sets a control that would be silently ignored:

- IA32_VMX_BASIC: revision VMCS12_REVISION (0x11e57ed0), a 4 KiB VMCS, write-back, INS/OUTS
  information, the TRUE_ control MSRs, and bit 56 (no error-code consistency check on injected
  hardware exceptions) when the host has it (nested_vmx_setup_basic with
  cpu_has_vmx_basic_no_hw_errcode_cc, the "Refine error code injection to nested VM" patch).
- pin-based: external-interrupt and NMI exiting, virtual NMIs (no preemption timer, no posted
  interrupts).
- primary processor-based: HLT exiting, unconditional I/O exiting, I/O bitmaps, MSR bitmaps,
  the secondary controls; CR3-load/store exiting are allowed (default1 without the TRUE_ MSR):
  a MOV to CR3 in L2 exits to L1 with CR3-load exiting; CR3-store exiting is not intercepted
  (decision: cetvm's CPU runs MOV from CR3 inside the engine, without an exit point).
- secondary: RDTSCP, INVPCID, XSAVES enable; vmcs02 takes them from vmcs12 only, so with
  XSAVES enable clear L2's XSAVES/XRSTORS are #UD (cetvm's CPU acts on the XSAVES control only;
  with RDTSCP/INVPCID enable clear L2 is not given #UD for those instructions). No EPT, no VPID, no unrestricted guest: IA32_VMX_EPT_VPID_CAP reads 0.
- VM-exit: save debug controls (DR7 and IA32_DEBUGCTL into vmcs12; an exit always loads
  DR7 = 0x400 and DEBUGCTL = 0), host address-space size, acknowledge interrupt on exit, save/load PAT, save/load
  EFER, and load CET state.
- VM-entry: load debug controls (DR7, and IA32_DEBUGCTL's supported bits), IA-32e mode guest, load PAT, load EFER, load CET state.
- The load-CET-state controls exactly when KVM's VMX has them and the guest CPUID shows SHSTK or
  IBT (nested_vmx_entry_exit_ctls_update, "KVM:nVMX: Enable CET support for nested VM").
- IA32_VMX_MISC: EFER.LMA saved into the IA-32e-mode control (bit 5), VMWRITE to any field (bit
  29), preemption-timer rate 5 (KVM emulates it), the HLT activity state (bit 6: L2 entered
  halted, nested_vmx_run → kvm_emulate_halt_noskip); no wait-for-SIPI activity state
  (decision: KVM offers it, but cetvm's nested VMX does not model INIT/SIPI exits of L2, so a
  wait-for-SIPI L2 could never be woken), no CR3-target values.
- CR0_FIXED0 = PE | NE | PG, CR0_FIXED1 = all ones (low 32 bits); CR4_FIXED0 = VMXE,
  CR4_FIXED1 = the CR4 bits the guest CPUID allows (nested_vmx_cr_fixed1_bits_update).
- IA32_VMX_VMCS_ENUM: the highest field index of the vmcs12 fields that exist
  (nested_vmx_calc_vmcs_enum_msr).
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch.msr import VMX_BASIC_NO_HW_ERRCODE_CHECK, Msr
from cetvm.arch.regs import Cr0, Cr4
from cetvm.arch.vmx import (
    PIN_BASED_DEFAULT1, PROC_BASED_DEFAULT1, VM_ENTRY_DEFAULT1, VM_EXIT_DEFAULT1, VMX_BASIC_INOUT,
    VMX_BASIC_MEM_TYPE_SHIFT, VMX_BASIC_MEM_TYPE_WB, VMX_BASIC_TRUE_CTLS, VMX_BASIC_VMCS_SIZE_SHIFT,
    VMX_MISC_ACTIVITY_HLT, VMX_MISC_SAVE_EFER_LMA, VMX_MISC_VMWRITE_ANY_FIELD, PinBasedControls, CpuBasedControls, SecondaryControls,
    VmEntryControls, VmExitControls, vmcs_field_index,
)
from cetvm.kvm.caps import KvmCaps
from cetvm.kvm.cpuid_runtime import VcpuCpuid
from cetvm.kvm.cr import cr4_reserved_bits

#: KVM's vmcs12 revision identifier and size (VMCS12_REVISION, VMCS12_SIZE) [K vmcs12.h].
VMCS12_REVISION = 0x11E5_7ED0
VMCS12_SIZE = 0x1000
#: Preemption-timer rate KVM reports (VMX_MISC_EMULATED_PREEMPTION_TIMER_RATE).
EMULATED_PREEMPTION_TIMER_RATE = 5

PIN_ALLOWED1 = PIN_BASED_DEFAULT1 | int(PinBasedControls.EXTERNAL_INTERRUPT_EXITING | PinBasedControls.NMI_EXITING
                                        | PinBasedControls.VIRTUAL_NMIS)
PROC_ALLOWED1 = PROC_BASED_DEFAULT1 | int(CpuBasedControls.HLT_EXITING | CpuBasedControls.UNCONDITIONAL_IO_EXITING
                                          | CpuBasedControls.USE_IO_BITMAPS | CpuBasedControls.USE_MSR_BITMAPS
                                          | CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS)
PROC2_ALLOWED1 = int(SecondaryControls.ENABLE_RDTSCP | SecondaryControls.ENABLE_INVPCID
                     | SecondaryControls.ENABLE_XSAVES)
EXIT_ALLOWED1 = VM_EXIT_DEFAULT1 | int(VmExitControls.SAVE_DEBUG_CONTROLS | VmExitControls.HOST_ADDR_SPACE_SIZE
                                       | VmExitControls.ACK_INTR_ON_EXIT
                                       | VmExitControls.SAVE_IA32_PAT | VmExitControls.LOAD_IA32_PAT
                                       | VmExitControls.SAVE_IA32_EFER | VmExitControls.LOAD_IA32_EFER)
ENTRY_ALLOWED1 = VM_ENTRY_DEFAULT1 | int(VmEntryControls.LOAD_DEBUG_CONTROLS | VmEntryControls.IA32E_MODE_GUEST
                                         | VmEntryControls.LOAD_IA32_PAT | VmEntryControls.LOAD_IA32_EFER)
#: The TRUE_ MSRs let L1 clear these default1 bits [SDM Vol. 3 App. A.3.2, A.4, A.5].
PROC_TRUE_CLEARABLE = int(CpuBasedControls.CR3_LOAD_EXITING | CpuBasedControls.CR3_STORE_EXITING)
EXIT_TRUE_CLEARABLE = int(VmExitControls.SAVE_DEBUG_CONTROLS)
ENTRY_TRUE_CLEARABLE = int(VmEntryControls.LOAD_DEBUG_CONTROLS)
CR0_FIXED0 = int(Cr0.PE | Cr0.NE | Cr0.PG)
CR0_FIXED1 = 0xFFFF_FFFF
CR4_FIXED0 = int(Cr4.VMXE)


def _ctls(allowed0: int, allowed1: int) -> int:
    """A control MSR: allowed 0-settings (bits that must be 1) low, allowed 1-settings high."""
    return allowed0 | allowed1 << 32


@dataclass(frozen=True)
class NestedVmxMsrs:
    """struct nested_vmx_msrs for one vCPU: the allowed settings L1 may program."""

    basic: int
    pin: tuple[int, int]
    proc: tuple[int, int]
    proc_true0: int
    proc2: int
    exit_: tuple[int, int]
    exit_true0: int
    entry: tuple[int, int]
    entry_true0: int
    misc: int
    cr4_fixed1: int
    vmcs_enum: int

    def value(self, index: int) -> int:
        """vmx_get_vmx_msr(): the MSR's value (0 for the EPT/VPID and VM-function MSRs)."""
        return {
            Msr.IA32_VMX_BASIC: self.basic,
            Msr.IA32_VMX_PINBASED_CTLS: _ctls(*self.pin), Msr.IA32_VMX_TRUE_PINBASED_CTLS: _ctls(*self.pin),
            Msr.IA32_VMX_PROCBASED_CTLS: _ctls(*self.proc),
            Msr.IA32_VMX_TRUE_PROCBASED_CTLS: _ctls(self.proc_true0, self.proc[1]),
            Msr.IA32_VMX_PROCBASED_CTLS2: _ctls(0, self.proc2),
            Msr.IA32_VMX_EXIT_CTLS: _ctls(*self.exit_),
            Msr.IA32_VMX_TRUE_EXIT_CTLS: _ctls(self.exit_true0, self.exit_[1]),
            Msr.IA32_VMX_ENTRY_CTLS: _ctls(*self.entry),
            Msr.IA32_VMX_TRUE_ENTRY_CTLS: _ctls(self.entry_true0, self.entry[1]),
            Msr.IA32_VMX_MISC: self.misc,
            Msr.IA32_VMX_CR0_FIXED0: CR0_FIXED0, Msr.IA32_VMX_CR0_FIXED1: CR0_FIXED1,
            Msr.IA32_VMX_CR4_FIXED0: CR4_FIXED0, Msr.IA32_VMX_CR4_FIXED1: self.cr4_fixed1,
            Msr.IA32_VMX_VMCS_ENUM: self.vmcs_enum,
        }.get(index, 0)

    @property
    def true_pin(self) -> tuple[int, int]:
        return self.pin

    @property
    def true_proc(self) -> tuple[int, int]:
        return self.proc_true0, self.proc[1]

    @property
    def true_exit(self) -> tuple[int, int]:
        return self.exit_true0, self.exit_[1]

    @property
    def true_entry(self) -> tuple[int, int]:
        return self.entry_true0, self.entry[1]

    @property
    def no_hw_errcode_cc(self) -> bool:
        """nested_cpu_has_no_hw_errcode_cc(): IA32_VMX_BASIC[56] as L1 sees it."""
        return bool(self.basic & VMX_BASIC_NO_HW_ERRCODE_CHECK)


def vmcs12_cet_fields_exist(caps: KvmCaps) -> bool:
    """cpu_has_vmcs12_field() for GUEST/HOST_S_CET, _SSP, _INTR_SSP_TABLE: they exist in vmcs12
    (VMREAD/VMWRITE succeed) when the host's VMX has the load-CET-state controls
    (cpu_has_load_cet_ctrl, nested_vmx_setup_vmcs12_fields at module load) — a host property,
    not the guest CPUID's."""
    return caps.host.vmx_load_cet_controls


def nested_cet_controls(caps: KvmCaps, cpuid: VcpuCpuid) -> bool:
    """nested_vmx_entry_exit_ctls_update(): the load-CET-state entry/exit controls are offered
    when KVM's VMX uses them (vmx_cet_controls: KVM offers SHSTK or IBT) and the guest has SHSTK
    or IBT."""
    kvm_cet = caps.has("shstk") or caps.has("ibt")
    guest_cet = cpuid.guest_cpu_cap_has("shstk") or cpuid.guest_cpu_cap_has("ibt")
    return kvm_cet and guest_cet


def nested_vmx_setup_ctls_msrs(caps: KvmCaps, cpuid: VcpuCpuid, max_field_index: int) -> NestedVmxMsrs:
    """The VMX capability MSRs of a vCPU with this CPUID (module docstring)."""
    basic = (VMCS12_REVISION | VMCS12_SIZE << VMX_BASIC_VMCS_SIZE_SHIFT
             | VMX_BASIC_MEM_TYPE_WB << VMX_BASIC_MEM_TYPE_SHIFT | VMX_BASIC_INOUT | VMX_BASIC_TRUE_CTLS)
    if caps.host.vmx_basic_56:
        basic |= VMX_BASIC_NO_HW_ERRCODE_CHECK
    exit_allowed1, entry_allowed1 = EXIT_ALLOWED1, ENTRY_ALLOWED1
    if nested_cet_controls(caps, cpuid):
        exit_allowed1 |= int(VmExitControls.LOAD_CET_STATE)
        entry_allowed1 |= int(VmEntryControls.LOAD_CET_STATE)
    return NestedVmxMsrs(
        basic=basic,
        pin=(PIN_BASED_DEFAULT1, PIN_ALLOWED1),
        proc=(PROC_BASED_DEFAULT1, PROC_ALLOWED1), proc_true0=PROC_BASED_DEFAULT1 & ~PROC_TRUE_CLEARABLE,
        proc2=PROC2_ALLOWED1,
        exit_=(VM_EXIT_DEFAULT1, exit_allowed1), exit_true0=VM_EXIT_DEFAULT1 & ~EXIT_TRUE_CLEARABLE,
        entry=(VM_ENTRY_DEFAULT1, entry_allowed1), entry_true0=VM_ENTRY_DEFAULT1 & ~ENTRY_TRUE_CLEARABLE,
        misc=(VMX_MISC_SAVE_EFER_LMA | VMX_MISC_ACTIVITY_HLT | VMX_MISC_VMWRITE_ANY_FIELD
              | EMULATED_PREEMPTION_TIMER_RATE),
        cr4_fixed1=~cr4_reserved_bits(cpuid) & 0xFFFF_FFFF_FFFF_FFFF,
        vmcs_enum=max_field_index << 1,
    )


def vmcs_enum_max_index(fields) -> int:
    """The highest index (encoding bits 9:1) among ``fields``."""
    return max(vmcs_field_index(f) for f in fields)


@dataclass(frozen=True)
class NestedCetOffer:
    """What the modeled KVM offers an L1 hypervisor for nested CET, and why (``cetvm caps``)."""

    enabled: bool
    reason: str
    vmx_basic_56: bool
    load_cet_controls: bool
    load_cet_reason: str
    vmcs12_cet_fields: bool

    def to_json(self) -> dict[str, object]:
        return {"enabled": self.enabled, "reason": self.reason, "vmx_basic_56": self.vmx_basic_56,
                "load_cet_controls": {"offered": self.load_cet_controls, "reason": self.load_cet_reason},
                "vmcs12_cet_fields": self.vmcs12_cet_fields}


def nested_cet_offer(caps: KvmCaps) -> NestedCetOffer:
    """Nested VMX on this host (kvm_intel nested=1 on a VMX CPU) and its CET part: IA32_VMX_BASIC[56]
    as the host has it (nested_vmx_setup_basic), the load-CET-state controls for a guest with
    SHSTK or IBT when KVM itself offers one of them (nested_vmx_entry_exit_ctls_update), the
    vmcs12 CET fields when the host VMX has the controls (cpu_has_vmcs12_field)."""
    host = caps.host
    if host.virt != "vmx":
        reason = "kvm_amd: cetvm models no nested SVM"
    elif not host.cpu.has("vmx"):
        reason = "the host CPU lacks VMX (CPUID.1:ECX[5])"
    elif not host.nested:
        reason = "kvm_intel loaded with nested=0"
    else:
        reason = "kvm_intel nested=1: VMX in KVM_GET_SUPPORTED_CPUID, IA32_VMX_* MSRs for L1"
    enabled = host.nested_vmx
    kvm_cet = caps.has("shstk") or caps.has("ibt")
    if not enabled:
        cet_reason = "no nested VMX"
    elif not kvm_cet:
        cet_reason = "KVM offers neither SHSTK nor IBT on this host (see the features above)"
    else:
        cet_reason = "offered to a guest whose CPUID has SHSTK or IBT (nested_vmx_entry_exit_ctls_update)"
    return NestedCetOffer(enabled, reason, enabled and host.vmx_basic_56, enabled and kvm_cet, cet_reason,
                          enabled and vmcs12_cet_fields_exist(caps))
