"""The CPU engine ("hardware"): Unicorn executes guest code, cetvm adds CET, event delivery
through the guest IDT and VMX-like exits.

Public API (imported lazily, so ``cetvm.cpu.cet`` stays importable without Unicorn):
:class:`Vcpu` (:mod:`.vcpu`), :class:`VmExit` / :class:`ExitReason` / :class:`Direction`
(:mod:`.exits`), the VMCS the CPU obeys :class:`Vmcs` (:mod:`.vmcs`), the register
dataclasses :class:`Regs`, :class:`Sregs`, :class:`Segment`, :class:`DescriptorTable`,
:class:`CetState` (:mod:`.state`), :class:`GuestFault` (:mod:`.faults`) and the 4-level walker
:func:`translate` / :class:`Access` (:mod:`.paging`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Vcpu": "vcpu", "VmExit": "exits", "ExitReason": "exits", "Direction": "exits",
    "IoExit": "exits", "MmioExit": "exits", "MsrExit": "exits", "ExceptionExit": "exits",
    "Regs": "state", "Sregs": "state", "Segment": "state", "DescriptorTable": "state", "CetState": "state",
    "GuestFault": "faults", "Vmcs": "vmcs", "translate": "paging", "Access": "paging", "PagingMode": "paging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cetvm.cpu' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cetvm.cpu.{module}"), name)
