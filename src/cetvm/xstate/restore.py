"""XRSTOR/XRSTORS validity checks as pure functions: None, or why the CPU raises #GP(0).

Header checks [SDM Vol. 1 13.8.1/13.8.2, Vol. 2B XRSTOR/XRSTORS "Protected Mode Exceptions"]:

- the area is not 64-byte aligned (both instructions);
- XRSTORS: XCOMP_BV[63] = 0; XCOMP_BV sets a bit outside XCR0 | IA32_XSS; XSTATE_BV sets a
  bit that XCOMP_BV does not; bytes 63:16 of the header (area bytes 528–575) are not zero;
- XRSTOR, compacted form (XCOMP_BV[63] = 1): XSAVEC not enumerated; XCOMP_BV sets a bit
  outside XCR0; XSTATE_BV sets a bit that XCOMP_BV does not; header bytes 63:16 not zero;
- XRSTOR, standard form: XSTATE_BV sets a bit outside XCR0; header bytes 23:8 (area bytes
  520–535: XCOMP_BV and the next 8 bytes) are not zero.

Decision: the brief asked for bytes 520–575 in the standard form; the SDM (13.8.1 and the
XRSTOR exception list) checks only bytes 23:8 of the header, so bytes 536–575 are ignored by
a standard-form XRSTOR here, as on hardware. A test pins this.

Value checks: XRSTORS applies the WRMSR checks to the CET_U / CET_S values it loads and
raises #GP(0) on a bad one (the SDM's XRSTORS operation [SDM Vol. 1 §13.12]; Bochs 2.7 omits
this check, so Bochs is no oracle here).
"""

from __future__ import annotations

import struct
from typing import Union

from cetvm import InputError
from cetvm.arch.msr import cet_ctl_fault, ssp_fault
from cetvm.arch.xfeatures import XCOMP_BV_COMPACTED, XSAVE_EXTENDED_OFFSET, XSAVE_HEADER_OFFSET, XFeature
from cetvm.xstate.area import CetKernelState, CetUserState, XsaveArea

_U64 = struct.Struct("<Q")
_MASK63 = (1 << 63) - 1

HeaderSource = Union[bytes, bytearray, memoryview, XsaveArea]


def _header(src: HeaderSource) -> bytes:
    """The 64-byte header from an XsaveArea, a whole image (≥ 576 bytes) or a bare header."""
    if isinstance(src, XsaveArea):
        return src.header
    raw = bytes(src)
    if len(raw) == XSAVE_EXTENDED_OFFSET - XSAVE_HEADER_OFFSET:
        return raw
    if len(raw) >= XSAVE_EXTENDED_OFFSET:
        return raw[XSAVE_HEADER_OFFSET:XSAVE_EXTENDED_OFFSET]
    raise InputError(f"expected a 64-byte XSAVE header or an image of at least 576 bytes, got {len(raw)}")


def area_alignment_fault(address: int) -> str | None:
    """#GP(0) if the XSAVE area is not 64-byte aligned [SDM XRSTOR/XRSTORS]."""
    if address & 63:
        return f"XSAVE area at 0x{address:x} is not 64-byte aligned"
    return None


def compacted_header_fault(header: bytes, allowed: int, allowed_name: str) -> str | None:
    """The compacted-form header checks (XRSTORS, or XRSTOR with XCOMP_BV[63] = 1)."""
    xstate_bv, xcomp_bv = _U64.unpack_from(header, 0)[0], _U64.unpack_from(header, 8)[0]
    if xcomp_bv & _MASK63 & ~allowed:
        return (f"XCOMP_BV 0x{xcomp_bv:x} sets bits 0x{xcomp_bv & _MASK63 & ~allowed:x} "
                f"outside {allowed_name} 0x{allowed:x}")
    if xstate_bv & ~xcomp_bv:
        return f"XSTATE_BV 0x{xstate_bv:x} sets bits 0x{xstate_bv & ~xcomp_bv:x} not in XCOMP_BV"
    if any(header[16:]):
        return "XSAVE header bytes 63:16 (area bytes 528-575) are not zero"
    return None


def standard_header_fault(header: bytes, xcr0: int) -> str | None:
    """The standard-form XRSTOR header checks [SDM Vol. 1 13.8.1]."""
    xstate_bv = _U64.unpack_from(header, 0)[0]
    if xstate_bv & ~xcr0:
        return f"XSTATE_BV 0x{xstate_bv:x} sets bits 0x{xstate_bv & ~xcr0:x} outside XCR0 0x{xcr0:x}"
    if any(header[8:24]):
        return "XSAVE header bytes 23:8 (area bytes 520-535, XCOMP_BV) are not zero"
    return None


def xrstor_fault(src: HeaderSource, address: int, xcr0: int, xss: int, *,
                 compacted_insn: bool, xsavec_supported: bool = True) -> str | None:
    """Why XRSTOR (``compacted_insn=False``) or XRSTORS (``True``) raises #GP(0), or None.

    ``src`` is the area (or its bytes, or just its 64-byte header) at linear ``address``.
    ``xsavec_supported`` is CPUID.(0xD,1).EAX[1], needed for XRSTOR's compacted form.
    """
    fault = area_alignment_fault(address)
    if fault:
        return fault
    header = _header(src)
    xcomp_bv = _U64.unpack_from(header, 8)[0]
    if compacted_insn:
        if not xcomp_bv & XCOMP_BV_COMPACTED:
            return "XRSTORS needs the compacted format: XCOMP_BV[63] is 0"
        return compacted_header_fault(header, xcr0 | xss, "XCR0|IA32_XSS")
    if xcomp_bv & XCOMP_BV_COMPACTED:
        if not xsavec_supported:
            return "XRSTOR of a compacted area (XCOMP_BV[63] = 1) without XSAVEC support"
        return compacted_header_fault(header, xcr0, "XCR0")
    return standard_header_fault(header, xcr0)


# --------------------------------------------------------------------- CET values
def cet_component_value_fault(state: CetUserState | CetKernelState, va_bits: int = 48) -> str | None:
    """Why XRSTORS of this CET_U or CET_S component value raises #GP(0), or None: the WRMSR
    value checks of :mod:`cetvm.arch.msr` applied to each MSR the component holds."""
    if isinstance(state, CetUserState):
        return cet_ctl_fault("IA32_U_CET", state.u_cet, va_bits) or ssp_fault("IA32_PL3_SSP", state.pl3_ssp, va_bits)
    for name, value in (("IA32_PL0_SSP", state.pl0_ssp), ("IA32_PL1_SSP", state.pl1_ssp),
                        ("IA32_PL2_SSP", state.pl2_ssp)):
        fault = ssp_fault(name, value, va_bits)
        if fault:
            return fault
    return None


def xrstors_value_fault(area: XsaveArea, rfbm: int, va_bits: int = 48) -> str | None:
    """The value checks XRSTORS applies to the CET components it would load from ``area``.

    A component is loaded from memory when RFBM and XSTATE_BV both have its bit; otherwise it
    is initialized (zeros, always valid).
    """
    loaded = rfbm & area.xstate_bv & area.features
    if loaded & XFeature.CET_USER.mask:
        fault = cet_component_value_fault(area.cet_user, va_bits)
        if fault:
            return fault
    if loaded & XFeature.CET_KERNEL.mask:
        return cet_component_value_fault(area.cet_kernel, va_bits)
    return None
