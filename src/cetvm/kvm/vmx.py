"""VMX CET plumbing between KVM's state and the CPU: KVM programs the CPU's VMCS
(:mod:`cetvm.cpu.vmcs`) as vmx.c does through vmcs_write*, and nothing else of the CPU but its
documented register interface.

- :func:`vmx_cet_controls` — vmx setup sets the "load CET state" VM-entry control (bit 20) and
  VM-exit control (bit 28) when KVM offers SHSTK or IBT [K vmx.c setup_vmcs_config].
- :func:`vmx_update_intercept_for_cet_msr` — after every KVM_SET_CPUID2: PL0-3_SSP pass through
  with guest SHSTK; U_CET and S_CET pass through with guest SHSTK or IBT; INT_SSP_TAB and
  IA32_XSS are always intercepted (KVM emulates them). Everything else the CPU handles itself.
- :func:`vmx_vcpu_enter` / :func:`vmx_vcpu_exit` — the CPU's VM entry loads GUEST_S_CET,
  GUEST_SSP and GUEST_INTR_SSP_TABLE when the entry control is set (after its guest-state
  checks) and its VM exit always saves them back (kvm-unit-tests vmx_cet_test: "GUEST_S_CET
  saved even with the control off"); KVM loads XCR0 and IA32_XSS around the entry
  (kvm_load_guest_xsave_state) and, with the exit control, takes the host values (HOST_S_CET =
  the host's S_CET snapshot, HOST_SSP = HOST_INTR_SSP_TABLE = 0) into :class:`HostCpu`, the
  record of what the physical CPU runs with outside the guest (cetvm's CPU runs no host code).
- :func:`vmx_set_cr4_guest_host_mask` — the CR4 bits reserved for the guest (its CPUID lacks the
  feature; CR4.CET without guest SHSTK/IBT) are host-owned: a guest MOV to CR4 setting one
  exits (CR_ACCESS) and kvm_set_cr4() injects #GP (:func:`cetvm.kvm.vcpu_run.handle_cr`).
  Decision: only those bits; KVM with EPT owns a few more (PAE, PGE...), whose writes it would
  accept anyway — the guest cannot tell.
- :func:`vmx_vcpu_after_set_cpuid` — also tells the CPU the guest's CET features
  (guest_cpu_cap_has), which its CET instructions, CR4.CET and CET MSRs obey.
- :func:`init_vmcs_exec_controls` — the pin-based, primary and secondary execution controls
  init_vmcs() writes (:func:`vmx_pin_based_exec_ctrl`, :func:`vmx_exec_control`,
  :func:`vmx_secondary_exec_control`); the secondary ones follow the guest CPUID and are
  written again after every KVM_SET_CPUID2.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch.msr import CET_MSR_SET, PL_SSP_MSRS, Msr
from cetvm.arch.regs import CR8_TPR
from cetvm.arch.vmx import (
    CpuBasedControls, PinBasedControls, SecondaryControls, VmcsField, VmEntryControls, VmExitControls,
)
from cetvm.kvm.caps import KvmCaps
from cetvm.kvm.cr import cr4_reserved_bits
from cetvm.kvm.vcpu import VcpuArch
from cetvm.kvm.msr import XSTATE_MANAGED_MSRS

#: Every MSR KVM intercepts by default that matters to CET (the bitmap starts all-ones).
CET_INTERCEPTABLE_MSRS: frozenset[int] = CET_MSR_SET | {int(Msr.IA32_XSS)}


@dataclass
class HostCpu:
    """The physical CPU's CET state outside the guest (what VM exit restores)."""

    s_cet: int = 0
    ssp: int = 0
    intr_ssp_table: int = 0
    exits: int = 0


def vmx_cet_controls(caps: KvmCaps) -> tuple[int, int]:
    """(VM-entry controls, VM-exit controls) as vmx setup programs them for CET."""
    if caps.has("shstk") or caps.has("ibt"):
        return int(VmEntryControls.LOAD_CET_STATE), int(VmExitControls.LOAD_CET_STATE)
    return 0, 0


def init_vmcs_cet(vcpu: VcpuArch, host: HostCpu) -> None:
    """init_vmcs(): controls and the host-state CET fields."""
    entry, exit_ = vmx_cet_controls(vcpu.caps)
    vcpu.vmcs.write(VmcsField.VM_ENTRY_CONTROLS, entry)
    vcpu.vmcs.write(VmcsField.VM_EXIT_CONTROLS, exit_)
    vcpu.vmcs.write(VmcsField.HOST_S_CET, host.s_cet)
    vcpu.vmcs.write(VmcsField.HOST_SSP, 0)
    vcpu.vmcs.write(VmcsField.HOST_INTR_SSP_TABLE, 0)


def vmx_pin_based_exec_ctrl() -> PinBasedControls:
    """vmx_pin_based_exec_ctrl(): external interrupts and NMIs exit to the host (virtual NMIs
    on); the posted-interrupt and preemption-timer controls need an in-kernel APIC / a timer
    cetvm's KVM does not have."""
    return PinBasedControls.EXTERNAL_INTERRUPT_EXITING | PinBasedControls.NMI_EXITING | PinBasedControls.VIRTUAL_NMIS


def vmx_exec_control() -> CpuBasedControls:
    """vmx_exec_control() for a host with EPT and no TPR shadow in use: HLT, MWAIT/MONITOR,
    RDPMC, MOV DR and every I/O exit; TSC offsetting; MSR bitmaps; secondary controls. With EPT
    CR3 loads/stores and INVLPG do not exit; the interrupt- and NMI-window controls are set only
    while KVM waits for a window. CR8 exiting is left clear (KVM's MOV-to-CR8 handling is the
    CPU's own CR8, as with a TPR shadow)."""
    return (CpuBasedControls.HLT_EXITING | CpuBasedControls.MWAIT_EXITING | CpuBasedControls.MONITOR_EXITING
            | CpuBasedControls.RDPMC_EXITING | CpuBasedControls.MOV_DR_EXITING
            | CpuBasedControls.UNCONDITIONAL_IO_EXITING | CpuBasedControls.USE_TSC_OFFSETTING
            | CpuBasedControls.USE_MSR_BITMAPS | CpuBasedControls.ACTIVATE_SECONDARY_CONTROLS)


def vmx_secondary_exec_control(vcpu: VcpuArch) -> SecondaryControls:
    """vmx_secondary_exec_control(): EPT, VPID, unrestricted guest and RDTSCP; XSAVES/XRSTORS
    only when the guest CPUID has XSAVES (vmx_adjust_sec_exec_feature: a guest without it gets
    #UD from XSAVES, as on hardware). (KVM enables RDTSCP and INVPCID per the guest CPUID too;
    cetvm's CPU does not act on those two controls, see :mod:`cetvm.cpu.vmcs`.)"""
    controls = (SecondaryControls.ENABLE_EPT | SecondaryControls.ENABLE_VPID | SecondaryControls.UNRESTRICTED_GUEST
                | SecondaryControls.ENABLE_RDTSCP)
    if vcpu.cpuid.guest_cpu_cap_has("xsaves"):
        controls |= SecondaryControls.ENABLE_XSAVES
    return controls


def init_vmcs_exec_controls(vcpu: VcpuArch) -> None:
    """init_vmcs(): pin_controls_set, exec_controls_set, secondary_exec_controls_set."""
    vcpu.vmcs.write(VmcsField.PIN_BASED_VM_EXEC_CONTROL, vmx_pin_based_exec_ctrl())
    vcpu.vmcs.write(VmcsField.CPU_BASED_VM_EXEC_CONTROL, vmx_exec_control())
    vcpu.vmcs.write(VmcsField.SECONDARY_VM_EXEC_CONTROL, vmx_secondary_exec_control(vcpu))


def exec_controls_changebit(vcpu: VcpuArch, control: CpuBasedControls, wanted: bool) -> None:
    """exec_controls_setbit() / exec_controls_clearbit(): one primary processor-based control."""
    controls = vcpu.vmcs.read(VmcsField.CPU_BASED_VM_EXEC_CONTROL)
    vcpu.vmcs.write(VmcsField.CPU_BASED_VM_EXEC_CONTROL, controls | control if wanted else controls & ~control)


def vmx_set_irq_window(vcpu: VcpuArch, wanted: bool) -> None:
    """enable_irq_window() / handle_interrupt_window(): set or clear "interrupt-window exiting"."""
    exec_controls_changebit(vcpu, CpuBasedControls.INTERRUPT_WINDOW_EXITING, wanted)


def vmx_set_nmi_window(vcpu: VcpuArch, wanted: bool) -> None:
    """vmx_enable_nmi_window() / handle_nmi_window(): set or clear "NMI-window exiting" (KVM's
    virtual NMIs are on, so the control exists)."""
    exec_controls_changebit(vcpu, CpuBasedControls.NMI_WINDOW_EXITING, wanted)


def vmx_update_cr8_intercept(vcpu: VcpuArch, tpr: int | None) -> None:
    """The TPR threshold for a vCPU whose local APIC is userspace's: the TPR it has (kvm_run.cr8,
    which KVM_RUN loaded), so a MOV to CR8 lowering the TPR below it exits (TPR below threshold)
    and reaches userspace as KVM_EXIT_SET_TPR, as handle_cr's "cr8_prev > cr8" case does with
    CR8-load exiting — cetvm's CPU keeps CR8 as with a TPR shadow instead [SDM Vol. 3 §30.1.2].
    A lowering that stays at or above it exits not: it cannot unmask an interrupt userspace held
    back at entry (those have priority classes at most the TPR). ``tpr`` None: no threshold
    (L1 virtualizes CR8 for the L2 that runs)."""
    vcpu.vmcs.write(VmcsField.TPR_THRESHOLD, 0 if tpr is None else tpr & CR8_TPR)


def vmx_update_intercept_for_cet_msr(vcpu: VcpuArch) -> set[int]:
    """The set of CET/XSS MSRs whose guest RDMSR/WRMSR must exit to KVM."""
    intercepts = set(CET_INTERCEPTABLE_MSRS)
    caps, cpuid = vcpu.caps, vcpu.cpuid
    if caps.has("shstk") and cpuid.guest_cpu_cap_has("shstk"):
        intercepts -= {int(m) for m in PL_SSP_MSRS}
    if (caps.has("shstk") or caps.has("ibt")) and (cpuid.guest_cpu_cap_has("shstk")
                                                   or cpuid.guest_cpu_cap_has("ibt")):
        intercepts -= {int(Msr.IA32_U_CET), int(Msr.IA32_S_CET)}
    return intercepts


def vmx_set_cr4_guest_host_mask(vcpu: VcpuArch) -> None:
    """vmx_set_cr4_guest_host_mask(): the bits reserved for this guest (kvm-unit-tests' pcid,
    la57, lam, umip: a CR4 feature bit the guest CPUID lacks; CR4.CET without guest SHSTK/IBT)
    are host-owned; the read shadow holds the guest's CR4 there (always 0)."""
    mask = cr4_reserved_bits(vcpu.cpuid)
    vcpu.vmcs.write(VmcsField.CR4_GUEST_HOST_MASK, mask)
    vcpu.vmcs.write(VmcsField.CR4_READ_SHADOW, vcpu.cr4 & mask)


def vmx_vcpu_after_set_cpuid(vcpu: VcpuArch, cpu) -> None:
    """vmx_vcpu_after_set_cpuid(): the secondary execution controls that follow the CPUID, the
    CR4 guest/host mask, and the guest's CET features for the CPU (guest_cpu_cap_has: the
    guest CPUID within KVM's caps)."""
    vcpu.vmcs.write(VmcsField.SECONDARY_VM_EXEC_CONTROL, vmx_secondary_exec_control(vcpu))
    vmx_set_cr4_guest_host_mask(vcpu)
    cpu.set_guest_cet_features(shstk=vcpu.cpuid.guest_cpu_cap_has("shstk"),
                               ibt=vcpu.cpuid.guest_cpu_cap_has("ibt"))


def _exit_loads_cet(vcpu: VcpuArch) -> bool:
    return bool(vcpu.vmcs.read(VmcsField.VM_EXIT_CONTROLS) & VmExitControls.LOAD_CET_STATE)


def vmx_vcpu_enter(vcpu: VcpuArch, cpu) -> None:
    """Before VM entry: kvm_load_guest_xsave_state() — XCR0 (XSETBV) and IA32_XSS (WRMSR) the
    guest runs with. The guest CET state is in the VMCS, which the CPU's entry loads."""
    cpu.load_xcr0(vcpu.xcr0)
    cpu.set_msr(Msr.IA32_XSS, vcpu.ia32_xss)


def vmx_vcpu_exit(vcpu: VcpuArch, cpu, host: HostCpu) -> None:
    """After VM exit (the CPU saved the guest CET fields): the host's CET state with the exit
    control, and the cached CR0/CR4."""
    vcpu.cr0, vcpu.cr4 = cpu.cr0, cpu.cr4  # vmx_cache_reg (CR4.CET is guest-owned)
    host.exits += 1
    if _exit_loads_cet(vcpu):
        host.s_cet = vcpu.vmcs.read(VmcsField.HOST_S_CET)
        host.ssp = vcpu.vmcs.read(VmcsField.HOST_SSP)
        host.intr_ssp_table = vcpu.vmcs.read(VmcsField.HOST_INTR_SSP_TABLE)


def kvm_load_guest_fpu(vcpu: VcpuArch, cpu) -> None:
    """fpu_swap_kvm_fpstate(guest): the guest's CET_U / CET_S values go into the CPU's MSRs
    (plus MXCSR and XMM0-15 of the legacy region, see :func:`_swap_sse`)."""
    fpu = vcpu.fpu
    if fpu.loaded:
        return
    fpu.loaded = True
    if fpu.image_on_cpu == (bytes(fpu.area.data), cpu.fpu_writes):
        return  # nothing changed the fpstate since the last put: the CPU holds it already
    for msr, feature, offset in _MANAGED_MSRS:
        if fpu.has(feature):
            cpu.set_cet_msr(msr, fpu.peek(feature, offset))
    _swap_sse(fpu, cpu, to_cpu=True)


def kvm_put_guest_fpu(vcpu: VcpuArch, cpu) -> None:
    """fpu_swap_kvm_fpstate(host): copy the CPU's live guest values back into the fpstate.

    A component whose values are all zero is stored as init state (XSTATE_BV bit clear), as
    XSAVES does with the init optimization. The image stored is remembered: the next load
    skips the copy when nothing (KVM_SET_XSAVE, an MSR write, INIT) changed it in between
    and nothing wrote the CPU's FPU directly (``cpu.fpu_writes``) — the exits of serial
    output and port I/O then pay one comparison instead of a copy.
    """
    fpu = vcpu.fpu
    if not fpu.loaded:
        return
    by_feature: dict[int, list[tuple[int, int]]] = {}
    for msr, feature, offset in _MANAGED_MSRS:
        if fpu.has(feature):
            by_feature.setdefault(feature, []).append((offset, cpu.cet_msr(msr)))
    for feature, values in by_feature.items():
        if any(v for _, v in values):
            for offset, value in values:
                if fpu.peek(feature, offset) != value or not fpu.xstate_bv >> feature & 1:
                    fpu.poke(feature, offset, value)
        elif fpu.xstate_bv >> feature & 1:
            fpu.area.clear_component(feature)
    _swap_sse(fpu, cpu, to_cpu=False)
    fpu.image_on_cpu = (bytes(fpu.area.data), cpu.fpu_writes)
    fpu.loaded = False


#: (MSR, XSAVE component, offset in it) of the CET MSRs kept in the guest fpstate.
_MANAGED_MSRS = tuple((Msr(index), feature, offset) for index, (feature, offset) in XSTATE_MANAGED_MSRS.items())


#: Legacy-region offsets: MXCSR at 24, XMM0-15 at 160 (16 bytes each) [SDM Vol. 1 10.5.1].
_MXCSR_OFFSET = 24
_XMM_OFFSET = 160


def _sse_bytes(data) -> bytes:
    return bytes(data[_MXCSR_OFFSET:_MXCSR_OFFSET + 4]) + bytes(data[_XMM_OFFSET:_XMM_OFFSET + 256])


def _swap_sse(fpu, cpu, *, to_cpu: bool) -> None:
    """MXCSR and XMM0-15 between the legacy region and the CPU (:meth:`Vcpu.get_sse` /
    :meth:`Vcpu.set_sse`; the x87 and YMM registers are left as they are).

    Nothing but this swap touches the CPU's SSE registers between a put and the next load (the
    VMM runs no guest code), so a load whose legacy region still holds exactly what the last
    put stored skips the copy: the CPU has those values already (and no direct write to the
    CPU's FPU happened since: ``cpu.fpu_writes``). KVM_SET_XSAVE changes the region, and the
    next load copies again. This keeps the per-exit cost of
    exit-heavy guests (kvm-unit-tests' vmexit_*, serial output) low."""
    data = fpu.area.data
    if to_cpu:
        current = _sse_bytes(data)
        if (current, cpu.fpu_writes) == fpu.sse_on_cpu:
            return
        mxcsr = int.from_bytes(data[_MXCSR_OFFSET:_MXCSR_OFFSET + 4], "little") or 0x1F80
        cpu.set_sse(mxcsr, [int.from_bytes(data[off:off + 16], "little")
                            for off in range(_XMM_OFFSET, _XMM_OFFSET + 256, 16)])
        fpu.sse_on_cpu = ((current, cpu.fpu_writes)
                           if mxcsr == int.from_bytes(current[:4], "little") else None)
        return
    mxcsr, xmm = cpu.get_sse()
    data[_MXCSR_OFFSET:_MXCSR_OFFSET + 4] = mxcsr.to_bytes(4, "little")
    in_use = mxcsr != 0x1F80
    for i, value in enumerate(xmm):
        off = _XMM_OFFSET + 16 * i
        in_use = in_use or value != 0
        data[off:off + 16] = value.to_bytes(16, "little")
    if in_use:  # XSTATE_BV[1]: SSE state not in its init configuration
        fpu.area.xstate_bv = fpu.area.xstate_bv | 0x2
    fpu.sse_on_cpu = (_sse_bytes(data), cpu.fpu_writes)
