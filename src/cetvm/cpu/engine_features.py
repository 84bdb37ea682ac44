"""Which CPUID features cetvm's CPU can execute: the engine's own set plus what cetvm emulates.

The "hardware" under cetvm is Unicorn 2.1.4 (QEMU 5.0's TCG) with the CPU model
:data:`ENGINE_CPU_MODEL` (Icelake-Server: the richest model whose features TCG 5.0 keeps —
SMAP, PKU, LA57, CLFLUSHOPT, CLWB, 1-GiB pages, XGETBV1 on top of the default Haswell's), and
TCG implements an instruction only when that model's CPUID shows it (QEMU 5.0's
x86 translator tests ``s->cpuid_*_features`` before decoding BMI, MOVBE, POPCNT, ...;
cpu_x86_update_cr4 silently drops CR4.SMAP / CR4.PKE when the model lacks SMAP / PKU). So the
features the engine can execute are exactly the ones its CPUID instruction reports:
:data:`ENGINE_FEATURE_WORDS`, measured with :func:`probe_engine_feature_words` and pinned here
(a test re-measures them, as the other Unicorn internals cetvm relies on are self-checked).

cetvm's own parts narrow that set (:data:`CETVM_LACKS`): its page walker is 4-level (no LA57),
and its XSAVEC/XSAVES emulation does not cover the PKRU component (no PKU).

On top, cetvm implements some features itself (:data:`CETVM_FEATURES`): SHSTK and IBT (the CET
layer), XSAVEC/XSAVES (:mod:`cetvm.cpu.xsave`), x2APIC and TSC-deadline (the VMM's local APIC
through MSR exits, counting the TSC of :mod:`cetvm.cpu.tsc`), SERIALIZE (emulated: Unicorn 2.1.4
does not decode it), the hypervisor bit, ARCH_CAPABILITIES (an MSR KVM emulates) and VMX (its
instructions exit, :mod:`cetvm.cpu.vmx_insn`; the hypervisor emulates them for L1). The guest CPUID is masked with :func:`engine_feature_words` the way QEMU
masks a TCG guest with its TCG_*_FEATURES (x86_cpu_filter_features).
"""

from __future__ import annotations

from cetvm.arch.qemu_features import FEATURE_WORDS, QEMU_FEATURES, FeatureWord, word_mask
from cetvm.arch.cpuid_bits import Reg
from cetvm.arch.msr import Msr

#: Runtime (dynamic) bits the engine's CPUID shows that are not features: OSXSAVE (1.ECX[27]).
_DYNAMIC_BITS: dict[FeatureWord, int] = {(1, 0, Reg.ECX): 1 << 27}

#: The Unicorn CPU model cetvm's vCPUs run (``uc.ctl_set_cpu_model``), see the module docstring.
ENGINE_CPU_MODEL = "UC_CPU_X86_ICELAKE_SERVER"

#: What Unicorn 2.1.4's CPUID reports in each feature word with :data:`ENGINE_CPU_MODEL` (after
#: TCG filtering; OSXSAVE removed). Measured by :func:`probe_engine_feature_words`.
ENGINE_FEATURE_WORDS: dict[FeatureWord, int] = {
    (1, 0, Reg.EDX): 0x078B_FBFD,
    (1, 0, Reg.ECX): 0xC6D8_2203,
    (7, 0, Reg.EBX): 0x0198_0389,
    (7, 0, Reg.ECX): 0x0001_0008,
    (7, 0, Reg.EDX): 0,
    (7, 1, Reg.EAX): 0,
    (0xD, 1, Reg.EAX): 0x0000_0005,
    (0x8000_0001, 0, Reg.EDX): 0x2C10_0800,
    (0x8000_0001, 0, Reg.ECX): 0x0000_0021,
}

#: The MSRs the engine (Unicorn 2.1.4) implements. RDMSR/WRMSR of any other index that is not a
#: CET MSR, IA32_XSS or intercepted raises #GP(0), as on a CPU without that MSR (Unicorn itself
#: drops writes and reads zeros for unknown ones).
ENGINE_MSRS: frozenset[int] = frozenset(int(m) for m in (
    Msr.IA32_SYSENTER_CS, Msr.IA32_SYSENTER_ESP, Msr.IA32_SYSENTER_EIP, Msr.IA32_PAT, Msr.IA32_APIC_BASE,
    Msr.IA32_EFER, Msr.IA32_STAR, Msr.IA32_LSTAR, Msr.IA32_CSTAR, Msr.IA32_FMASK, Msr.IA32_FS_BASE,
    Msr.IA32_GS_BASE, Msr.IA32_KERNEL_GS_BASE, Msr.IA32_TSC_AUX, Msr.IA32_TIME_STAMP_COUNTER,
))

#: Engine features cetvm's own parts cannot back (module docstring), by QEMU name.
CETVM_LACKS: tuple[str, ...] = ("la57", "pku")

#: Features cetvm implements around the engine (module docstring), by QEMU name.
CETVM_FEATURES: tuple[str, ...] = ("shstk", "ibt", "xsavec", "xsaves", "x2apic", "tsc-deadline", "hypervisor",
                                   "serialize", "arch-capabilities", "vmx")


def engine_feature_words() -> dict[FeatureWord, int]:
    """Per feature word, the bits a guest CPUID may show: the engine's plus cetvm's own."""
    extra, lacks = word_mask(CETVM_FEATURES), word_mask(CETVM_LACKS)
    return {w: (ENGINE_FEATURE_WORDS[w] & ~lacks[w]) | extra[w] for w in FEATURE_WORDS}


def engine_cpu_model() -> int:
    """The Unicorn constant of :data:`ENGINE_CPU_MODEL`."""
    from unicorn import x86_const as X

    return getattr(X, ENGINE_CPU_MODEL)


def engine_can_execute(name: str) -> bool:
    """True if a QEMU-named feature may be shown to a guest (engine or cetvm implements it)."""
    bit = QEMU_FEATURES[name]
    return bool(engine_feature_words()[(bit.leaf, bit.subleaf, bit.reg)] & bit.mask)


def probe_engine_feature_words() -> dict[FeatureWord, int]:
    """Run CPUID in a scratch Unicorn (the same engine and model cetvm uses) and return
    what it reports per feature word, runtime bits removed."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn import x86_const as X

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(engine_cpu_model())
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\x0f\xa2")  # CPUID
    out: dict[FeatureWord, int] = {}
    for leaf, subleaf, reg in FEATURE_WORDS:
        uc.reg_write(X.UC_X86_REG_RAX, leaf)
        uc.reg_write(X.UC_X86_REG_RCX, subleaf)
        uc.emu_start(0, 2)
        regs = [uc.reg_read(r) & 0xFFFF_FFFF for r in (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX,
                                                          X.UC_X86_REG_EDX)]
        out[(leaf, subleaf, reg)] = regs[reg] & ~_DYNAMIC_BITS.get((leaf, subleaf, reg), 0)
    return out
