"""CPUID feature flags by QEMU's names (``-cpu MODEL,+name,-name``) [QEMU's
``feature_word_info``; SDM Vol. 2A "CPUID"].

Facts only: which CPUID bit each QEMU feature name stands for, for the feature words cetvm's
guest CPUID carries (leaf 1 ECX/EDX, 7.0 EBX/ECX/EDX, 7.1 EAX, 0xD.1 EAX, 0x80000001 ECX/EDX).
Aliases QEMU accepts (``sse3`` for ``pni``, ``lahf_lm`` for ``lahf-lm``, underscores for
dashes) are folded by :func:`qemu_feature`.
"""

from __future__ import annotations

from cetvm.arch.cpuid_bits import CpuidBit, Reg

#: A feature word: (leaf, subleaf, register).
FeatureWord = tuple[int, int, Reg]

W_1_EDX: FeatureWord = (1, 0, Reg.EDX)
W_1_ECX: FeatureWord = (1, 0, Reg.ECX)
W_7_0_EBX: FeatureWord = (7, 0, Reg.EBX)
W_7_0_ECX: FeatureWord = (7, 0, Reg.ECX)
W_7_0_EDX: FeatureWord = (7, 0, Reg.EDX)
W_7_1_EAX: FeatureWord = (7, 1, Reg.EAX)
W_XSAVE: FeatureWord = (0xD, 1, Reg.EAX)
W_8000_0001_EDX: FeatureWord = (0x8000_0001, 0, Reg.EDX)
W_8000_0001_ECX: FeatureWord = (0x8000_0001, 0, Reg.ECX)

#: The feature words cetvm filters, in QEMU's FeatureWord order.
FEATURE_WORDS: tuple[FeatureWord, ...] = (W_1_EDX, W_1_ECX, W_7_0_EBX, W_7_0_ECX, W_7_0_EDX, W_7_1_EAX,
                                          W_XSAVE, W_8000_0001_EDX, W_8000_0001_ECX)

_NAMES: dict[FeatureWord, tuple[str | None, ...]] = {
    W_1_EDX: ("fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", None, "sep", "mtrr", "pge",
              "mca", "cmov", "pat", "pse36", "pn", "clflush", None, "ds", "acpi", "mmx", "fxsr", "sse", "sse2",
              "ss", "ht", "tm", "ia64", "pbe"),
    W_1_ECX: ("pni", "pclmulqdq", "dtes64", "monitor", "ds-cpl", "vmx", "smx", "est", "tm2", "ssse3", "cid",
              None, "fma", "cx16", "xtpr", "pdcm", None, "pcid", "dca", "sse4.1", "sse4.2", "x2apic", "movbe",
              "popcnt", "tsc-deadline", "aes", "xsave", None, "avx", "f16c", "rdrand", "hypervisor"),
    W_7_0_EBX: ("fsgsbase", "tsc-adjust", "sgx", "bmi1", "hle", "avx2", None, "smep", "bmi2", "erms", "invpcid",
                "rtm", None, None, "mpx", None, "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma",
                "pcommit", "clflushopt", "clwb", "intel-pt", "avx512pf", "avx512er", "avx512cd", "sha-ni",
                "avx512bw", "avx512vl"),
    W_7_0_ECX: (None, "avx512vbmi", "umip", "pku", None, "waitpkg", "avx512vbmi2", "shstk", "gfni", "vaes",
                "vpclmulqdq", "avx512vnni", "avx512bitalg", None, "avx512-vpopcntdq", None, "la57", None, None,
                None, None, None, "rdpid", None, "bus-lock-detect", "cldemote", None, "movdiri", "movdir64b",
                None, "sgxlc", "pks"),
    W_7_0_EDX: (None, None, "avx512-4vnniw", "avx512-4fmaps", "fsrm", None, None, None, "avx512-vp2intersect",
                None, "md-clear", None, None, None, "serialize", None, "tsx-ldtrk", None, None, None, "ibt",
                None, "amx-bf16", "avx512-fp16", "amx-tile", "amx-int8", "spec-ctrl", "stibp", "flush-l1d",
                "arch-capabilities", "core-capability", "ssbd"),
    W_7_1_EAX: (None, None, None, None, "avx-vnni", "avx512-bf16", None, None, None, None, "fzrm", "fsrs",
                "fsrc", None, None, None, None, None, None, None, None, None, "amx-fp16", None, None, None,
                "lam", None, None, None, None, None),
    W_XSAVE: ("xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd") + (None,) * 27,
    W_8000_0001_EDX: (None,) * 11 + ("syscall",) + (None,) * 8 + ("nx", None, "mmxext", None, None, "fxsr-opt",
                                                                  "pdpe1gb", "rdtscp", None, "lm", "3dnowext",
                                                                  "3dnow"),
    W_8000_0001_ECX: ("lahf-lm", "cmp-legacy", "svm", "extapic", "cr8legacy", "abm", "sse4a", "misalignsse",
                      "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", None, "lwp", "fma4", "tce", None,
                      "nodeid-msr", None, "tbm", "topoext", "perfctr-core", "perfctr-nb") + (None,) * 7,
}

#: Every named QEMU feature flag cetvm knows, by its canonical QEMU name.
QEMU_FEATURES: dict[str, CpuidBit] = {
    name: CpuidBit(name, word[0], word[1], word[2], bit)
    for word, names in _NAMES.items() for bit, name in enumerate(names) if name
}

_ALIASES = {"sse3": "pni", "xd": "nx", "i64": "lm", "lahf_lm": "lahf-lm", "sse4_1": "sse4.1",
            "sse4_2": "sse4.2", "tsc_deadline": "tsc-deadline", "cet-ss": "shstk", "cet-ibt": "ibt",
            "ds_cpl": "ds-cpl", "fxsr_opt": "fxsr-opt", "tsc_adjust": "tsc-adjust"}

#: QEMU feature names of words cetvm's guest never has (SVM leaf 0x8000000A, VMX capability
#: MSRs, paravirtual and Hyper-V flags): accepted on a ``-cpu`` line, never shown.
NEVER_SHOWN_PREFIXES = ("vmx-", "hv-", "hv_", "kvm-", "kvm_")
NEVER_SHOWN = frozenset({"npt", "lbrv", "svm-lock", "nrip-save", "tsc-scale", "vmcb-clean", "flushbyasid",
                         "decodeassists", "pause-filter", "pfthreshold", "avic", "v-vmsave-vmload", "vgif",
                         "vnmi", "kvmclock", "kvm-pv-eoi", "x2apic-api", "invtsc", "arat", "pmu"})


def canonical_feature_name(name: str) -> str:
    """QEMU's spelling of a feature name (aliases folded, lower case)."""
    lowered = name.lower()
    if lowered in _ALIASES:
        return _ALIASES[lowered]
    dashed = lowered.replace("_", "-")
    return _ALIASES.get(dashed, dashed if dashed in QEMU_FEATURES else lowered)


def qemu_feature(name: str) -> CpuidBit | None:
    """The CPUID bit of a QEMU feature name, or None if cetvm does not know the name."""
    return QEMU_FEATURES.get(canonical_feature_name(name))


def never_shown(name: str) -> bool:
    """True for a QEMU feature name cetvm accepts but never shows (see :data:`NEVER_SHOWN`)."""
    lowered = name.lower()
    return lowered in NEVER_SHOWN or lowered.startswith(NEVER_SHOWN_PREFIXES)


def word_mask(names: "tuple[str, ...] | list[str]") -> dict[FeatureWord, int]:
    """Feature-word masks of a list of QEMU feature names (every name must be known)."""
    masks: dict[FeatureWord, int] = {w: 0 for w in FEATURE_WORDS}
    for name in names:
        bit = QEMU_FEATURES[name]
        masks[(bit.leaf, bit.subleaf, bit.reg)] |= bit.mask
    return masks
