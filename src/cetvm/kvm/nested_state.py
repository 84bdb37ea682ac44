"""KVM_GET/SET_NESTED_STATE for VMX [K nested.c vmx_get_nested_state / vmx_set_nested_state;
Documentation/virt/kvm/api.rst "KVM_GET_NESTED_STATE"].

The state: the VMXON pointer, the current-VMCS pointer, the cached vmcs12 (KVM copies it into
the blob because it may be newer than L1's memory), whether L2 runs (KVM_STATE_NESTED_GUEST_MODE)
and, in guest mode, L1's CET state at VM entry (cetvm extension of the blob: KVM keeps
pre_vmenter_* in vmx->nested and the vmcs01 fields; a snapshot must carry them so L1 resumes
with its own S_CET/SSP when L1 does not use VM_EXIT_LOAD_CET_STATE).

Restore order (as QEMU's kvm_arch_put_registers): KVM_SET_CPUID2, then KVM_SET_NESTED_STATE,
then registers and MSRs — in guest mode those describe L2 and go to vmcs02 and the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch.vmx import VmcsField as F
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.ioctl_args import check_bytes, check_flag, check_instance, check_u8, check_u64
from cetvm.kvm.nested import INVALID_GPA, NestedVcpu, NestedVmx, PreVmenterCet, nested_vmx_allowed, page_address_valid
from cetvm.kvm.nested_caps import VMCS12_REVISION
from cetvm.kvm.nested_entry import enter_guest_mode, prepare_vmcs02
from cetvm.kvm.vmcs12 import REVISION_MASK, VMCS12_REGION_BYTES, Vmcs12


@dataclass(frozen=True)
class NestedState:
    """struct kvm_nested_state (VMX format) as cetvm keeps it."""

    vmxon_pa: int
    vmcs12_pa: int
    vmcs12: bytes = b""
    guest_mode: bool = False
    pre_vmenter_s_cet: int = 0
    pre_vmenter_ssp: int = 0
    pre_vmenter_ssp_tbl: int = 0
    #: an external interrupt an exit to L1 left pending (no acknowledge-on-exit)
    irq_for_l1: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"vmxon_pa": self.vmxon_pa, "vmcs12_pa": self.vmcs12_pa, "vmcs12": self.vmcs12.hex(),
                "guest_mode": self.guest_mode, "pre_vmenter_s_cet": self.pre_vmenter_s_cet,
                "pre_vmenter_ssp": self.pre_vmenter_ssp, "pre_vmenter_ssp_tbl": self.pre_vmenter_ssp_tbl,
                "irq_for_l1": self.irq_for_l1}

    @classmethod
    def from_json(cls, doc: object) -> "NestedState":
        if not isinstance(doc, dict):
            raise KvmInvalidArgument(f"KVM_SET_NESTED_STATE: expected an object, got {type(doc).__name__}")
        try:
            raw = bytes.fromhex(doc.get("vmcs12", ""))
        except (TypeError, ValueError):
            raise KvmInvalidArgument("KVM_SET_NESTED_STATE: vmcs12 is not a hex string") from None
        names = ("vmxon_pa", "vmcs12_pa", "pre_vmenter_s_cet", "pre_vmenter_ssp", "pre_vmenter_ssp_tbl")
        values = {n: check_u64(f"KVM_SET_NESTED_STATE: {n}", doc.get(n, 0)) for n in names}
        irq = doc.get("irq_for_l1")
        irq = None if irq is None else check_u8("KVM_SET_NESTED_STATE: irq_for_l1", irq)
        return cls(vmcs12=raw, guest_mode=check_flag("KVM_SET_NESTED_STATE: guest_mode", doc.get("guest_mode", False)),
                   irq_for_l1=irq, **values)


def get_nested_state(nested: NestedVmx) -> NestedState | None:
    """vmx_get_nested_state(): None outside VMX operation."""
    if not nested.vmxon:
        return None
    vmcs12 = nested.cached_vmcs12.to_bytes() if nested.cached_vmcs12 is not None else b""
    pre = nested.pre_vmenter
    return NestedState(nested.vmxon_ptr, nested.current_vmptr, vmcs12, nested.guest_mode,
                       pre.s_cet, pre.ssp, pre.ssp_tbl, nested.irq_for_l1)


def set_nested_state(vcpu: NestedVcpu, state: NestedState | None) -> None:
    """vmx_set_nested_state() on a vCPU that left VMX operation: -EINVAL for a state this
    vCPU cannot have (no VMX in its CPUID, bad pointers, a vmcs12 of another revision, guest
    mode without a vmcs12)."""
    if state is None:
        return
    state = check_instance("KVM_SET_NESTED_STATE: state", state, NestedState)
    if not nested_vmx_allowed(vcpu.state):
        raise KvmInvalidArgument("KVM_SET_NESTED_STATE: the guest CPUID has no VMX (or kvm_intel nested=0)")
    if not page_address_valid(vcpu.state, check_u64("vmxon_pa", state.vmxon_pa)):
        raise KvmInvalidArgument(f"KVM_SET_NESTED_STATE: VMXON pointer {state.vmxon_pa:#x} is not a valid page")
    has_vmcs12 = state.vmcs12_pa != INVALID_GPA
    if has_vmcs12 and (not page_address_valid(vcpu.state, state.vmcs12_pa) or state.vmcs12_pa == state.vmxon_pa):
        raise KvmInvalidArgument(f"KVM_SET_NESTED_STATE: vmcs12 pointer {state.vmcs12_pa:#x} is not valid")
    vmcs12 = None
    if has_vmcs12:
        raw = check_bytes("KVM_SET_NESTED_STATE: vmcs12", state.vmcs12, VMCS12_REGION_BYTES)
        if len(raw) != VMCS12_REGION_BYTES:
            raise KvmInvalidArgument(f"KVM_SET_NESTED_STATE: vmcs12 must be {VMCS12_REGION_BYTES} bytes, got {len(raw)}")
        vmcs12 = Vmcs12.from_bytes(raw)
        if vmcs12.revision_id & REVISION_MASK != VMCS12_REVISION:
            raise KvmInvalidArgument(f"KVM_SET_NESTED_STATE: vmcs12 revision {vmcs12.revision_id:#x} is not "
                                     f"{VMCS12_REVISION:#x}")
    if state.guest_mode and vmcs12 is None:
        raise KvmInvalidArgument("KVM_SET_NESTED_STATE: guest mode without a current vmcs12")
    nested = vcpu.nested
    nested.vmxon, nested.vmxon_ptr = True, state.vmxon_pa
    nested.current_vmptr = state.vmcs12_pa if has_vmcs12 else INVALID_GPA
    nested.cached_vmcs12 = vmcs12
    nested.pre_vmenter = PreVmenterCet(state.pre_vmenter_s_cet, state.pre_vmenter_ssp, state.pre_vmenter_ssp_tbl)
    nested.irq_for_l1 = state.irq_for_l1
    if not state.guest_mode:
        return
    vmcs01 = vcpu.state.vmcs
    for field, value in zip((F.GUEST_S_CET, F.GUEST_SSP, F.GUEST_INTR_SSP_TABLE),
                            (state.pre_vmenter_s_cet, state.pre_vmenter_ssp, state.pre_vmenter_ssp_tbl)):
        vmcs01.write(field, value)
    enter_guest_mode(vcpu, prepare_vmcs02(vcpu, vmcs12))
