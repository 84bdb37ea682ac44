"""An XSAVE image in memory: header fields, per-component bytes, typed CET state.

Layout facts come from an :class:`~cetvm.xstate.layout.XsaveLayout`. The header is at 512:
XSTATE_BV (8 bytes), XCOMP_BV (8 bytes), 48 reserved bytes [SDM Vol. 1 13.4.2]. A component
whose XSTATE_BV bit is 0 is in its initial configuration; for every component n ≥ 2 (CET_U and
CET_S included) that is all zeros, so reads return zeros whatever the buffer holds.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cetvm import InputError
from cetvm.arch.xfeatures import (
    CET_S_OFF_PL0_SSP,
    CET_S_OFF_PL1_SSP,
    CET_S_OFF_PL2_SSP,
    CET_U_OFF_PL3_SSP,
    CET_U_OFF_U_CET,
    XCOMP_BV_COMPACTED,
    XSAVE_EXTENDED_OFFSET,
    XSAVE_HEADER_OFFSET,
    XSAVE_LEGACY_SIZE,
    XFeature,
    xfeature_name,
)
from cetvm.xstate.layout import XsaveLayout, bits_of, compacted_xcomp_bv

_U64 = struct.Struct("<Q")
_XSTATE_BV_OFF = XSAVE_HEADER_OFFSET
_XCOMP_BV_OFF = XSAVE_HEADER_OFFSET + 8
_MASK64 = (1 << 64) - 1


class XsaveFormat(enum.Enum):
    """Standard (XSAVE/XRSTOR) or compacted (XSAVEC/XSAVES) layout."""

    STANDARD = "standard"
    COMPACTED = "compacted"


@dataclass(frozen=True)
class CetUserState:
    """XSAVE component 11 (CET_U): IA32_U_CET at +0, IA32_PL3_SSP at +8."""

    u_cet: int = 0
    pl3_ssp: int = 0


@dataclass(frozen=True)
class CetKernelState:
    """XSAVE component 12 (CET_S): IA32_PL0_SSP, PL1_SSP, PL2_SSP at +0, +8, +16."""

    pl0_ssp: int = 0
    pl1_ssp: int = 0
    pl2_ssp: int = 0


def _u64_check(name: str, value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= _MASK64:
        raise InputError(f"{name} must be a 64-bit unsigned value, got {value!r}")
    return value


class XsaveArea:
    """A bytearray-backed XSAVE image in ``fmt`` with the components of ``features``.

    For the compacted format ``features`` becomes XCOMP_BV (with bit 63) and fixes every
    offset; for the standard format it is the set of user components the buffer is sized for
    (supervisor components cannot live in a standard-format area).
    """

    def __init__(self, layout: XsaveLayout, fmt: XsaveFormat, data: bytearray, features: int) -> None:
        self.layout = layout
        self.format = fmt
        self.data = data
        self.features = features

    # ----------------------------------------------------------------- construction
    @classmethod
    def new(cls, layout: XsaveLayout, features: int, fmt: XsaveFormat = XsaveFormat.COMPACTED) -> "XsaveArea":
        """A zeroed area (every component in init state) able to hold ``features``."""
        if fmt is XsaveFormat.COMPACTED:
            size = layout.compacted_size(features)
            area = cls(layout, fmt, bytearray(size), features & ~XCOMP_BV_COMPACTED)
            area.xcomp_bv = compacted_xcomp_bv(features)
            return area
        supervisor = [n for n in bits_of(features & ~0x3) if layout.component(n).supervisor]
        if supervisor:
            raise InputError(f"a standard-format XSAVE area cannot hold supervisor components "
                             f"{', '.join(xfeature_name(n) for n in supervisor)}; use the compacted format")
        return cls(layout, fmt, bytearray(layout.standard_size(features)), features)

    @classmethod
    def from_bytes(cls, layout: XsaveLayout, data: bytes, fmt: XsaveFormat | None = None,
                   features: int | None = None) -> "XsaveArea":
        """Wrap a saved image; the format defaults to what XCOMP_BV[63] says.

        For the compacted format the features are XCOMP_BV; for the standard format they
        default to every supported user component that fits in ``len(data)``.
        """
        if len(data) < XSAVE_EXTENDED_OFFSET:
            raise InputError(f"XSAVE image of {len(data)} bytes is shorter than the "
                             f"{XSAVE_EXTENDED_OFFSET}-byte legacy region + header")
        xcomp_bv = _U64.unpack_from(data, _XCOMP_BV_OFF)[0]
        if fmt is None:
            fmt = XsaveFormat.COMPACTED if xcomp_bv & XCOMP_BV_COMPACTED else XsaveFormat.STANDARD
        if fmt is XsaveFormat.COMPACTED:
            features = xcomp_bv & ~XCOMP_BV_COMPACTED
            need = layout.compacted_size(features)
        else:
            if features is None:
                features = 0x3 | sum(c.mask for c in layout.components if not c.supervisor
                                     and c.std_offset + c.size <= len(data))
            need = layout.standard_size(features)
        if len(data) < need:
            raise InputError(f"XSAVE image of {len(data)} bytes is too short: the {fmt.value} "
                             f"layout of features 0x{features:x} needs {need}")
        return cls(layout, fmt, bytearray(data), features)

    def to_bytes(self) -> bytes:
        return bytes(self.data)

    # ----------------------------------------------------------------- header
    @property
    def xstate_bv(self) -> int:
        """XSTATE_BV: components not in their init state."""
        return _U64.unpack_from(self.data, _XSTATE_BV_OFF)[0]

    @xstate_bv.setter
    def xstate_bv(self, value: int) -> None:
        _U64.pack_into(self.data, _XSTATE_BV_OFF, _u64_check("XSTATE_BV", value))

    @property
    def xcomp_bv(self) -> int:
        """XCOMP_BV: bit 63 = compacted format, bits 62:0 = components present."""
        return _U64.unpack_from(self.data, _XCOMP_BV_OFF)[0]

    @xcomp_bv.setter
    def xcomp_bv(self, value: int) -> None:
        _U64.pack_into(self.data, _XCOMP_BV_OFF, _u64_check("XCOMP_BV", value))

    @property
    def header(self) -> bytes:
        """The 64-byte XSAVE header (bytes 512–575)."""
        return bytes(self.data[XSAVE_HEADER_OFFSET:XSAVE_EXTENDED_OFFSET])

    @property
    def legacy(self) -> memoryview:
        """The 512-byte legacy (FXSAVE) region holding components 0 and 1."""
        return memoryview(self.data)[:XSAVE_LEGACY_SIZE]

    # ----------------------------------------------------------------- components
    def component_offset(self, n: int) -> int:
        """Where component ``n`` ≥ 2 lives in this area."""
        if n < 2:
            raise InputError(f"component {n} ({xfeature_name(n)}) lives in the legacy region; use .legacy")
        if not (self.features >> n) & 1:
            raise InputError(f"component {n} ({xfeature_name(n)}) is not part of this XSAVE area "
                             f"(features 0x{self.features:x})")
        if self.format is XsaveFormat.COMPACTED:
            return self.layout.compacted_offset(n, self.features)
        return self.layout.standard_offset(n)

    def component_bytes(self, n: int) -> bytes:
        """Component ``n``'s bytes; all zeros (its init state) while XSTATE_BV[n] is 0."""
        offset = self.component_offset(n)
        size = self.layout.component(n).size
        if not (self.xstate_bv >> n) & 1:
            return bytes(size)
        return bytes(self.data[offset:offset + size])

    def set_component_bytes(self, n: int, data: bytes) -> None:
        """Write component ``n`` and mark it in use (XSTATE_BV[n] = 1)."""
        offset = self.component_offset(n)
        size = self.layout.component(n).size
        if len(data) != size:
            raise InputError(f"component {n} ({xfeature_name(n)}) is {size} bytes, got {len(data)}")
        self.data[offset:offset + size] = data
        self.xstate_bv = self.xstate_bv | (1 << n)

    def clear_component(self, n: int) -> None:
        """Put component ``n`` in its init state: zero its bytes and clear XSTATE_BV[n].

        Mirrors the kernel's fpstate_clear_xstate_component() (used by KVM on INIT for
        CET_U/CET_S and MPX) [L xstate.c; K x86.c kvm_vcpu_reset].
        """
        offset = self.component_offset(n)
        size = self.layout.component(n).size
        self.data[offset:offset + size] = bytes(size)
        self.xstate_bv = self.xstate_bv & ~(1 << n)

    # ----------------------------------------------------------------- typed CET state
    @property
    def cet_user(self) -> CetUserState:
        """Component 11 as (U_CET, PL3_SSP); init state (zeros) when XSTATE_BV[11] = 0."""
        raw = self.component_bytes(XFeature.CET_USER)
        return CetUserState(_U64.unpack_from(raw, CET_U_OFF_U_CET)[0],
                            _U64.unpack_from(raw, CET_U_OFF_PL3_SSP)[0])

    @cet_user.setter
    def cet_user(self, state: CetUserState) -> None:
        raw = bytearray(self.layout.component(XFeature.CET_USER).size)
        _U64.pack_into(raw, CET_U_OFF_U_CET, _u64_check("U_CET", state.u_cet))
        _U64.pack_into(raw, CET_U_OFF_PL3_SSP, _u64_check("PL3_SSP", state.pl3_ssp))
        self.set_component_bytes(XFeature.CET_USER, bytes(raw))

    @property
    def cet_kernel(self) -> CetKernelState:
        """Component 12 as (PL0_SSP, PL1_SSP, PL2_SSP); zeros when XSTATE_BV[12] = 0."""
        raw = self.component_bytes(XFeature.CET_KERNEL)
        return CetKernelState(*(_U64.unpack_from(raw, off)[0]
                                for off in (CET_S_OFF_PL0_SSP, CET_S_OFF_PL1_SSP, CET_S_OFF_PL2_SSP)))

    @cet_kernel.setter
    def cet_kernel(self, state: CetKernelState) -> None:
        raw = bytearray(self.layout.component(XFeature.CET_KERNEL).size)
        for name, off, value in (("PL0_SSP", CET_S_OFF_PL0_SSP, state.pl0_ssp),
                                 ("PL1_SSP", CET_S_OFF_PL1_SSP, state.pl1_ssp),
                                 ("PL2_SSP", CET_S_OFF_PL2_SSP, state.pl2_ssp)):
            _U64.pack_into(raw, off, _u64_check(name, value))
        self.set_component_bytes(XFeature.CET_KERNEL, bytes(raw))
