"""Complete vCPU state save/restore through the ioctl-named API only (what a VMM does for
snapshots and migration).

The saved state is a JSON-friendly dict: ``regs``, ``sregs``, ``xcrs``, ``msrs`` (every MSR of
KVM_GET_MSR_INDEX_LIST that reads), ``xsave`` (hex of the KVM_GET_XSAVE2 image),
``fpstate_xstate_bv`` (the guest fpstate's XSTATE_BV, supervisor bits included: which xstate
the guest depends on), ``guest_ssp`` (KVM_REG_GUEST_SSP, None without guest SHSTK),
``mp_state``, ``events``, ``smi`` (the SMM part of KVM_GET_VCPU_EVENTS: a vCPU saved in SMM is
restored in SMM; SMBASE travels as IA32_SMBASE in ``msrs``), ``nmi`` (the NMI part: injected,
pending count, masked — a vCPU saved in its NMI handler keeps NMIs blocked until its IRET), ``tsc_offset`` (KVM_VCPU_TSC_OFFSET, restored after the MSRs so
the TSC continues exactly where it stood) and ``nested`` (KVM_GET_NESTED_STATE: None outside VMX
operation, :class:`~cetvm.kvm.nested_state.NestedState` otherwise; restored first). The guest's CPUID is not part of it: as with KVM, the VMM calls
set_cpuid() on the new vCPU before restoring.

Restore order (each step needs the previous ones): sregs (CR4.CET needs the CPUID), regs,
IA32_XSS *before* XCR0 and XSAVE (the restore bug real VMMs hit on CET hosts: loading xstate
with CET_U/CET_S in use before IA32_XSS allows it), XCR0, XSAVE, the other MSRs (CET MSRs write
the CET components of the fpstate), the guest SSP, MP state, the SMM flags, the NMI state (after SMM, whose entry masks NMIs),
pending events.

A malformed state (a missing key, a value of the wrong type, a ``regs``/``sregs``/segment
object without exactly its struct's fields — a ``regs`` without ``rip`` is refused, not
restored with RIP = 0; other top-level keys are the VMM's and left alone) is refused with :class:`~cetvm.kvm.errors.KvmInvalidArgument` before anything is
written; the values themselves are then checked by the KVM_SET_* calls as they are made.

A state that lacks something the guest depends on is refused with a KvmInvalidArgument naming it:
IA32_XSS missing while XSTATE_BV has CET_U/CET_S; the guest SSP missing while shadow stacks
are on (SH_STK_EN in U_CET or S_CET); any CET MSR of the index list missing while the guest
CPUID has the feature. An incomplete exit (IN or MMIO read waiting for data) must be finished
with ``run(immediate_exit=True)`` before saving, as with KVM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, TypeVar

from cetvm.arch.msr import CET_MSR_SET, CetCtl, Msr
from cetvm.arch.vmx import KVM_REG_GUEST_SSP_ID
from cetvm.arch.xfeatures import XFEATURE_MASK_CET
from cetvm.cpu.state import DescriptorTable, Regs, Segment, Sregs
from cetvm.kvm.api import KvmVcpu, MpState, QueuedException
from cetvm.kvm.caps import msr_name
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.ioctl_args import check_instance, check_u64, describe
from cetvm.kvm.nested_state import NestedState
from cetvm.kvm.nmi import NmiEvents
from cetvm.kvm.smm import SmiEvents

_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
#: Keys a saved state must have; other keys (a VMM's own) are left alone.
_REQUIRED_KEYS = ("regs", "sregs", "xcrs", "msrs", "xsave")
D = TypeVar("D")


def save_vcpu_state(vcpu: KvmVcpu) -> dict[str, Any]:
    """Read the whole vCPU state through the KVM-shaped API (the ioctl-named calls)."""
    vcpu = check_instance("save_vcpu_state: vcpu", vcpu, KvmVcpu)
    msrs = dict(vcpu.get_msrs(vcpu.get_msr_index_list()))
    readable = [i for i in vcpu.get_msr_index_list() if i not in msrs]
    for index in readable:  # get_msrs stops at the first failure: read the rest one by one
        got = vcpu.get_msrs([index])
        if got:
            msrs[index] = got[0][1]
    guest_ssp = vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID) if vcpu.state.cpuid.guest_cpu_cap_has("shstk") else None
    event = vcpu.get_vcpu_events()
    nested = vcpu.get_nested_state()
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
        "smi": asdict(vcpu.get_vcpu_events_smi()),
        "nmi": asdict(vcpu.get_vcpu_events_nmi()),
        "tsc_offset": vcpu.get_tsc_offset(),
        "nested": None if nested is None else nested.to_json(),
    }


def _bad(what: str, why: str) -> KvmInvalidArgument:
    return KvmInvalidArgument(f"saved vCPU state: {what} {why}")


def _dataclass_from(cls: type[D], doc: object, what: str) -> D:
    """``cls(**doc)`` for a mapping with exactly ``cls``'s fields (values checked later)."""
    if not isinstance(doc, Mapping):
        raise _bad(what, f"must be an object, got {describe(doc)}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    missing = [n for n in names if n not in doc]
    unknown = [str(k) for k in doc if k not in names]
    if missing or unknown:
        raise _bad(what, f"lacks {missing} / has unknown {unknown}" if missing and unknown else
                   f"lacks {missing}" if missing else f"has unknown keys {unknown}")
    return cls(**doc)


def _msr_table(state: Mapping[str, Any]) -> dict[int, int]:
    """``msrs``: {"0x<index>": value}; the index a hex string, the value a u64."""
    table = state.get("msrs", {})
    if not isinstance(table, Mapping):
        raise _bad("msrs", f"must be an object, got {describe(table)}")
    out: dict[int, int] = {}
    for key, value in table.items():
        try:
            index = int(key, 16)
        except (TypeError, ValueError):
            raise _bad("msrs", f"key {describe(key)} is not a hex MSR index") from None
        out[index] = check_u64(f"saved vCPU state: {msr_name(index)} ({key})", value)
    return out


def check_saved_state_schema(state: object) -> Mapping[str, Any]:
    """The shape of a saved state (module docstring): the required keys, every field of the
    register structs (no more, no fewer), the JSON types of the values."""
    state = check_instance("saved vCPU state", state, Mapping)
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise _bad("", f"lacks {', '.join(repr(k) for k in missing)}")
    _regs_from(state["regs"])
    _sregs_from(state["sregs"])
    xcrs = state["xcrs"]
    if not isinstance(xcrs, (list, tuple)) or not all(isinstance(x, (list, tuple)) and len(x) == 2 for x in xcrs):
        raise _bad("xcrs", f"must be a list of [index, value] pairs, got {describe(xcrs)}")
    _msr_table(state)
    _xsave_from(state["xsave"])
    check_u64("saved vCPU state: fpstate_xstate_bv", state.get("fpstate_xstate_bv", 0))
    if state.get("guest_ssp") is not None:
        check_u64("saved vCPU state: guest_ssp", state["guest_ssp"])
    if state.get("tsc_offset") is not None:
        check_u64("saved vCPU state: tsc_offset", state["tsc_offset"])
    _mp_state_from(state.get("mp_state", "RUNNABLE"))
    if state.get("events") is not None:
        _dataclass_from(QueuedException, state["events"], "events")
    if state.get("smi") is not None:
        _smi_from(state["smi"])
    if state.get("nmi") is not None:
        _dataclass_from(NmiEvents, state["nmi"], "nmi")
    return state


def _smi_from(doc: object) -> SmiEvents:
    smi = _dataclass_from(SmiEvents, doc, "smi")
    for name in ("smm", "pending", "smm_inside_nmi", "latched_init"):
        if not isinstance(getattr(smi, name), bool):
            raise _bad(f"smi.{name}", f"must be true or false, got {describe(getattr(smi, name))}")
    return smi


def _regs_from(doc: object) -> Regs:
    return _dataclass_from(Regs, doc, "regs")


def _xsave_from(text: object) -> bytes:
    if not isinstance(text, str):
        raise _bad("xsave", f"must be a hex string, got {describe(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise _bad("xsave", "is not a hex string") from None


def _mp_state_from(name: object) -> MpState:
    if not isinstance(name, str) or name not in MpState.__members__:
        raise _bad("mp_state", f"{describe(name)} is not one of {', '.join(MpState.__members__)}")
    return MpState[name]


def check_saved_state(vcpu: KvmVcpu, state: Mapping[str, Any]) -> None:
    """Refuse a malformed state, or one that lacks what the guest depends on (module docstring)."""
    state = check_saved_state_schema(state)
    msrs = _msr_table(state)
    cpuid = vcpu.state.cpuid
    xstate_bv = state.get("fpstate_xstate_bv", 0)
    cet_in_use = bool(xstate_bv & XFEATURE_MASK_CET) or any(
        msrs.get(int(m), 0) for m in (Msr.IA32_U_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP,
                                      Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP))
    if cet_in_use and int(Msr.IA32_XSS) not in msrs:
        raise KvmInvalidArgument("saved vCPU state lacks IA32_XSS (0xda0) although the guest's xstate has "
                         "CET_U/CET_S in use (XSTATE_BV or CET MSRs); restoring it would lose the "
                         "guest's XSS")
    shstk_on = (msrs.get(int(Msr.IA32_U_CET), 0) | msrs.get(int(Msr.IA32_S_CET), 0)) & CetCtl.SH_STK_EN
    if shstk_on and state.get("guest_ssp") is None:
        raise KvmInvalidArgument("saved vCPU state lacks the guest SSP (KVM_REG_GUEST_SSP) although shadow "
                         "stacks are enabled")
    for index in vcpu.get_msr_index_list():
        if index not in CET_MSR_SET or index in msrs:
            continue
        needs = "shstk" if index not in (Msr.IA32_U_CET, Msr.IA32_S_CET) else None
        has = cpuid.guest_cpu_cap_has("shstk") if needs else (
            cpuid.guest_cpu_cap_has("shstk") or cpuid.guest_cpu_cap_has("ibt"))
        if has:
            raise KvmInvalidArgument(f"saved vCPU state lacks {msr_name(index)} ({index:#x}), a CET MSR "
                             "of the guest's KVM_GET_MSR_INDEX_LIST")


def _sregs_from(doc: object) -> Sregs:
    sregs = _dataclass_from(Sregs, doc, "sregs")
    for name in _SEGMENTS:
        setattr(sregs, name, _dataclass_from(Segment, getattr(sregs, name), f"sregs.{name}"))
    for name in ("gdt", "idt"):
        setattr(sregs, name, _dataclass_from(DescriptorTable, getattr(sregs, name), f"sregs.{name}"))
    return sregs


def _set_msrs_or_fail(vcpu: KvmVcpu, entries: list[tuple[int, int]]) -> None:
    done = vcpu.set_msrs(entries)
    if done != len(entries):
        index, value = entries[done]
        raise KvmInvalidArgument(f"restore: KVM_SET_MSRS refused {msr_name(index)} ({index:#x}) = {value:#x}")


def restore_vcpu_state(vcpu: KvmVcpu, state: Mapping[str, Any]) -> None:
    """Write a saved state into ``vcpu`` (whose CPUID is already set), in a working order;
    incomplete state is refused."""
    vcpu = check_instance("restore_vcpu_state: vcpu", vcpu, KvmVcpu)
    check_saved_state(vcpu, state)
    msrs = _msr_table(state)
    # KVM_SET_NESTED_STATE first (as QEMU does): in guest mode the registers below are L2's
    vcpu.set_nested_state(None if state.get("nested") is None else NestedState.from_json(state["nested"]))
    vcpu.set_sregs(_sregs_from(state["sregs"]))
    vcpu.set_regs(_regs_from(state["regs"]))
    if int(Msr.IA32_XSS) in msrs:
        _set_msrs_or_fail(vcpu, [(int(Msr.IA32_XSS), msrs.pop(int(Msr.IA32_XSS)))])
    vcpu.set_xcrs([tuple(x) for x in state["xcrs"]])
    vcpu.set_xsave(_xsave_from(state["xsave"]))
    efer = msrs.pop(int(Msr.IA32_EFER), None)
    _set_msrs_or_fail(vcpu, sorted(msrs.items()))
    if efer is not None:
        _set_msrs_or_fail(vcpu, [(int(Msr.IA32_EFER), efer)])
    if state.get("tsc_offset") is not None:  # after IA32_TSC: exact, without KVM's matching
        vcpu.set_tsc_offset(state["tsc_offset"])
    if state.get("guest_ssp") is not None:
        vcpu.set_one_reg(KVM_REG_GUEST_SSP_ID, state["guest_ssp"])
    vcpu.set_mp_state(_mp_state_from(state.get("mp_state", "RUNNABLE")))
    if state.get("smi") is not None:
        vcpu.set_vcpu_events_smi(_smi_from(state["smi"]))
    if state.get("nmi") is not None:
        vcpu.set_vcpu_events_nmi(_dataclass_from(NmiEvents, state["nmi"], "nmi"))
    event = state.get("events")
    if event:
        queued = _dataclass_from(QueuedException, event, "events")
        vcpu.queue_exception(queued.vector, queued.error_code)
