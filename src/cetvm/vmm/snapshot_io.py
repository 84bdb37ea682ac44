"""vCPU state ↔ snapshot: :func:`cetvm.kvm.state.save_vcpu_state` /
:func:`~cetvm.kvm.state.restore_vcpu_state` (the KVM API's complete state through the ioctl-named
calls: regs, sregs, XCRs, every MSR of KVM_GET_MSR_INDEX_LIST, XSAVE, GUEST_SSP, MP state,
pending events; it restores IA32_XSS before XSAVE), stored in the snapshot container.

The saved dict goes in the manifest under ``vcpus[N]``, except the XSAVE image, which is moved
to the binary section ``xsave/vcpu<N>`` (the manifest stays small and readable).

Before anything touches the vCPU, :func:`vcpu_state_requirements` (expressed with
:class:`cetvm.vmm.snapshot.StateRequirement`) refuses, as an InputError, a snapshot that lacks
state the guest depends on: IA32_XSS while CET_U/CET_S state is in use, GUEST_SSP while shadow
stacks are on, and every CET MSR of this KVM's MSR index list. The KVM side repeats its own
checks when the state is put back (a CetvmError naming what is missing).
"""

from __future__ import annotations

from typing import Any, Mapping

from cetvm import CetvmError, InputError
from cetvm.arch import CetCtl, Cr4
from cetvm.arch.msr import CET_MSRS, Msr
from cetvm.arch.xfeatures import XFEATURE_MASK_CET_KERNEL, XFEATURE_MASK_CET_USER
from cetvm.kvm.state import restore_vcpu_state, save_vcpu_state
from cetvm.vmm.snapshot import StateRequirement, check_required_state

_CET_U_MSRS = (Msr.IA32_U_CET, Msr.IA32_PL3_SSP)
_CET_S_MSRS = (Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP, Msr.IA32_PL2_SSP)


def msr_key(index: int) -> str:
    return f"{int(index):#x}"


def xsave_section(vcpu_index: int) -> str:
    return f"xsave/vcpu{vcpu_index}"


# --------------------------------------------------------------------------- save
def save_vcpu(vcpu, index: int = 0) -> tuple[dict, dict[str, bytes]]:
    """(JSON state, binary sections) of one vCPU (see the module docstring)."""
    state = save_vcpu_state(vcpu)
    xsave = bytes.fromhex(state.pop("xsave"))
    return state, {xsave_section(index): xsave}


# --------------------------------------------------------------------------- requirements
def _msr(vcpu_state: Mapping, msr: Msr) -> int:
    return int(vcpu_state["msrs"].get(msr_key(msr), 0))


def _xstate_bv(vcpu_state: Mapping) -> int:
    return int(vcpu_state.get("fpstate_xstate_bv") or 0)


def cet_user_state_in_use(vcpu_state: Mapping) -> bool:
    """The CET_U component is in use (XSTATE_BV) or U_CET / PL3_SSP hold a value."""
    return bool(_xstate_bv(vcpu_state) & XFEATURE_MASK_CET_USER) or any(_msr(vcpu_state, m) for m in _CET_U_MSRS)


def cet_supervisor_state_in_use(vcpu_state: Mapping) -> bool:
    """The CET_S component is in use (XSTATE_BV) or PL0-2_SSP hold a value."""
    return (bool(_xstate_bv(vcpu_state) & XFEATURE_MASK_CET_KERNEL)
            or any(_msr(vcpu_state, m) for m in _CET_S_MSRS))


def shadow_stacks_on(vcpu_state: Mapping) -> bool:
    """CR4.CET with SH_STK_EN in U_CET or S_CET: the SSP register is live state."""
    cr4 = int(vcpu_state["sregs"]["cr4"])
    sh = int(CetCtl.SH_STK_EN)
    return bool(cr4 & Cr4.CET) and bool((_msr(vcpu_state, Msr.IA32_U_CET) | _msr(vcpu_state, Msr.IA32_S_CET)) & sh)


def vcpu_state_requirements(msr_index_list: list[int]) -> tuple[StateRequirement, ...]:
    """What a snapshot must hold for every vCPU, given this KVM's KVM_GET_MSR_INDEX_LIST."""
    listed = {int(m) for m in msr_index_list}
    reqs = [StateRequirement("vcpus.*", key, reason="saved vCPU state")
            for key in ("regs", "sregs", "xcrs", "msrs", "mp_state")]
    reqs += [StateRequirement("vcpus.*.msrs", msr_key(m), reason=f"{m.name} is in KVM_GET_MSR_INDEX_LIST")
             for m in CET_MSRS if int(m) in listed]
    if int(Msr.IA32_XSS) in listed:
        reqs.append(StateRequirement("vcpus.*.msrs", msr_key(Msr.IA32_XSS), when=cet_user_state_in_use,
                                     reason="IA32_XSS is needed while CET_U state (U_CET/PL3_SSP) is in use"))
        reqs.append(StateRequirement("vcpus.*.msrs", msr_key(Msr.IA32_XSS), when=cet_supervisor_state_in_use,
                                     reason="IA32_XSS is needed while CET_S state (PL0-2_SSP) is in use"))
    reqs.append(StateRequirement("vcpus.*", "guest_ssp", when=shadow_stacks_on,
                                 reason="GUEST_SSP is live while shadow stacks are on"))
    return tuple(reqs)


#: vCPU state keys whose values are integers all the way down (objects / lists of integers).
_INTEGER_STATE = ("regs", "sregs", "msrs", "xcrs", "guest_ssp", "fpstate_xstate_bv")


def _non_integer(node: Any, label: str) -> str | None:
    """The first place under ``node`` that is not an integer (lists and objects are walked)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            found = _non_integer(value, f"{label}.{key}")
            if found:
                return found
        return None
    if isinstance(node, list):
        for i, value in enumerate(node):
            found = _non_integer(value, f"{label}[{i}]")
            if found:
                return found
        return None
    if isinstance(node, int) and not isinstance(node, bool):
        return None
    return f"{label} must be an integer, got {node!r:.40}"


def check_vcpu_state_types(manifest: Mapping) -> None:
    """InputError naming the first register/MSR/XCR value that is not an integer, so a corrupt
    manifest is reported by field before the requirement checks read those values."""
    vcpus = manifest.get("vcpus")
    if not isinstance(vcpus, list):
        return  # the caller reports the missing vCPU list
    for i, vcpu in enumerate(vcpus):
        if not isinstance(vcpu, Mapping):
            raise InputError(f"snapshot vcpus[{i}] must be an object, got {vcpu!r:.40}")
        for key in _INTEGER_STATE:
            if key in vcpu:
                problem = _non_integer(vcpu[key], f"vcpus[{i}].{key}")
                if problem:
                    raise InputError(f"snapshot {problem}")


def check_vcpu_states(manifest: Mapping, msr_index_list: list[int]) -> None:
    """InputError (one line) when the snapshot's vCPU state is malformed or incomplete."""
    check_vcpu_state_types(manifest)
    check_required_state(manifest, vcpu_state_requirements(msr_index_list))


# --------------------------------------------------------------------------- restore
def restore_vcpu(vcpu, state: Mapping[str, Any], blobs: Mapping[str, bytes], index: int = 0) -> None:
    """Put a saved vCPU state back through the KVM API (the vCPU's CPUID is already set)."""
    section = xsave_section(index)
    if section not in blobs:
        raise InputError(f"snapshot has no section '{section}' (the vCPU's XSAVE image)")
    if not isinstance(state, Mapping):
        raise InputError(f"snapshot vCPU {index} state must be an object")
    full = dict(state, xsave=bytes(blobs[section]).hex())
    try:
        restore_vcpu_state(vcpu, full)
    except InputError:
        raise
    except CetvmError as exc:
        # KVM_SET_* refused a value: the snapshot is corrupt (or from an incompatible machine), so
        # for the user it is bad input, exit status 2, like every other snapshot inconsistency
        raise InputError(f"snapshot vCPU {index} state is refused by KVM: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise InputError(f"snapshot vCPU {index} state is malformed: {type(exc).__name__} {exc}") from None
