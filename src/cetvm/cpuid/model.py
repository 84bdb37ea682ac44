"""The CPUID model: a table of (leaf, subleaf) → (EAX, EBX, ECX, EDX) with named queries.

A :class:`CpuidModel` is what one logical CPU answers to the CPUID instruction [SDM Vol. 2A
"CPUID"]. It is mutable (KVM edits guest CPUID) and :meth:`CpuidModel.copy` gives an
independent one. Leaves listed in :data:`cetvm.arch.cpuid_bits.SUBLEAF_INDEXED_LEAVES` are
looked up by (leaf, subleaf); for every other leaf the subleaf (ECX input) is ignored, as the
hardware ignores it.

JSON format ``cetvm-cpuid/1`` (see :meth:`CpuidModel.to_json`)::

    {"format": "cetvm-cpuid/1", "name": "sapphire-rapids", "vendor": "intel",
     "entries": [{"leaf": "0x0000000d", "subleaf": "0x1",
                  "eax": "0x0000001f", "ebx": "0x00002a80", "ecx": "0x0000dd00", "edx": "0x0"}]}

On output every number is a hex string; on input a hex string ("0x1f" or "1f") or a JSON
integer is accepted. "vendor" is informational (recomputed from leaf 0); "name" is optional.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from cetvm import InputError
from cetvm.arch.cpuid_bits import FEATURES, SUBLEAF_INDEXED_LEAVES, CpuidBit, Reg

#: Identifier of the JSON format written by :meth:`CpuidModel.to_json`.
JSON_FORMAT = "cetvm-cpuid/1"

#: Vendor strings of leaf 0 (EBX, EDX, ECX spell it) and the short names we use.
VENDOR_NAMES: dict[str, str] = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}

#: Physical-address width assumed when leaf 0x80000008 is not enumerated [SDM Vol. 3A 4.1.4:
#: MAXPHYADDR is 36 on processors that do not support CPUID leaf 0x80000008].
DEFAULT_PHYS_ADDR_BITS = 36

_U32 = 0xFFFF_FFFF
_REG_NAMES = ("eax", "ebx", "ecx", "edx")

Regs = tuple[int, int, int, int]


@dataclass(frozen=True, order=True)
class CpuidEntry:
    """One CPUID output: CPUID.(leaf, subleaf) = (eax, ebx, ecx, edx)."""

    leaf: int
    subleaf: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @property
    def regs(self) -> Regs:
        return (self.eax, self.ebx, self.ecx, self.edx)


def is_subleaf_indexed(leaf: int) -> bool:
    """True if CPUID ``leaf`` depends on ECX [SDM Vol. 2A Table 3-8]."""
    return leaf in SUBLEAF_INDEXED_LEAVES


def _check_u32(what: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32:
        raise InputError(f"{what} must be a 32-bit unsigned integer, got {value!r}")
    return value


def vendor_string(ebx: int, ecx: int, edx: int) -> str:
    """The 12-character vendor identification of leaf 0 (spelled in EBX, EDX, ECX order)."""
    raw = b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx))
    return raw.decode("latin-1").rstrip("\x00")


def unknown_feature_error(name: str) -> InputError:
    """InputError for a feature name not in FEATURES, listing the closest known names."""
    close = difflib.get_close_matches(name.lower(), FEATURES.keys(), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(FEATURES))}"
    return InputError(f"unknown CPUID feature {name!r}{hint}")


class CpuidModel:
    """What one logical CPU reports through CPUID; mutable, ``copy()`` for an independent one."""

    def __init__(self, name: str = "custom", entries: Iterable[CpuidEntry] = ()) -> None:
        self.name = name
        self._regs: dict[tuple[int, int], Regs] = {}
        for e in entries:
            self.set(e.leaf, e.subleaf, e.eax, e.ebx, e.ecx, e.edx)

    # ----------------------------------------------------------------- raw table access
    def _key(self, leaf: int, subleaf: int) -> tuple[int, int] | None:
        """The stored key that answers CPUID.(leaf, subleaf), or None if the leaf is absent.

        For a leaf that is not subleaf-indexed the subleaf is ignored: the entry stored with
        subleaf 0 answers, or (for an odd dump that recorded it under another subleaf) the
        lowest stored subleaf of that leaf.
        """
        if is_subleaf_indexed(leaf):
            key = (leaf, subleaf)
            return key if key in self._regs else None
        if (leaf, 0) in self._regs:
            return (leaf, 0)
        subs = sorted(s for (lf, s) in self._regs if lf == leaf)
        return (leaf, subs[0]) if subs else None

    def get(self, leaf: int, subleaf: int = 0) -> Regs:
        """CPUID.(leaf, subleaf) as (eax, ebx, ecx, edx); a missing leaf reads as zeros.

        Zeros (rather than the Intel "last basic leaf" rule for out-of-range leaves) keep the
        model a plain table; callers that care check :attr:`max_basic_leaf` first.
        """
        key = self._key(leaf, subleaf)
        return self._regs[key] if key is not None else (0, 0, 0, 0)

    def contains(self, leaf: int, subleaf: int = 0) -> bool:
        """True if the model has an entry answering CPUID.(leaf, subleaf)."""
        return self._key(leaf, subleaf) is not None

    def set(self, leaf: int, subleaf: int, eax: int, ebx: int, ecx: int, edx: int) -> None:
        """Store CPUID.(leaf, subleaf) (for leaves that are not subleaf-indexed pass 0)."""
        _check_u32("CPUID leaf", leaf)
        _check_u32("CPUID subleaf", subleaf)
        regs = tuple(_check_u32(n, v) for n, v in zip(_REG_NAMES, (eax, ebx, ecx, edx)))
        self._regs[(leaf, subleaf)] = regs  # type: ignore[assignment]

    def remove(self, leaf: int, subleaf: int | None = None) -> None:
        """Remove one subleaf of ``leaf`` or (``subleaf=None``) every entry of the leaf."""
        if subleaf is None:
            for key in [k for k in self._regs if k[0] == leaf]:
                del self._regs[key]
            return
        key = self._key(leaf, subleaf) if not is_subleaf_indexed(leaf) else (leaf, subleaf)
        if key is not None:
            self._regs.pop(key, None)

    def entries(self) -> list[CpuidEntry]:
        """Every stored entry, sorted by (leaf, subleaf)."""
        return [CpuidEntry(lf, sl, *regs) for (lf, sl), regs in sorted(self._regs.items())]

    def copy(self) -> "CpuidModel":
        """An independent model with the same name and entries."""
        clone = CpuidModel(self.name)
        clone._regs = dict(self._regs)
        return clone

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuidModel):
            return NotImplemented
        return self._regs == other._regs

    def __repr__(self) -> str:
        return f"CpuidModel(name={self.name!r}, vendor={self.vendor!r}, entries={len(self._regs)})"

    # ----------------------------------------------------------------- feature flags
    @staticmethod
    def feature_bit(feature: str) -> CpuidBit:
        """The :class:`CpuidBit` named ``feature``; unknown name → InputError with close names."""
        bit = FEATURES.get(feature.lower())
        if bit is None:
            raise unknown_feature_error(feature)
        return bit

    def has(self, feature: str) -> bool:
        """True if the CPUID bit named ``feature`` (cetvm.arch.cpuid_bits.FEATURES) is set."""
        bit = self.feature_bit(feature)
        return bool(self.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask)

    def set_feature(self, feature: str, on: bool) -> None:
        """Set or clear the CPUID bit named ``feature`` (creating the leaf if it is missing)."""
        bit = self.feature_bit(feature)
        regs = list(self.get(bit.leaf, bit.subleaf))
        regs[bit.reg] = (regs[bit.reg] | bit.mask) if on else (regs[bit.reg] & ~bit.mask)
        self.set(bit.leaf, bit.subleaf, *regs)

    # ----------------------------------------------------------------- named facts
    @property
    def vendor_string(self) -> str:
        """Leaf 0's vendor identification, e.g. "GenuineIntel"."""
        _, ebx, ecx, edx = self.get(0)
        return vendor_string(ebx, ecx, edx)

    @property
    def vendor(self) -> str:
        """"intel" (GenuineIntel), "amd" (AuthenticAMD), or "unknown" for any other vendor."""
        return VENDOR_NAMES.get(self.vendor_string, "unknown")

    @property
    def max_basic_leaf(self) -> int:
        """CPUID.0.EAX: the highest basic leaf."""
        return self.get(0)[Reg.EAX]

    @property
    def max_ext_leaf(self) -> int:
        """CPUID.0x80000000.EAX: the highest extended leaf (0 if the range is absent)."""
        eax = self.get(0x8000_0000)[Reg.EAX]
        return eax if eax >= 0x8000_0000 else 0

    @property
    def xcr0_mask(self) -> int:
        """XCR0 bits the CPU supports: CPUID.(0xD,0).EDX:EAX [SDM Vol. 1 13.2]."""
        eax, _, _, edx = self.get(0xD, 0)
        return (edx << 32) | eax

    @property
    def xss_mask(self) -> int:
        """IA32_XSS bits the CPU supports: CPUID.(0xD,1).EDX:ECX [SDM Vol. 1 13.2]."""
        _, _, ecx, edx = self.get(0xD, 1)
        return (edx << 32) | ecx

    @property
    def phys_addr_bits(self) -> int:
        """MAXPHYADDR: CPUID.0x80000008.EAX[7:0], or 36 when that leaf is not enumerated."""
        if self.max_ext_leaf < 0x8000_0008:
            return DEFAULT_PHYS_ADDR_BITS
        return self.get(0x8000_0008)[Reg.EAX] & 0xFF

    @property
    def virt_addr_bits(self) -> int:
        """Linear-address width: CPUID.0x80000008.EAX[15:8] (48 when not enumerated)."""
        if self.max_ext_leaf < 0x8000_0008:
            return 48
        return (self.get(0x8000_0008)[Reg.EAX] >> 8) & 0xFF

    # ----------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The ``cetvm-cpuid/1`` document (see the module docstring)."""
        return {
            "format": JSON_FORMAT,
            "name": self.name,
            "vendor": self.vendor,
            "entries": [
                {"leaf": f"0x{e.leaf:08x}", "subleaf": f"0x{e.subleaf:x}",
                 "eax": f"0x{e.eax:08x}", "ebx": f"0x{e.ebx:08x}",
                 "ecx": f"0x{e.ecx:08x}", "edx": f"0x{e.edx:08x}"}
                for e in self.entries()
            ],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "<json>") -> "CpuidModel":
        """Build a model from a ``cetvm-cpuid/1`` document; malformed → InputError naming where."""
        if not isinstance(doc, Mapping):
            raise InputError(f"{source}: expected a JSON object with \"format\": \"{JSON_FORMAT}\"")
        fmt = doc.get("format")
        if fmt != JSON_FORMAT:
            raise InputError(f"{source}: expected \"format\": \"{JSON_FORMAT}\", got {fmt!r}")
        name = doc.get("name", "custom")
        if not isinstance(name, str):
            raise InputError(f"{source}: \"name\" must be a string, got {name!r}")
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise InputError(f"{source}: \"entries\" must be a list of "
                             "{\"leaf\",\"subleaf\",\"eax\",\"ebx\",\"ecx\",\"edx\"} objects")
        model = cls(name)
        for i, item in enumerate(entries):
            where = f"{source}: entries[{i}]"
            if not isinstance(item, Mapping):
                raise InputError(f"{where}: expected an object, got {item!r}")
            values = [_json_u32(where, item, key, required=(key != "subleaf"))
                      for key in ("leaf", "subleaf", "eax", "ebx", "ecx", "edx")]
            model.set(*values)
        return model


def _json_u32(where: str, item: Mapping[str, Any], key: str, *, required: bool) -> int:
    """A 32-bit value from a JSON entry: hex string ("0x1f"/"1f") or integer."""
    if key not in item:
        if required:
            raise InputError(f"{where}: missing \"{key}\"")
        return 0
    raw = item[key]
    if isinstance(raw, bool):
        value = None
    elif isinstance(raw, int):
        value = raw
    elif isinstance(raw, str):
        text = raw.strip().lower()
        text = text[2:] if text.startswith("0x") else text
        try:
            value = int(text, 16) if text else None
        except ValueError:
            value = None
    else:
        value = None
    if value is None or not 0 <= value <= _U32:
        raise InputError(f"{where}: \"{key}\" must be a 32-bit hex string or integer, got {raw!r}")
    return value
