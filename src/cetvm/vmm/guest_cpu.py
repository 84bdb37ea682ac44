"""The guest CPU as QEMU's ``-cpu`` names it, and the honesty mask every guest CPUID gets.

Two steps the VMM applies to KVM_GET_SUPPORTED_CPUID before KVM_SET_CPUID2, as QEMU does in
x86_cpu_expand_features / x86_cpu_filter_features:

1. :class:`GuestCpuSpec` (QEMU ``-cpu`` syntax, ``MODEL[,+feat][,-feat][,feat=on|off]
   [,vendor=V][,phys-bits=N][,host-phys-bits[=on|off]][,migratable=..]``). ``host`` and
   ``max`` keep every supported feature (QEMU with KVM: ``max`` is ``host``); a QEMU model name
   (:data:`QEMU_MODELS`: qemu64, Opteron_G1, IvyBridge, Skylake-Server) keeps only that model's
   features and takes its vendor, as QEMU's builtin_x86_defs do; with KVM QEMU also turns
   x2apic on for every named model (kvm_default_props). ``+feat`` the host cannot give is left
   off with a warning line, as QEMU's "host doesn't support requested feature" (collected in
   :attr:`GuestCpuSpec.warnings`); an unknown feature name is an InputError.
2. :func:`honest_cpuid`: the features the CPU cannot execute are cleared (the engine's own
   set plus what cetvm implements, :func:`cetvm.kvm.caps.engine_feature_words`, as QEMU masks
   a TCG guest with TCG_*_FEATURES), and leaf 0xD is made consistent with what is left: XCR0
   components whose feature is hidden (AVX, AVX-512, PKRU, AMX, MPX) leave 0xD.0 EAX/EDX and
   their sub-leaves, the sizes are recomputed (KVM's xstate_required_size); without XSAVE leaf
   0xD is empty.

Decisions: family/model/stepping stay the host's for every model (only features and vendor
change); ``phys-bits=N`` sets CPUID.0x80000008.EAX[7:0]; ``host-phys-bits`` is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cetvm import InputError
from cetvm.arch.cpuid_bits import Reg
from cetvm.arch.qemu_features import (FEATURE_WORDS, QEMU_FEATURES, canonical_feature_name, never_shown,
                                      qemu_feature, word_mask)
from cetvm.arch.xfeatures import XFeature
from cetvm.cpuid import CpuidModel
from cetvm.kvm.caps import engine_feature_words
from cetvm.kvm.xstate_size import xstate_required_size

_PPRO = ("fpu", "de", "pse", "tsc", "msr", "mce", "cx8", "pge", "cmov", "pat", "fxsr", "mmx", "sse", "sse2",
         "pae", "sep", "apic")
_PC = _PPRO + ("mtrr", "clflush", "mca", "pse36")

#: QEMU 7.2 builtin_x86_defs this front end knows: (vendor, feature names) [QEMU's builtin_x86_defs].
QEMU_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qemu64": ("AuthenticAMD", _PC + ("pni", "cx16", "lm", "syscall", "nx", "lahf-lm", "svm")),
    "Opteron_G1": ("AuthenticAMD", _PC + ("pni", "lm", "nx", "syscall")),
    "IvyBridge": ("GenuineIntel", _PC + (
        "pni", "pclmulqdq", "ssse3", "cx16", "sse4.1", "sse4.2", "x2apic", "popcnt", "tsc-deadline", "aes",
        "xsave", "avx", "f16c", "rdrand", "fsgsbase", "smep", "erms", "rdtscp", "nx", "syscall", "lm",
        "lahf-lm", "xsaveopt")),
    "Skylake-Server": ("GenuineIntel", _PC + (
        "pni", "pclmulqdq", "ssse3", "fma", "cx16", "pcid", "sse4.1", "sse4.2", "x2apic", "movbe", "popcnt",
        "tsc-deadline", "aes", "xsave", "avx", "f16c", "rdrand", "fsgsbase", "bmi1", "hle", "avx2", "smep",
        "bmi2", "erms", "invpcid", "rtm", "mpx", "avx512f", "avx512dq", "rdseed", "adx", "smap", "clwb",
        "clflushopt", "avx512cd", "avx512bw", "avx512vl", "pku", "pdpe1gb", "rdtscp", "nx", "syscall", "lm",
        "abm", "lahf-lm", "3dnowprefetch", "xsaveopt", "xsavec", "xgetbv1")),
}
#: ``-cpu`` names that keep every feature KVM supports.
HOST_MODELS = ("host", "max")
#: Features QEMU turns on for every named model with KVM (kvm_default_props).
KVM_DEFAULT_ON = ("x2apic", "hypervisor")
_VENDORS = ("GenuineIntel", "AuthenticAMD")
_IGNORED_PROPERTIES = ("migratable", "check", "enforce", "l3-cache", "pmu", "host-cache-info", "kvm")


@dataclass
class GuestCpuSpec:
    """A parsed ``-cpu`` value (module docstring)."""

    model: str = "host"
    plus: tuple[str, ...] = ()
    minus: tuple[str, ...] = ()
    vendor: str | None = None
    phys_bits: int | None = None
    warnings: list[str] = field(default_factory=list, compare=False)

    @classmethod
    def parse(cls, text: str) -> "GuestCpuSpec":
        """``MODEL[,opt...]`` → spec; an InputError names the bad part."""
        parts = [p.strip() for p in str(text).split(",")]
        model = parts[0] or "host"
        if model not in HOST_MODELS and model not in QEMU_MODELS:
            known = ", ".join(HOST_MODELS + tuple(QEMU_MODELS))
            raise InputError(f"-cpu {text!r}: unknown CPU model {model!r} (known: {known})")
        spec = cls(model)
        plus, minus = [], []
        for part in parts[1:]:
            if not part:
                continue
            if part[0] in "+-":
                name, on = part[1:], part[0] == "+"
            elif "=" in part:
                key, value = part.split("=", 1)
                if spec._property(key.strip(), value.strip(), text):
                    continue
                if value.lower() not in ("on", "off", "true", "false", "yes", "no"):
                    raise InputError(f"-cpu {text!r}: property {key!r} expects on or off, got {value!r}")
                name, on = key.strip(), value.lower() in ("on", "true", "yes")
            else:
                if spec._property(part, "on", text):
                    continue
                name, on = part, True
            spec._check_feature(name, text)
            (plus if on else minus).append(canonical_feature_name(name))
        spec.plus, spec.minus = tuple(plus), tuple(minus)
        return spec

    def _property(self, key: str, value: str, text: str) -> bool:
        """Handle a non-feature property; False if ``key`` names a feature."""
        lowered = key.lower()
        if lowered == "vendor":
            if value not in _VENDORS:
                raise InputError(f"-cpu {text!r}: vendor must be one of {', '.join(_VENDORS)}, got {value!r}")
            self.vendor = value
            return True
        if lowered == "phys-bits":
            try:
                bits = int(value, 0)
            except ValueError:
                bits = -1
            if not 32 <= bits <= 52:
                raise InputError(f"-cpu {text!r}: phys-bits must be 32..52, got {value!r}")
            self.phys_bits = bits
            return True
        if lowered == "host-phys-bits":
            return True  # the default: the host's MAXPHYADDR
        if lowered in _IGNORED_PROPERTIES or lowered in ("hv-passthrough", "hv_passthrough"):
            if lowered in ("hv-passthrough", "hv_passthrough"):
                self.warnings.append("warning: Hyper-V enlightenments (hv_passthrough) are not available in cetvm")
            return True
        return False

    @staticmethod
    def _check_feature(name: str, text: str) -> None:
        if qemu_feature(name) is None and not never_shown(name):
            raise InputError(f"-cpu {text!r}: unknown CPU feature {name!r}")

    def apply(self, supported: CpuidModel) -> CpuidModel:
        """The guest CPUID this spec gives on ``supported`` (KVM's table + the VMM leaves);
        warnings for features that cannot be given are appended to :attr:`warnings`."""
        model = supported.copy()
        available = honest_cpuid(supported.copy())
        if self.model in QEMU_MODELS:
            vendor, names = QEMU_MODELS[self.model]
            keep = word_mask(names + KVM_DEFAULT_ON)
            for word in FEATURE_WORDS:
                _and_word(model, word, keep[word])
            set_vendor(model, vendor)
        for name in self.plus:
            bit = QEMU_FEATURES.get(name)
            if bit is None:
                self.warnings.append(f"warning: cetvm does not support requested feature {name!r}")
            elif available.contains(bit.leaf, bit.subleaf) and available.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask:
                _or_bit(model, bit)
            else:
                self.warnings.append(f"warning: host doesn't support requested feature: "
                                     f"CPUID.{bit.leaf:02X}H:{bit.reg.name}.{name} [bit {bit.bit}]")
        for name in self.minus:
            bit = QEMU_FEATURES.get(name)
            if bit is not None and model.contains(bit.leaf, bit.subleaf):
                regs = list(model.get(bit.leaf, bit.subleaf))
                regs[bit.reg] &= ~bit.mask
                model.set(bit.leaf, bit.subleaf, *regs)
        if self.vendor:
            set_vendor(model, self.vendor)
        if self.phys_bits is not None and model.max_ext_leaf >= 0x8000_0008:
            eax, ebx, ecx, edx = model.get(0x8000_0008)
            model.set(0x8000_0008, 0, (eax & ~0xFF) | self.phys_bits, ebx, ecx, edx)
        return model

    def to_text(self) -> str:
        """The spec in ``-cpu`` syntax (round-trips through :meth:`parse`)."""
        parts = [self.model] + [f"+{n}" for n in self.plus] + [f"-{n}" for n in self.minus]
        if self.vendor:
            parts.append(f"vendor={self.vendor}")
        if self.phys_bits is not None:
            parts.append(f"phys-bits={self.phys_bits}")
        return ",".join(parts)


def _and_word(model: CpuidModel, word, mask: int) -> None:
    leaf, subleaf, reg = word
    if model.contains(leaf, subleaf):
        regs = list(model.get(leaf, subleaf))
        regs[reg] &= mask
        model.set(leaf, subleaf, *regs)


def _or_bit(model: CpuidModel, bit) -> None:
    regs = list(model.get(bit.leaf, bit.subleaf))
    regs[bit.reg] |= bit.mask
    model.set(bit.leaf, bit.subleaf, *regs)


def set_vendor(model: CpuidModel, vendor: str) -> None:
    """Leaf 0 (and 0x80000000 on AMD) vendor identification, EBX-EDX-ECX order."""
    raw = vendor.encode("latin-1")
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    eax = model.get(0)[Reg.EAX]
    model.set(0, 0, eax, ebx, ecx, edx)
    if model.max_ext_leaf:
        eax = model.get(0x8000_0000)[Reg.EAX]
        model.set(0x8000_0000, 0, eax, *((ebx, ecx, edx) if vendor == "AuthenticAMD" else (0, 0, 0)))


#: XCR0 components and the feature (QEMU name) that must be shown for each.
_XCR0_NEEDS: dict[int, str] = {
    int(XFeature.YMM): "avx", 3: "mpx", 4: "mpx", 5: "avx512f", 6: "avx512f", 7: "avx512f",
    int(XFeature.PKRU): "pku", 17: "amx-tile", 18: "amx-tile",
}
_XSS_NEEDS: dict[int, tuple[str, ...]] = {int(XFeature.CET_USER): ("shstk", "ibt"),
                                          int(XFeature.CET_KERNEL): ("shstk", "ibt")}
_XSAVE_LEAF = 0xD
_FPSSE = 0x3


def _shows(model: CpuidModel, name: str) -> bool:
    bit = QEMU_FEATURES[name]
    return model.contains(bit.leaf, bit.subleaf) and bool(model.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask)


def honest_cpuid(model: CpuidModel) -> CpuidModel:
    """Clear what the CPU cannot execute and make leaf 0xD agree (module docstring). In place;
    returns ``model``."""
    allowed = engine_feature_words()
    for word in FEATURE_WORDS:
        _and_word(model, word, allowed[word])
    fix_xsave_leaf(model)
    return model


def fix_xsave_leaf(model: CpuidModel) -> None:
    """Leaf 0xD for the features ``model`` shows (module docstring, step 2)."""
    if model.max_basic_leaf < _XSAVE_LEAF or not model.contains(_XSAVE_LEAF, 0):
        return
    if not _shows(model, "xsave"):
        for sub in range(64):
            if model.contains(_XSAVE_LEAF, sub):
                model.set(_XSAVE_LEAF, sub, 0, 0, 0, 0)
        return
    eax, _, _, edx = model.get(_XSAVE_LEAF, 0)
    xcr0 = (edx << 32 | eax)
    for comp, feature in _XCR0_NEEDS.items():
        if xcr0 >> comp & 1 and not _shows(model, feature):
            xcr0 &= ~(1 << comp)
    eax1, _, ecx1, edx1 = model.get(_XSAVE_LEAF, 1) if model.contains(_XSAVE_LEAF, 1) else (0, 0, 0, 0)
    xss = edx1 << 32 | ecx1
    for comp, features in _XSS_NEEDS.items():
        if xss >> comp & 1 and not any(_shows(model, f) for f in features):
            xss &= ~(1 << comp)
    compacted = eax1 & (QEMU_FEATURES["xsavec"].mask | QEMU_FEATURES["xsaves"].mask)
    sizes = (xstate_required_size(model, _FPSSE, False), xstate_required_size(model, xcr0, False),
             xstate_required_size(model, _FPSSE, True) if compacted else 0)
    for sub in range(2, 64):
        if model.contains(_XSAVE_LEAF, sub) and not (xcr0 | xss) >> sub & 1:
            model.set(_XSAVE_LEAF, sub, 0, 0, 0, 0)
    model.set(_XSAVE_LEAF, 0, xcr0 & 0xFFFF_FFFF, sizes[0], sizes[1], xcr0 >> 32)
    model.set(_XSAVE_LEAF, 1, eax1, sizes[2], xss & 0xFFFF_FFFF, xss >> 32)
