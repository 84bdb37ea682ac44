"""The vCPU's guest FPU state: a compacted XSAVES image holding, among others, the CET components.

KVM keeps U_CET/PL3_SSP (CET_USER) and PL0-2_SSP (CET_KERNEL) in the guest fpstate; an MSR
access to them first loads the guest FPU (kvm_get_xstate_msr/kvm_set_xstate_msr →
kvm_fpu_get()). The buffer is laid out for XCOMP_BV = supported_xcr0 | supported_xss (KVM's
guest_default_cfg) with offsets from the host CPUID [SDM Vol. 1 13.4.3].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cetvm.arch.xfeatures import XCOMP_BV_COMPACTED, XSAVE_HEADER_OFFSET
from cetvm.kvm.xstate_size import xstate_compacted_offset, xstate_required_size

if TYPE_CHECKING:  # pragma: no cover
    from cetvm.cpuid.model import CpuidModel

_U64 = 0xFFFF_FFFF_FFFF_FFFF


class GuestFpu:
    """A zero-allocated guest fpstate (KVM relies on zero allocation for RESET)."""

    def __init__(self, cpu: "CpuidModel", features: int) -> None:
        self.cpu = cpu
        self.features = features
        self.buffer = bytearray(xstate_required_size(cpu, features, True))
        self._write_u64(XSAVE_HEADER_OFFSET + 8, features | XCOMP_BV_COMPACTED)
        self.loads = 0  # times an MSR access had to load the guest FPU (kvm_fpu_get)

    def _write_u64(self, off: int, value: int) -> None:
        self.buffer[off:off + 8] = (value & _U64).to_bytes(8, "little")

    def _read_u64(self, off: int) -> int:
        return int.from_bytes(self.buffer[off:off + 8], "little")

    @property
    def xstate_bv(self) -> int:
        return self._read_u64(XSAVE_HEADER_OFFSET)

    def has(self, feature: int) -> bool:
        return bool(self.features >> feature & 1)

    def read(self, feature: int, offset: int) -> int:
        """Read 8 bytes at ``offset`` within component ``feature`` (init state reads as 0)."""
        self.loads += 1
        if not self.xstate_bv >> feature & 1:
            return 0
        return self._read_u64(xstate_compacted_offset(self.cpu, feature, self.features) + offset)

    def write(self, feature: int, offset: int, value: int) -> None:
        """Write 8 bytes in component ``feature``, marking it in use in XSTATE_BV."""
        self.loads += 1
        base = xstate_compacted_offset(self.cpu, feature, self.features)
        if not self.xstate_bv >> feature & 1:
            self._write_u64(XSAVE_HEADER_OFFSET, self.xstate_bv | 1 << feature)
        self._write_u64(base + offset, value)

    def clear_component(self, feature: int) -> None:
        """fpstate_clear_xstate_component(): back to init state (zeros, XSTATE_BV bit clear)."""
        if not self.has(feature):
            return
        base = xstate_compacted_offset(self.cpu, feature, self.features)
        size = self.cpu.get(0xD, feature)[0]
        self.buffer[base:base + size] = bytes(size)
        self._write_u64(XSAVE_HEADER_OFFSET, self.xstate_bv & ~(1 << feature))
