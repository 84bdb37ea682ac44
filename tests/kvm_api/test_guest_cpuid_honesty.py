"""CPUID honesty: every feature a built-in model's guest CPUID shows works, and nothing the
engine cannot execute is shown (cetvm.vmm.guest_cpu.honest_cpuid, cetvm.cpu.engine_features).

For each built-in host model, the guest CPUID the VMM builds (cetvm.vmm.config.guest_cpuid) is
walked: each shown feature with MSRs must let a guest RDMSR them without #GP (kvm-unit-tests
found PDCM shown without IA32_PERF_CAPABILITIES), and each shown feature with a probe
instruction must execute it without #UD. Guests are a few bytes of machine code run at CPL0 in
64-bit mode through the KVM API (the harness of this directory); a fault lands on the IDT stub
of its vector, which halts.
"""

from __future__ import annotations

import pytest
from probe_guest import run_probe, vm_for

from cetvm.cpu.engine_features import ENGINE_FEATURE_WORDS, probe_engine_feature_words
from cetvm.cpuid import get_model, model_names
from cetvm.vmm.guest_cpu import GuestCpuSpec

MODELS = [m for m in model_names() if m != "host"]

#: MSRs each feature brings [SDM Vol. 4 Table 2-2] (x2APIC MSRs are the VMM's, tested with the
#: devices; the CET MSRs have their own tests).
FEATURE_MSRS: dict[str, tuple[int, ...]] = {
    "tsc": (0x10,),
    "apic": (0x1B,),
    "sep": (0x174, 0x175, 0x176),
    "mtrr": (0xFE, 0x2FF, 0x200, 0x201, 0x250, 0x258, 0x259, 0x268, 0x26F),
    "mce": (0x179, 0x17A),
    "mca": (0x179, 0x400, 0x401, 0x402, 0x403),
    "pat": (0x277,),
    "pdcm": (0x345,),
    "syscall": (0xC000_0081, 0xC000_0082, 0xC000_0084),
    "lm": (0xC000_0080, 0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0083),
    "rdtscp": (0xC000_0103,),
    "xsaves": (0xDA0,),
    "shstk": (0x6A0, 0x6A2, 0x6A4, 0x6A7, 0x6A8),
    "ibt": (0x6A0, 0x6A2),
    "arch-capabilities": (0x10A,),
}

#: One instruction per feature (64-bit code; RSI points at a 64-byte aligned scratch area, RCX=0).
INSTRUCTIONS: dict[str, bytes] = {
    "fpu": b"\xd9\xe8",                       # fld1
    "tsc": b"\x0f\x31",                       # rdtsc
    "cx8": b"\x0f\xc7\x0e",                   # cmpxchg8b [rsi]
    "cmov": b"\x0f\x44\xc1",                  # cmove eax, ecx
    "clflush": b"\x0f\xae\x3e",               # clflush [rsi]
    "mmx": b"\x0f\xfc\xc1",                   # paddb mm0, mm1
    "fxsr": b"\x0f\xae\x06",                  # fxsave [rsi]
    "sse": b"\x0f\x58\xc1",                   # addps xmm0, xmm1
    "sse2": b"\x66\x0f\x58\xc1",              # addpd
    "pni": b"\xf2\x0f\x7c\xc1",               # haddps
    "pclmulqdq": b"\x66\x0f\x3a\x44\xc1\x00",
    "ssse3": b"\x66\x0f\x38\x00\xc1",         # pshufb
    "cx16": b"\x48\x0f\xc7\x0e",              # cmpxchg16b [rsi]
    "sse4.1": b"\x66\x0f\x38\x40\xc1",        # pmulld
    "sse4.2": b"\xf2\x0f\x38\xf1\xc1",        # crc32 eax, ecx
    "movbe": b"\x0f\x38\xf0\x06",             # movbe eax, [rsi]
    "popcnt": b"\xf3\x0f\xb8\xc1",
    "aes": b"\x66\x0f\x38\xdc\xc1",           # aesenc
    "xsave": b"\x0f\x01\xd0",                 # xgetbv (CR4.OSXSAVE set)
    "rdrand": b"\x0f\xc7\xf0",
    "fsgsbase": b"\xf3\x48\x0f\xae\xc0",      # rdfsbase rax (CR4.FSGSBASE set)
    "bmi1": b"\xc4\xe2\x60\xf2\xc1",          # andn eax, ebx, ecx
    "bmi2": b"\xc4\xe2\x63\xf5\xc1",          # pdep eax, ebx, ecx
    "rdtscp": b"\x0f\x01\xf9",
    "lahf-lm": b"\x9f",                       # lahf in 64-bit mode
    "abm": b"\xf3\x0f\xbd\xc1",               # lzcnt
    "xsaveopt": b"\x31\xd2\xb8\x03\x00\x00\x00\x0f\xae\x36",   # xsaveopt [rsi], EDX:EAX = 3
    "xsavec": b"\x31\xd2\xb8\x03\x00\x00\x00\x0f\xc7\x26",     # xsavec [rsi]
    "xsaves": b"\x31\xd2\xb8\x03\x00\x00\x00\x0f\xc7\x2e",     # xsaves [rsi]
    "ibt": b"\xf3\x0f\x1e\xfa",               # endbr64
    "smap": b"\x0f\x01\xcb\x0f\x01\xca",       # stac; clac
    "clflushopt": b"\x66\x0f\xae\x3e",        # clflushopt [rsi]
    "clwb": b"\x66\x0f\xae\x36",              # clwb [rsi]
    "xgetbv1": b"\xb9\x01\x00\x00\x00\x0f\x01\xd0",  # mov ecx, 1; xgetbv
    "shstk": b"\xf3\x48\x0f\x1e\xc8",         # rdsspq rax
    "serialize": b"\x0f\x01\xe8",
}
def test_engine_feature_words_are_what_unicorn_reports():
    """The pinned engine set is re-measured: a different Unicorn build would change it."""
    assert probe_engine_feature_words() == ENGINE_FEATURE_WORDS


@pytest.mark.parametrize("model", MODELS)
def test_every_shown_feature_has_working_msrs(model):
    vm, vcpu, cpuid = vm_for(model)
    from cetvm.arch.qemu_features import QEMU_FEATURES
    checked = 0
    for feature, msrs in FEATURE_MSRS.items():
        bit = QEMU_FEATURES[feature]
        if not cpuid.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask:
            continue
        for index in msrs:
            assert run_probe(vm, vcpu, b"\x0f\x32", rcx=index) is None, f"{model}: RDMSR {index:#x} ({feature}) #GP"
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("model", MODELS)
def test_every_shown_feature_with_a_probe_executes(model):
    vm, vcpu, cpuid = vm_for(model)
    from cetvm.arch.qemu_features import QEMU_FEATURES
    shown = [f for f in INSTRUCTIONS
             if cpuid.get(QEMU_FEATURES[f].leaf, QEMU_FEATURES[f].subleaf)[QEMU_FEATURES[f].reg] & QEMU_FEATURES[f].mask]
    assert len(shown) >= 25
    for feature in shown:
        assert run_probe(vm, vcpu, INSTRUCTIONS[feature], rcx=0) is None, f"{model}: {feature} faulted"


def test_serialize_is_shown_on_sapphire_rapids_and_executes():
    """SERIALIZE (CPUID.(7,0):EDX[14]) is passed through as KVM does; Unicorn 2.1.4 would #UD on
    it, cetvm retires it (Linux's sync_core() uses it when shown, an IRETQ to itself otherwise)."""
    from cetvm.arch.qemu_features import QEMU_FEATURES
    bit = QEMU_FEATURES["serialize"]
    vm, vcpu, cpuid = vm_for("sapphire-rapids")
    assert cpuid.get(7, 0)[bit.reg] & bit.mask
    assert run_probe(vm, vcpu, INSTRUCTIONS["serialize"] * 3) is None
    vm, vcpu, cpuid = vm_for("zen4")
    assert not cpuid.get(7, 0)[bit.reg] & bit.mask


def test_hidden_feature_is_really_missing_from_the_engine():
    """The mask is not decorative: AVX (hidden everywhere) is #UD on this engine, and MOVBE
    (shown) is not; PDCM's MSR without PDCM in CPUID is #GP as KVM does."""
    vm, vcpu, cpuid = vm_for("sapphire-rapids")
    assert not cpuid.has("avx") and not cpuid.has("pdcm")
    assert run_probe(vm, vcpu, b"\xc5\xf4\x58\xc2") == 6  # vaddps ymm0, ymm1, ymm2
    assert run_probe(vm, vcpu, b"\x0f\x32", rcx=0x345) == 13  # IA32_PERF_CAPABILITIES without PDCM


def test_userspace_pdcm_gives_perf_capabilities_zero():
    """KVM_SET_CPUID2 with PDCM (userspace may set any CPUID): the guest reads KVM's
    perf_capabilities, 0 without a vPMU; only userspace writes it, and only 0."""
    vm, vcpu, cpuid = vm_for("sapphire-rapids")
    cpuid.set_feature("pdcm", True)
    vcpu.set_cpuid(cpuid)
    assert run_probe(vm, vcpu, b"\x0f\x32", rcx=0x345, rax=0x1234, rdx=0x5678) is None
    assert vcpu.get_regs().rax == 0 and vcpu.get_regs().rdx == 0
    assert run_probe(vm, vcpu, b"\x0f\x30", rcx=0x345, rax=0, rdx=0) == 13
    assert vcpu.set_msrs([(0x345, 0)]) == 1 and vcpu.set_msrs([(0x345, 1)]) == 0


@pytest.mark.parametrize("model, meltdown", [("sapphire-rapids", False), ("skylake-sp", True), ("zen4", False)])
def test_arch_capabilities_tell_the_guest_what_the_host_is_not_susceptible_to(model, meltdown):
    """KVM emulates IA32_ARCH_CAPABILITIES on every host (CPUID.(7,0).EDX[29] always shown):
    RDCL_NO exactly when the host is not susceptible to Meltdown (so a Linux guest skips page-
    table isolation), never IBRS_ALL (cetvm's CPU has no IA32_SPEC_CTRL). Guests only read it;
    userspace writes a subset of KVM's value."""
    vm, vcpu, cpuid = vm_for(model)
    assert cpuid.has("arch_capabilities")
    assert run_probe(vm, vcpu, b"\x0f\x32", rcx=0x10A) is None
    value = vcpu.get_regs().rax | vcpu.get_regs().rdx << 32
    assert bool(value & 1) is not meltdown and not value & 2
    assert dict(vcpu.get_msrs([0x10A])) == {0x10A: value}
    assert run_probe(vm, vcpu, b"\x0f\x30", rcx=0x10A, rax=0, rdx=0) == 13
    assert vcpu.set_msrs([(0x10A, value & ~1)]) == 1 and vcpu.set_msrs([(0x10A, 2)]) == 0
    assert 0x10A in vm.kvm.get_msr_index_list()


def test_mtrr_and_mce_msr_rules():
    vm, vcpu, _ = vm_for("sapphire-rapids")
    wrmsr = b"\x0f\x30"
    assert run_probe(vm, vcpu, wrmsr, rcx=0x2FF, rax=0xC06, rdx=0) is None  # E | FE | WB
    assert run_probe(vm, vcpu, wrmsr, rcx=0x2FF, rax=0x2, rdx=0) == 13      # type 2 is reserved
    assert run_probe(vm, vcpu, wrmsr, rcx=0xFE, rax=0, rdx=0) == 13         # MTRRcap is read-only
    assert run_probe(vm, vcpu, wrmsr, rcx=0x400, rax=0x1, rdx=0) == 13      # MC0_CTL: 0 or all ones
    assert run_probe(vm, vcpu, wrmsr, rcx=0x401, rax=0x1, rdx=0) == 13      # MC0_STATUS: guest writes 0 only
    assert run_probe(vm, vcpu, b"\x0f\x32", rcx=0x17B) == 13                # no MCG_CTL without MCG_CTL_P
    assert dict(vcpu.get_msrs([0x2FF, 0xFE, 0x179])) == {0x2FF: 0xC06, 0xFE: 0x508, 0x179: 32}


def test_vmmcall_is_a_hypercall_on_intel():
    """kvm-unit-tests' hypercall: VMMCALL (AMD's encoding) on an Intel host is KVM's hypercall
    too (#UD intercepted, em_hypercall): RAX = -KVM_ENOSYS for an unknown call, no #UD."""
    vm, vcpu, _ = vm_for("sapphire-rapids")
    assert run_probe(vm, vcpu, b"\x0f\x01\xd9", rax=0xFFFF_FFFF_FFFF_FFFF) is None
    assert vcpu.get_regs().rax == (-1000) & 0xFFFF_FFFF_FFFF_FFFF


def test_cr4_bits_of_hidden_features_are_reserved():
    """kvm-unit-tests' pcid/la57/lam/umip: MOV to CR4 setting a bit whose feature the guest
    CPUID lacks is #GP(0) (KVM's __cr4_reserved_bits); shown features' bits are accepted."""
    vm, vcpu, cpuid = vm_for("sapphire-rapids")
    assert not cpuid.has("pcid") and cpuid.has("smep") and cpuid.has("smap")
    mov_cr4 = b"\x0f\x20\xe0\x48\x09\xd8\x0f\x22\xe0"  # mov rax, cr4; or rax, rbx; mov cr4, rax
    for bit in (17, 12, 11, 28, 24, 22, 19, 14):  # PCIDE LA57 UMIP LAM_SUP PKS PKE KL SMXE
        assert run_probe(vm, vcpu, mov_cr4, rbx=1 << bit) == 13, f"CR4 bit {bit}"
    assert run_probe(vm, vcpu, mov_cr4, rbx=1 << 20 | 1 << 21) is None  # SMEP and SMAP are shown
    assert cpuid.has("vmx")  # kvm_intel nested=1: VMX is shown, CR4.VMXE accepted
    assert run_probe(vm, vcpu, mov_cr4, rbx=1 << 13) is None


def test_qemu64_spec_keeps_only_its_features_and_warns_for_the_impossible():
    spec = GuestCpuSpec.parse("qemu64,+x2apic,+la57,+tsc-deadline,-pcid,vendor=GenuineIntel")
    _, _, cpuid = vm_for("sapphire-rapids", spec.to_text())
    assert cpuid.vendor_string == "GenuineIntel"
    assert cpuid.has("x2apic") and cpuid.has("sse2") and cpuid.has("lm")
    assert not cpuid.has("xsave") and not cpuid.has("shstk") and not cpuid.has("fsgsbase")
    assert cpuid.get(0xD, 0) == (0, 0, 0, 0)  # no XSAVE: empty leaf 0xD
    assert cpuid.get(1, 0)[2] >> 24 & 1  # tsc-deadline kept
    spec.apply(get_model("sapphire-rapids"))
    assert any("la57" in w for w in spec.warnings)
    assert not any("tsc-deadline" in w for w in spec.warnings)  # the VMM's APIC implements it
