"""XSAVE area layouts computed from CPUID leaf 0xD [SDM Vol. 1 13.4].

Sizes, offsets and flags always come from the CPU model (CPUID.(0xD, n)), never from constants:
Zen 4 and Skylake-SP place the same components at different offsets.

Standard format: component n ≥ 2 at CPUID.(0xD,n).EBX; the area size for an XCR0 is the
largest offset + size over the enabled user components, at least 576 (legacy region + header).
Supervisor (IA32_XSS) components have no standard-format location (EBX = 0).

Compacted format (XSAVEC/XSAVES): offset 576, then each component n ≥ 2 set in XCOMP_BV in
ascending order, first rounded up to 64 when CPUID.(0xD,n).ECX[1] is set; the running end
after the last component is the size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from cetvm import InputError
from cetvm.arch.cpuid_bits import LEAF_XSTATE
from cetvm.arch.xfeatures import XCOMP_BV_COMPACTED, XSAVE_EXTENDED_OFFSET, XFeature, xfeature_name
from cetvm.cpuid.model import CpuidModel

#: The legacy (FXSAVE) region's two components: (size, offset) [SDM Vol. 1 §13.4.1].
LEGACY_COMPONENTS: dict[int, tuple[int, int]] = {0: (160, 0), 1: (256, 160)}

_MASK63 = (1 << 63) - 1
#: How many XSS candidates :meth:`XsaveLayout.infer_os_xss` lists at most.
MAX_XSS_CANDIDATES = 16


def align64(value: int) -> int:
    """Round up to a multiple of 64 (compacted-format alignment, ECX[1] of 0xD.n)."""
    return (value + 63) & ~63


def bits_of(mask: int) -> Iterator[int]:
    """Bit numbers set in ``mask``, ascending."""
    n = 0
    while mask:
        if mask & 1:
            yield n
        mask >>= 1
        n += 1


@dataclass(frozen=True)
class XComponent:
    """One XSAVE state component as CPUID.(0xD, number) describes it."""

    number: int
    size: int          #: EAX
    std_offset: int    #: EBX (0 for supervisor components and the legacy pair)
    supervisor: bool   #: ECX[0]: managed through IA32_XSS
    align64: bool      #: ECX[1]: 64-byte aligned in the compacted format
    xfd: bool          #: ECX[2]: supports extended feature disable

    @property
    def mask(self) -> int:
        return 1 << self.number

    @property
    def name(self) -> str:
        return xfeature_name(self.number)

    @classmethod
    def from_leaf(cls, number: int, regs: tuple[int, int, int, int]) -> "XComponent":
        eax, ebx, ecx, _ = regs
        return cls(number, eax, ebx, bool(ecx & 1), bool(ecx & 2), bool(ecx & 4))


class XsaveLayout:
    """The XSAVE components one CPU model enumerates, and the sizes/offsets they imply."""

    def __init__(self, components: dict[int, XComponent], xcr0_supported: int, xss_supported: int) -> None:
        self._components = dict(sorted(components.items()))
        self.xcr0_supported = xcr0_supported
        self.xss_supported = xss_supported

    @classmethod
    def from_cpuid(cls, model: CpuidModel) -> "XsaveLayout":
        """Read components n ≥ 2 in XCR0-supported | XSS-supported from CPUID.(0xD, n).

        A component the masks name but whose CPUID.(0xD,n).EAX is 0 is an inconsistent model
        and raises InputError.
        """
        xcr0, xss = model.xcr0_mask, model.xss_mask
        for what, mask, where in (("XCR0", xcr0, "0xD.0 EDX[31]"), ("IA32_XSS", xss, "0xD.1 EDX[31]")):
            if mask >> 63:
                raise InputError(f"{model.name}: CPUID {where} enumerates {what} bit 63, which is reserved "
                                 "(bit 63 of XCOMP_BV marks the compacted format; no component has it)")
        components: dict[int, XComponent] = {}
        for n in bits_of((xcr0 | xss) & ~0x3):
            comp = XComponent.from_leaf(n, model.get(LEAF_XSTATE, n))
            if comp.size == 0:
                raise InputError(f"{model.name}: CPUID 0xD.{n:X} reports size 0 for enumerated "
                                 f"component {n} ({xfeature_name(n)})")
            components[n] = comp
        return cls(components, xcr0, xss)

    # ----------------------------------------------------------------- components
    @property
    def components(self) -> list[XComponent]:
        """The enumerated components n ≥ 2, ascending."""
        return list(self._components.values())

    def component(self, n: int) -> XComponent:
        """Component ``n``; 0 and 1 are the legacy region (x87 160@0, SSE 256@160)."""
        if n in LEGACY_COMPONENTS:
            size, offset = LEGACY_COMPONENTS[n]
            return XComponent(n, size, offset, False, False, False)
        comp = self._components.get(n)
        if comp is None:
            raise InputError(f"XSAVE component {n} ({xfeature_name(n)}) is not enumerated by this CPU")
        return comp

    def _extended(self, mask: int, what: str) -> list[XComponent]:
        """Components n ≥ 2 of ``mask`` (bit 63 and the legacy bits ignored), checked to exist."""
        out = []
        for n in bits_of(mask & _MASK63 & ~0x3):
            if n not in self._components:
                raise InputError(f"{what} 0x{mask:x} names component {n} ({xfeature_name(n)}), "
                                 "which this CPU does not enumerate")
            out.append(self._components[n])
        return out

    @property
    def user_mask(self) -> int:
        """XCR0-managed components (including x87/SSE) this CPU supports."""
        return self.xcr0_supported

    @property
    def supervisor_mask(self) -> int:
        """IA32_XSS-managed components this CPU supports."""
        return self.xss_supported

    # ----------------------------------------------------------------- standard format
    def standard_offset(self, n: int) -> int:
        """Offset of component ``n`` in the standard format; supervisor components have none."""
        comp = self.component(n)
        if comp.supervisor:
            raise InputError(f"component {n} ({comp.name}) is supervisor state: it has no "
                             "standard-format offset (only XSAVES/XRSTORS handle it)")
        return comp.std_offset

    def standard_size(self, xcr0: int) -> int:
        """CPUID.(0xD,0).EBX for this XCR0: max offset+size of enabled user components, ≥ 576."""
        ends = [c.std_offset + c.size for c in self._extended(xcr0, "XCR0") if not c.supervisor]
        return max([XSAVE_EXTENDED_OFFSET, *ends])

    def max_standard_size(self) -> int:
        """CPUID.(0xD,0).ECX: the standard size with every supported XCR0 bit enabled."""
        return self.standard_size(self.xcr0_supported)

    # ----------------------------------------------------------------- compacted format
    def compacted_offset(self, n: int, mask: int) -> int:
        """Offset of component ``n`` in a compacted area whose XCOMP_BV is ``mask``."""
        if n in LEGACY_COMPONENTS:
            return LEGACY_COMPONENTS[n][1]
        if not (mask >> n) & 1:
            raise InputError(f"component {n} ({xfeature_name(n)}) is not in XCOMP_BV 0x{mask:x}")
        offset = XSAVE_EXTENDED_OFFSET
        for comp in self._extended(mask, "XCOMP_BV"):
            if comp.align64:
                offset = align64(offset)
            if comp.number == n:
                return offset
            offset += comp.size
        raise AssertionError("unreachable: n is in mask")  # pragma: no cover

    def compacted_size(self, mask: int) -> int:
        """Size of a compacted area holding ``mask`` (CPUID.(0xD,1).EBX for XCR0 | XSS)."""
        offset = XSAVE_EXTENDED_OFFSET
        for comp in self._extended(mask, "XCOMP_BV"):
            if comp.align64:
                offset = align64(offset)
            offset += comp.size
        return offset

    def max_compacted_size(self) -> int:
        """Compacted size with every supported XCR0 and XSS component."""
        return self.compacted_size(self.xcr0_supported | self.xss_supported)

    # ----------------------------------------------------------------- reading a dump
    def infer_os_xcr0(self, reported_standard_size: int) -> int | None:
        """The XCR0 an OS had enabled when a dump reported CPUID.(0xD,0).EBX.

        Decision (documented, tested on every dump): EBX only fixes the end of the last enabled
        component, so we take the *largest* valid XCR0 consistent with it: x87|SSE plus every
        supported user component that ends at or below EBX, then drop architecturally
        incomplete groups (see :func:`xcr0_fault`). None if its standard size is not EBX.
        (Tiger Lake under Windows: EBX 0xA80 → XCR0 0xE7, PKRU not enabled.)
        """
        xcr0 = 0x3 & self.xcr0_supported
        for comp in self._components.values():
            if not comp.supervisor and comp.std_offset + comp.size <= reported_standard_size:
                xcr0 |= comp.mask
        xcr0 = largest_valid_xcr0(xcr0)
        return xcr0 if self.standard_size(xcr0) == reported_standard_size else None

    def infer_os_xss(self, xcr0: int, reported_compacted_size: int, limit: int = MAX_XSS_CANDIDATES) -> list[int]:
        """IA32_XSS values ⊆ supported XSS with compacted_size(xcr0 | xss) == CPUID.(0xD,1).EBX:
        the first ``limit`` of them, the fewest components first, ties by numeric value (the
        first is the one cetvm reports; :meth:`count_os_xss` says how many there are in all).

        Alignment padding can make several subsets fit (SPR: PT alone and PT|PASID both give
        0x2A80 because TILECFG is 64-byte aligned). Computed by :func:`_xss_search` in time
        polynomial in the number of components, not by trying every subset (2^n: a 40-bit XSS
        mask never finished).
        """
        return _xss_search(self, xcr0, reported_compacted_size, limit)[0]

    def count_os_xss(self, xcr0: int, reported_compacted_size: int) -> int:
        """How many IA32_XSS subsets give compacted_size(xcr0 | xss) == ``reported_compacted_size``."""
        return _xss_search(self, xcr0, reported_compacted_size, 1)[1]


#: Distinct partial layouts (running offset, component count) the XSS search keeps; a model with
#: more is refused as implausible (real CPUs: a few dozen).
MAX_XSS_SEARCH_STATES = 50_000


def _xss_search(layout: XsaveLayout, xcr0: int, target: int, limit: int) -> tuple[list[int], int]:
    """(first ``limit`` XSS masks in (popcount, value) order, total count) whose compacted size
    with ``xcr0`` is ``target``.

    Dynamic programming over the components in ascending order (the compacted format's order):
    a state is (running offset, XSS components taken) and holds how many subsets reach it and
    the ``limit`` smallest of them. XCR0 components are always taken, supported XSS ones may
    be; an offset past ``target`` is dropped (offsets only grow). Adding the same higher bit to
    every mask of a state keeps their order, so keeping the smallest ``limit`` per state is
    exact. Work: components × states × limit."""
    xcr0 &= _MASK63 & ~0x3
    if xcr0 & ~sum(c.mask for c in layout.components):
        return [], 0
    xss_bits = layout.xss_supported & _MASK63 & ~0x3
    states: dict[tuple[int, int], tuple[int, list[int]]] = {(XSAVE_EXTENDED_OFFSET, 0): (1, [0])}
    for comp in layout.components:
        forced, optional = bool(xcr0 & comp.mask), bool(xss_bits & comp.mask) and not xcr0 & comp.mask
        if not forced and not optional:
            continue
        following: dict[tuple[int, int], tuple[int, list[int]]] = {}
        for (offset, taken), (count, masks) in states.items():
            if optional:
                _merge_state(following, (offset, taken), count, masks, limit)
            end = (align64(offset) if comp.align64 else offset) + comp.size
            if end <= target:
                added = [m | comp.mask for m in masks] if optional else masks
                _merge_state(following, (end, taken + optional), count, added, limit)
        if len(following) > MAX_XSS_SEARCH_STATES:
            raise InputError(f"XSAVE components give more than {MAX_XSS_SEARCH_STATES} distinct compacted "
                             "layouts: not a plausible CPU model")
        states = following
    found = sorted(((taken, m) for (offset, taken), (_, masks) in states.items() if offset == target for m in masks))
    total = sum(count for (offset, _), (count, _) in states.items() if offset == target)
    return [m for _, m in found[:limit]], total


def _merge_state(states: dict[tuple[int, int], tuple[int, list[int]]], key: tuple[int, int], count: int,
                 masks: list[int], limit: int) -> None:
    old_count, old_masks = states.get(key, (0, []))
    states[key] = (old_count + count, sorted(set(old_masks) | set(masks))[:limit])


def xcr0_fault(xcr0: int, supported: int) -> str | None:
    """Why XSETBV(XCR0 = ``xcr0``) raises #GP(0), or None [SDM Vol. 1 13.3, XSETBV].

    x87 must be set; AVX needs SSE; MPX BNDREGS/BNDCSR together; AVX-512 opmask, ZMM_Hi256
    and Hi16_ZMM together and only with AVX; AMX TILECFG/TILEDATA together; no unsupported bit.
    """
    if xcr0 & ~supported:
        return f"XCR0 bits 0x{xcr0 & ~supported:x} are not supported (CPUID.(0xD,0) EDX:EAX)"
    if not xcr0 & XFeature.X87.mask:
        return "XCR0[0] (x87) must be 1"
    if xcr0 & XFeature.YMM.mask and not xcr0 & XFeature.SSE.mask:
        return "XCR0[2] (AVX) requires XCR0[1] (SSE)"
    if bool(xcr0 & XFeature.BNDREGS.mask) != bool(xcr0 & XFeature.BNDCSR.mask):
        return "XCR0[3] and XCR0[4] (MPX) must be equal"
    avx512 = (xcr0 >> 5) & 0x7
    if avx512 not in (0, 0x7):
        return "XCR0[7:5] (AVX-512) must be all 0 or all 1"
    if avx512 and not xcr0 & XFeature.YMM.mask:
        return "XCR0[7:5] (AVX-512) requires XCR0[2] (AVX)"
    if bool(xcr0 & XFeature.XTILE_CFG.mask) != bool(xcr0 & XFeature.XTILE_DATA.mask):
        return "XCR0[17] and XCR0[18] (AMX) must be equal"
    return None


def largest_valid_xcr0(xcr0: int) -> int:
    """``xcr0`` minus the components that make it an invalid XCR0 (incomplete groups)."""
    if not xcr0 & XFeature.SSE.mask:
        xcr0 &= ~XFeature.YMM.mask
    if bool(xcr0 & XFeature.BNDREGS.mask) != bool(xcr0 & XFeature.BNDCSR.mask):
        xcr0 &= ~(XFeature.BNDREGS.mask | XFeature.BNDCSR.mask)
    if (xcr0 >> 5) & 0x7 != 0x7 or not xcr0 & XFeature.YMM.mask:
        xcr0 &= ~(0x7 << 5)
    if bool(xcr0 & XFeature.XTILE_CFG.mask) != bool(xcr0 & XFeature.XTILE_DATA.mask):
        xcr0 &= ~(XFeature.XTILE_CFG.mask | XFeature.XTILE_DATA.mask)
    return xcr0


def compacted_xcomp_bv(mask: int) -> int:
    """XCOMP_BV written by XSAVEC/XSAVES for requested-feature bitmap ``mask``."""
    return (mask & _MASK63) | XCOMP_BV_COMPACTED
