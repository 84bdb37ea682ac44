"""The host KVM runs on: its CPU, its kernel configuration and the vendor module's settings.

Everything KVM's capability code reads about the host is one field here, so that
:func:`cetvm.kvm.caps.kvm_caps_for_host` is a pure function of a :class:`Host`.

Kernel command line (decision, checked against Linux 6.18):

- ``ibt=off`` — Linux's ``ibt_setup()`` clears X86_FEATURE_IBT from
  boot_cpu_data; KVM's kvm_cpu_cap_init() masks its caps with boot_cpu_data, so IBT is not
  offered (review thread "KVM should honor host IBT config" in the CET virtualization review). ``ibt=warn`` keeps IBT.
- ``nousershstk`` — cpu_parse_early_param() clears X86_FEATURE_USER_SHSTK only. KVM keys on
  X86_FEATURE_SHSTK and on the host XSS, so it changes nothing KVM offers; we accept and record it.
- Any other word is ignored, as the kernel ignores parameters it does not own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cetvm import InputError
from cetvm.cpuid import resolve_model
from cetvm.cpuid.models import arch_capabilities

if TYPE_CHECKING:  # pragma: no cover
    from cetvm.cpuid.model import CpuidModel

VIRT_KINDS = ("vmx", "svm")


@dataclass(frozen=True)
class KernelCmdline:
    """The parts of the host kernel command line that matter to KVM's CET decisions."""

    ibt_off: bool = False
    nousershstk: bool = False
    #: ``kvm.force_emulation_prefix=`` (KVM module parameter given on the kernel command line)
    force_emulation_prefix: bool = False

    @classmethod
    def parse(cls, text: str) -> "KernelCmdline":
        """Parse ``ibt=`` and ``nousershstk`` the way cpu_parse_early_param()/ibt_setup() do.

        Only text before a lone ``--`` belongs to the kernel (init's arguments follow it).
        """
        words = text.split()
        if "--" in words:
            words = words[: words.index("--")]
        ibt_off = False
        nousershstk = False
        fep = False
        for word in words:
            if word.startswith("ibt="):
                value = word[4:]
                if value not in ("off", "warn"):
                    raise InputError(f"kernel command line: ibt= takes off|warn, got {value!r}")
                ibt_off = value == "off"
            elif word == "nousershstk":
                nousershstk = True
            elif word.startswith("kvm.force_emulation_prefix="):
                fep = parse_module_bool("kvm.force_emulation_prefix", word.partition("=")[2])
        return cls(ibt_off=ibt_off, nousershstk=nousershstk, force_emulation_prefix=fep)


def parse_module_bool(name: str, value: str) -> bool:
    """A boolean/integer module parameter as param_set_bool()/kstrtoint() read it (1/0, y/n)."""
    if value.lower() in ("1", "y", "yes", "on", "true"):
        return True
    if value.lower() in ("0", "n", "no", "off", "false"):
        return False
    raise InputError(f"kernel command line: {name}= takes 0 or 1, got {value!r}")


@dataclass(frozen=True)
class Host:
    """A host as KVM sees it at module load.

    ``user_shstk``: the host kernel has CONFIG_X86_USER_SHADOW_STACK (the host FPU model then
    puts CET_USER in the host IA32_XSS). ``kernel_ibt``: the host kernel has
    CONFIG_X86_KERNEL_IBT; decision: without it X86_FEATURE_IBT is a disabled feature and KVM
    does not offer IBT (same effect as ``ibt=off``). ``supervisor_shstk``: the host runs with
    S_CET.SH_STK_EN — KVM refuses to load. ``virt`` defaults from the CPU vendor.
    """

    cpu: "CpuidModel"
    kernel_cmdline: str = ""
    user_shstk: bool = True
    kernel_ibt: bool = True
    supervisor_shstk: bool = False
    virt: str = ""
    vmx_load_cet_controls: bool = True
    unrestricted_guest: bool = True
    vmx_basic_56: bool = True
    tdp: bool = True
    allow_smaller_maxphyaddr: bool = False
    #: The host CPU's IA32_ARCH_CAPABILITIES (None: the built-in model's,
    #: :func:`cetvm.cpuid.models.arch_capabilities`); KVM derives the guest's from it.
    arch_capabilities: int | None = None
    #: KVM module parameter ``force_emulation_prefix`` (also ``kvm.force_emulation_prefix=1`` in
    #: ``kernel_cmdline``): a #UD at ``ud2; .ascii "kvm"`` makes KVM emulate the next
    #: instruction (:mod:`cetvm.kvm.emulate`).
    force_emulation_prefix: bool = False
    #: kvm_intel module parameter ``nested`` (default 1): L1 may run its own VMX guests
    #: (:mod:`cetvm.kvm.nested`). Only with VMX on a CPU that has it (:attr:`nested_vmx`);
    #: cetvm has no nested SVM, so an AMD host never offers it.
    nested: bool = True
    cmdline: KernelCmdline = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cmdline", KernelCmdline.parse(self.kernel_cmdline))
        virt = self.virt or default_virt(self.cpu.vendor)
        if virt not in VIRT_KINDS:
            raise InputError(f"virt must be one of {', '.join(VIRT_KINDS)}, got {virt!r}")
        object.__setattr__(self, "virt", virt)
        if self.arch_capabilities is None:
            object.__setattr__(self, "arch_capabilities", arch_capabilities(self.cpu.name))

    @property
    def name(self) -> str:
        return self.cpu.name

    @property
    def vendor(self) -> str:
        return self.cpu.vendor

    @property
    def fep_enabled(self) -> bool:
        """kvm.force_emulation_prefix is on (set directly or on the host kernel command line)."""
        return self.force_emulation_prefix or self.cmdline.force_emulation_prefix

    @property
    def nested_vmx(self) -> bool:
        """kvm_intel is loaded with nested=1 on a CPU with VMX (vmx_set_cpu_caps then sets
        X86_FEATURE_VMX in KVM's caps)."""
        return self.nested and self.virt == "vmx" and self.cpu.has("vmx")

    @property
    def host_ibt_enabled(self) -> bool:
        """X86_FEATURE_IBT in boot_cpu_data: CPU IBT, kernel built with IBT, not ``ibt=off``."""
        return self.cpu.has("ibt") and self.kernel_ibt and not self.cmdline.ibt_off

    @classmethod
    def from_model_name(cls, name_or_path: str, **settings: object) -> "Host":
        """A host whose CPU is a built-in model name or a CPUID dump/JSON file."""
        return cls(cpu=resolve_model(name_or_path), **settings)  # type: ignore[arg-type]


def default_virt(vendor: str) -> str:
    """kvm_amd on AMD (SVM), kvm_intel everywhere else (VMX)."""
    return "svm" if vendor == "amd" else "vmx"
