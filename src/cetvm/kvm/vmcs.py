"""A minimal VMCS: natural-width fields keyed by :class:`cetvm.arch.VmcsField` [SDM Vol. 3 24]."""

from __future__ import annotations

from cetvm.arch.vmx import VmcsField
from cetvm.arch.regs import U64_MASK



class Vmcs:
    """Where VMX keeps guest/host state that is not XSAVE-managed (e.g. GUEST_S_CET)."""

    def __init__(self) -> None:
        self._fields: dict[VmcsField, int] = {}

    def read(self, field: VmcsField) -> int:
        """vmcs_readl(): unwritten fields read as 0 (a freshly cleared VMCS)."""
        return self._fields.get(VmcsField(field), 0)

    def write(self, field: VmcsField, value: int) -> None:
        """vmcs_writel()."""
        self._fields[VmcsField(field)] = value & U64_MASK
