"""Complete vCPU state save/restore through the ioctl-named API only (what a VMM does for
snapshots and migration).

The saved state is a JSON-friendly dict: ``regs``, ``sregs``, ``xcrs``, ``msrs`` (every MSR of
KVM_GET_MSR_INDEX_LIST that reads), ``xsave`` (hex of the KVM_GET_XSAVE2 image),
``fpstate_xstate_bv`` (the guest fpstate's XSTATE_BV, supervisor bits included: which xstate
the guest depends on), ``guest_ssp`` (KVM_REG_GUEST_SSP, None without guest SHSTK),
``mp_state`` and ``events``. The guest's CPUID is not part of it: as with KVM, the VMM calls
set_cpuid() on the new vCPU before restoring.

Restore order (each step needs the previous ones): sregs (CR4.CET needs the CPUID), regs,
IA32_XSS *before* XCR0 and XSAVE (the restore bug real VMMs hit on CET hosts: loading xstate
with CET_U/CET_S in use before IA32_XSS allows it), XCR0, XSAVE, the other MSRs (CET MSRs write
the CET components of the fpstate), the guest SSP, MP state, pending events.

A state that lacks something the guest depends on is refused with a CetvmError naming it:
IA32_XSS missing while XSTATE_BV has CET_U/CET_S; the guest SSP missing while shadow stacks
are on (SH_STK_EN in U_CET or S_CET); any CET MSR of the index list missing while the guest
CPUID has the feature. An incomplete exit (IN or MMIO read waiting for data) must be finished
with ``run(immediate_exit=True)`` before saving, as with KVM.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from cetvm import CetvmError
from cetvm.arch.msr import CetCtl, Msr
from cetvm.arch.vmx import KVM_REG_GUEST_SSP_ID
from cetvm.arch.xfeatures import XFEATURE_MASK_CET
from cetvm.cpu.state import DescriptorTable, Regs, Segment, Sregs
from cetvm.kvm.api import KvmVcpu, MpState, QueuedException
from cetvm.kvm.caps import msr_name

CET_MSRS = frozenset(int(m) for m in (Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP,
                                      Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP, Msr.IA32_INT_SSP_TAB))
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def save_vcpu_state(vcpu: KvmVcpu) -> dict[str, Any]:
    """Read the whole vCPU state through the KVM-shaped API."""
    msrs = dict(vcpu.get_msrs(vcpu.get_msr_index_list()))
    readable = [i for i in vcpu.get_msr_index_list() if i not in msrs]
    for index in readable:  # get_msrs stops at the first failure: read the rest one by one
        got = vcpu.get_msrs([index])
        if got:
            msrs[index] = got[0][1]
    guest_ssp = vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID) if vcpu.state.cpuid.guest_cpu_cap_has("shstk") else None
    event = vcpu.get_vcpu_events()
    return {
        "regs": asdict(vcpu.get_regs()),
        "sregs": asdict(vcpu.get_sregs()),
        "xcrs": [list(x) for x in vcpu.get_xcrs()],
        "msrs": {f"{int(i):#x}": v for i, v in msrs.items()},
        "xsave": vcpu.get_xsave().hex(),
        "fpstate_xstate_bv": vcpu.state.fpu.xstate_bv,
        "guest_ssp": guest_ssp,
        "mp_state": vcpu.get_mp_state().name,
        "events": None if event is None else asdict(event),
    }


def _msr_table(state: dict[str, Any]) -> dict[int, int]:
    return {int(k, 16): int(v) for k, v in state.get("msrs", {}).items()}


def check_saved_state(vcpu: KvmVcpu, state: dict[str, Any]) -> None:
    """Refuse a state that lacks what the guest depends on (module docstring)."""
    for key in ("regs", "sregs", "xcrs", "msrs", "xsave"):
        if key not in state:
            raise CetvmError(f"saved vCPU state lacks {key!r}")
    msrs = _msr_table(state)
    cpuid = vcpu.state.cpuid
    xstate_bv = int(state.get("fpstate_xstate_bv", 0))
    cet_in_use = bool(xstate_bv & XFEATURE_MASK_CET) or any(
        msrs.get(int(m), 0) for m in (Msr.IA32_U_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP,
                                      Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP))
    if cet_in_use and int(Msr.IA32_XSS) not in msrs:
        raise CetvmError("saved vCPU state lacks IA32_XSS (0xda0) although the guest's xstate has "
                         "CET_U/CET_S in use (XSTATE_BV or CET MSRs); restoring it would lose the "
                         "guest's XSS")
    shstk_on = (msrs.get(int(Msr.IA32_U_CET), 0) | msrs.get(int(Msr.IA32_S_CET), 0)) & CetCtl.SH_STK_EN
    if shstk_on and state.get("guest_ssp") is None:
        raise CetvmError("saved vCPU state lacks the guest SSP (KVM_REG_GUEST_SSP) although shadow "
                         "stacks are enabled")
    for index in vcpu.get_msr_index_list():
        if index not in CET_MSRS or index in msrs:
            continue
        needs = "shstk" if index not in (Msr.IA32_U_CET, Msr.IA32_S_CET) else None
        has = cpuid.guest_cpu_cap_has("shstk") if needs else (
            cpuid.guest_cpu_cap_has("shstk") or cpuid.guest_cpu_cap_has("ibt"))
        if has:
            raise CetvmError(f"saved vCPU state lacks {msr_name(index)} ({index:#x}), a CET MSR "
                             "of the guest's KVM_GET_MSR_INDEX_LIST")


def _sregs_from(doc: dict[str, Any]) -> Sregs:
    fields = dict(doc)
    for name in _SEGMENTS:
        fields[name] = Segment(**doc[name])
    fields["gdt"] = DescriptorTable(**doc["gdt"])
    fields["idt"] = DescriptorTable(**doc["idt"])
    return Sregs(**fields)


def _set_msrs_or_fail(vcpu: KvmVcpu, entries: list[tuple[int, int]]) -> None:
    done = vcpu.set_msrs(entries)
    if done != len(entries):
        index, value = entries[done]
        raise CetvmError(f"restore: KVM_SET_MSRS refused {msr_name(index)} ({index:#x}) = {value:#x}")


def restore_vcpu_state(vcpu: KvmVcpu, state: dict[str, Any]) -> None:
    """Write a saved state into ``vcpu`` (whose CPUID is already set), in a working order."""
    check_saved_state(vcpu, state)
    msrs = _msr_table(state)
    vcpu.set_sregs(_sregs_from(state["sregs"]))
    vcpu.set_regs(Regs(**state["regs"]))
    if int(Msr.IA32_XSS) in msrs:
        _set_msrs_or_fail(vcpu, [(int(Msr.IA32_XSS), msrs.pop(int(Msr.IA32_XSS)))])
    vcpu.set_xcrs([(int(i), int(v)) for i, v in state["xcrs"]])
    vcpu.set_xsave(bytes.fromhex(state["xsave"]))
    efer = msrs.pop(int(Msr.IA32_EFER), None)
    _set_msrs_or_fail(vcpu, sorted(msrs.items()))
    if efer is not None:
        _set_msrs_or_fail(vcpu, [(int(Msr.IA32_EFER), efer)])
    if state.get("guest_ssp") is not None:
        vcpu.set_one_reg(KVM_REG_GUEST_SSP_ID, int(state["guest_ssp"]))
    vcpu.set_mp_state(MpState[state.get("mp_state", "RUNNABLE")])
    event = state.get("events")
    if event:
        queued = QueuedException(**event)
        vcpu.queue_exception(queued.vector, queued.error_code)
