"""What a cetvm machine is made of: :class:`MachineConfig`, and the guest CPUID it implies.

The CPU model names the *host* the modeled KVM runs on (default: a Sapphire Rapids); the guest
sees what that KVM supports (KVM_GET_SUPPORTED_CPUID, as ``qemu -cpu host`` does), minus the CET
features the ``cet`` setting hides:

======  ==============================================================================
cet     guest CPUID
======  ==============================================================================
on      SHSTK and IBT as KVM supports them on the host
shstk   IBT cleared (CPUID.(7,0).EDX[20])
ibt     SHSTK cleared (CPUID.(7,0).ECX[7])
off     both cleared, and the CET_U/CET_S bits of CPUID.(0xD,1).ECX with their 0xD.11/0xD.12
        sub-leaves zeroed (decision: what QEMU does for XSS components the guest cannot
        enable; KVM_SET_CPUID2 accepts any table [reference §5 "Userspace may set any CPUID"])
======  ==============================================================================

With ``shstk`` or ``ibt`` the XSS bits stay: IBT alone still uses U_CET/S_CET, and U_CET lives
in the CET_U component [reference §1, §5].

The VMM then fills in what only it knows, as QEMU's cpu_x86_cpuid / kvm_arch_init_vcpu do
(:func:`vmm_cpuid_leaves`): the vCPU's topology and the hypervisor leaves.

- CPUID.1: EBX[31:24] = initial APIC ID, EBX[23:16] = 0 and EDX[28] (HTT) = 0 for one logical
  processor per package (QEMU sets both only for more than one); CLFLUSH size kept.
- CPUID.0xB and 0x1F (when the maximum basic leaf reaches them): one SMT level and one core
  level with one logical processor each, shift 0, EDX = x2APIC ID; sub-leaf 2 is the invalid
  level (ECX[15:8] = 0) that ends enumeration, with ECX[7:0] = the sub-leaf.
- CPUID.0x40000000: EAX = 0x40000001 (the highest hypervisor leaf), EBX:ECX:EDX =
  "KVMKVMKVM\0\0\0"; CPUID.0x40000001 (KVM_CPUID_FEATURES) = 0: cetvm offers no paravirtual
  features. KVM_GET_SUPPORTED_CPUID does not return these leaves (they are in
  KVM_GET_SUPPORTED_HV_CPUID / built by userspace), so they belong to the VMM. CPUID.1.ECX[31]
  ("hypervisor present") comes from KVM's supported table.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Callable

from cetvm import InputError
from cetvm.arch.cpuid_bits import IBT, SHSTK
from cetvm.arch.xfeatures import XFeature
from cetvm.cpuid import CpuidModel, resolve_model
from cetvm.kvm import Host
from cetvm.vmm.guest_cpu import GuestCpuSpec, fix_xsave_leaf, honest_cpuid
from cetvm.vmm.layout import MiB, check_ram_size

DEFAULT_CPU_MODEL = "sapphire-rapids"
DEFAULT_MEMORY_SIZE = 256 * MiB
XSAVE_LEAF = 0xD


#: The most vCPUs a machine may have (``--smp`` / ``-smp``).
MAX_VCPUS = 8


def check_vcpu_count(value: object) -> int:
    """The vCPU count as an int in 1..MAX_VCPUS, or an InputError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
        raise InputError(f"the vCPU count must be an integer from 1 to {MAX_VCPUS}, got {value!r}")
    return value


class CetMode(enum.Enum):
    """Which CET features the guest CPUID shows (``--cet``)."""

    ON = "on"
    OFF = "off"
    SHSTK = "shstk"
    IBT = "ibt"

    @property
    def shows_shstk(self) -> bool:
        return self in (CetMode.ON, CetMode.SHSTK)

    @property
    def shows_ibt(self) -> bool:
        return self in (CetMode.ON, CetMode.IBT)

    @classmethod
    def parse(cls, text: str | "CetMode") -> "CetMode":
        if isinstance(text, CetMode):
            return text
        try:
            return cls(str(text).lower())
        except ValueError:
            raise InputError(f"--cet takes one of {', '.join(m.value for m in cls)}, got {text!r}") from None


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory_size(text: str | int) -> int:
    """``256M``, ``1G``, ``512MiB``, ``4194304`` → bytes (QEMU ``-m`` style: binary units; a bare
    number is bytes), checked by :func:`cetvm.vmm.layout.check_ram_size`."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise InputError(f"memory size {text!r}: expected a number with an optional K, M, G or T "
                             "suffix (e.g. 256M)")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    check_ram_size(size)
    return size


def _clear_xss_component(model: CpuidModel, component: XFeature) -> None:
    """Drop an XSS component from CPUID.(0xD,1).ECX and zero its 0xD.n sub-leaf."""
    if model.contains(XSAVE_LEAF, 1):
        eax, ebx, ecx, edx = model.get(XSAVE_LEAF, 1)
        model.set(XSAVE_LEAF, 1, eax, ebx, ecx & ~component.mask & 0xFFFF_FFFF, edx)
    if model.contains(XSAVE_LEAF, int(component)):
        model.set(XSAVE_LEAF, int(component), 0, 0, 0, 0)


KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_CPUID_FEATURES = 0x4000_0001
#: "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
KVM_SIGNATURE_REGS = (0x4B4D564B, 0x564B4D56, 0x0000004D)
_HTT = 1 << 28
_LEVEL_SMT, _LEVEL_CORE = 1, 2


def topology_leaf(model: CpuidModel, leaf: int, apic_id: int) -> None:
    """CPUID.0xB / 0x1F for one logical processor (module docstring)."""
    model.set(leaf, 0, 0, 1, _LEVEL_SMT << 8, apic_id)
    model.set(leaf, 1, 0, 1, 1 | _LEVEL_CORE << 8, apic_id)
    model.set(leaf, 2, 0, 0, 2, apic_id)


def vmm_cpuid_leaves(model: CpuidModel, apic_id: int = 0) -> CpuidModel:
    """Topology and hypervisor leaves the VMM adds to the guest CPUID (module docstring)."""
    if model.contains(1, 0):
        eax, ebx, ecx, edx = model.get(1, 0)
        model.set(1, 0, eax, (apic_id & 0xFF) << 24 | (ebx & 0xFFFF), ecx, edx & ~_HTT)
    for leaf in (0xB, 0x1F):
        if model.max_basic_leaf >= leaf:
            topology_leaf(model, leaf, apic_id)
    model.set(KVM_CPUID_SIGNATURE, 0, KVM_CPUID_FEATURES, *KVM_SIGNATURE_REGS)
    model.set(KVM_CPUID_FEATURES, 0, 0, 0, 0, 0)
    return model


def guest_cpuid(supported: CpuidModel, cet: CetMode, spec: GuestCpuSpec | None = None) -> CpuidModel:
    """The guest CPUID for ``cet`` from KVM's supported CPUID (module docstring table): the
    VMM's leaves, the ``-cpu`` spec (:class:`~cetvm.vmm.guest_cpu.GuestCpuSpec`, default
    ``host``), then :func:`~cetvm.vmm.guest_cpu.honest_cpuid` (nothing the CPU cannot execute
    is shown), then the CET setting."""
    model = vmm_cpuid_leaves(supported.copy())
    if spec is not None:
        model = spec.apply(model)
    honest_cpuid(model)
    if not cet.shows_shstk:
        model.set_feature(SHSTK.name, False)
    if not cet.shows_ibt:
        model.set_feature(IBT.name, False)
    if cet is CetMode.OFF:
        _clear_xss_component(model, XFeature.CET_USER)
        _clear_xss_component(model, XFeature.CET_KERNEL)
        fix_xsave_leaf(model)
    return model


@dataclass
class MachineConfig:
    """Everything needed to build a machine (and to rebuild it from a snapshot).

    ``cpu``: the host CPU (a built-in model name, a CPUID dump file, or a CpuidModel); ignored
    when ``host`` is given. ``memory``: RAM bytes (or "256M"). ``cet``: see :class:`CetMode`.
    ``cmdline``: the kernel command line (multiboot). ``modules``: multiboot module files
    (``initrd`` is the first). ``serial_sink``: receives every byte the guest writes to COM1.
    ``smp``: the number of vCPUs, 1 to :data:`MAX_VCPUS` (QEMU ``-smp N``). ``guest_cpu``: the
    guest CPU in QEMU ``-cpu`` syntax (:class:`~cetvm.vmm.guest_cpu.GuestCpuSpec`; "" or
    ``host`` = everything KVM offers that the CPU can execute).
    """

    cpu: str | CpuidModel = DEFAULT_CPU_MODEL
    memory: int | str = DEFAULT_MEMORY_SIZE
    cet: CetMode | str = CetMode.ON
    cmdline: str = ""
    modules: tuple[str, ...] = ()
    host: Host | None = None
    smp: int = 1
    guest_cpu: str = ""
    serial_sink: Callable[[bytes], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.memory = parse_memory_size(self.memory)
        self.cet = CetMode.parse(self.cet)
        self.modules = tuple(str(m) for m in self.modules)
        self.smp = check_vcpu_count(self.smp)
        self.guest_cpu_spec = GuestCpuSpec.parse(self.guest_cpu) if self.guest_cpu else None

    @property
    def memory_size(self) -> int:
        assert isinstance(self.memory, int)
        return self.memory

    @property
    def cet_mode(self) -> CetMode:
        assert isinstance(self.cet, CetMode)
        return self.cet

    def make_host(self) -> Host:
        """The Host KVM loads on (a default-configured host of the ``cpu`` model)."""
        if self.host is not None:
            return self.host
        model = self.cpu if isinstance(self.cpu, CpuidModel) else resolve_model(self.cpu)
        return Host(cpu=model)

    @property
    def cpu_name(self) -> str:
        if self.host is not None:
            return self.host.name
        return self.cpu.name if isinstance(self.cpu, CpuidModel) else str(self.cpu)

    def to_manifest(self) -> dict:
        """The JSON part a snapshot records (a custom Host or CpuidModel is stored as its CPUID)."""
        doc: dict = {"memory": self.memory_size, "cet": self.cet_mode.value, "cmdline": self.cmdline,
                     "modules": list(self.modules)}
        if self.guest_cpu:
            doc["guest_cpu"] = self.guest_cpu
        if self.host is None and isinstance(self.cpu, str):
            doc["cpu"] = self.cpu
        else:
            host = self.make_host()
            doc["cpu_model"] = host.cpu.to_json()
            if self.host is not None:
                doc["host"] = {"kernel_cmdline": host.kernel_cmdline, "user_shstk": host.user_shstk,
                               "kernel_ibt": host.kernel_ibt, "virt": host.virt}
        return doc

    @classmethod
    def from_manifest(cls, doc: dict, serial_sink: Callable[[bytes], None] | None = None) -> "MachineConfig":
        """Inverse of :meth:`to_manifest` (bad fields are InputError)."""
        if not isinstance(doc, dict):
            raise InputError("snapshot machine config must be an object")
        try:
            if "cpu_model" in doc:
                model = CpuidModel.from_json(doc["cpu_model"], source="snapshot")
                host_doc = doc.get("host")
                host = Host(cpu=model, **host_doc) if isinstance(host_doc, dict) else None
                cpu: str | CpuidModel = model
            else:
                cpu, host = str(doc["cpu"]), None
            return cls(cpu=cpu, memory=int(doc["memory"]), cet=str(doc["cet"]), cmdline=str(doc.get("cmdline", "")),
                       modules=tuple(doc.get("modules", ())), host=host, guest_cpu=str(doc.get("guest_cpu", "")),
                       serial_sink=serial_sink)
        except KeyError as exc:
            raise InputError(f"snapshot machine config has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"snapshot machine config is invalid: {exc}") from None
