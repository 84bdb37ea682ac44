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
        enable; KVM_SET_CPUID2 accepts any table (kvm_set_cpuid() checks only KVM's own safety))
======  ==============================================================================

With ``shstk`` or ``ibt`` the XSS bits stay: IBT alone still uses U_CET/S_CET, and U_CET lives
in the CET_U component [SDM Vol. 1 §13.5.6].

The VMM then fills in what only it knows, as QEMU's cpu_x86_cpuid / kvm_arch_init_vcpu do
(:func:`vmm_cpuid_leaves`): the vCPU's topology and the hypervisor leaves.

The topology of ``smp`` = N vCPUs is one package of N cores with one thread each (QEMU's
``-smp N`` since 6.2 prefers cores to sockets); vCPU i has APIC ID i.

- CPUID.1: EBX[31:24] = initial APIC ID; for N > 1 EBX[23:16] = N (logical processors per
  package) and EDX[28] (HTT) = 1; for one vCPU both 0 (QEMU sets them only for more than one);
  CLFLUSH size kept.
- CPUID.4 (when present): EAX[31:26] = N - 1 (cores per package - 1) on every sub-leaf.
- CPUID.0xB and 0x1F (when the maximum basic leaf reaches them): the SMT level (shift 0, one
  logical processor) and the core level (shift = bits to number N cores, N logical
  processors), EDX = x2APIC ID; sub-leaf 2 is the invalid level (ECX[15:8] = 0) that ends
  enumeration, with ECX[7:0] = the sub-leaf.
- CPUID.0x40000000: EAX = 0x40000001 (the highest hypervisor leaf), EBX:ECX:EDX =
  "KVMKVMKVM\0\0\0"; CPUID.0x40000001 (KVM_CPUID_FEATURES): EAX = the paravirtual features the
  modeled KVM implements (:data:`cetvm.kvm.timekeeping.KVM_PV_FEATURES`: kvmclock through the
  "_NEW" MSRs and its stable bit), EBX..EDX = 0. KVM_GET_SUPPORTED_CPUID does not return these
  leaves here (they are in KVM_GET_SUPPORTED_HV_CPUID / built by userspace), so they belong to
  the VMM. CPUID.1.ECX[31] ("hypervisor present") comes from KVM's supported table.
- CPUID.15H / 16H (Intel only, when the maximum basic leaf reaches them): the TSC frequency KVM
  gives the guest (KVM_GET_TSC_KHZ, 2 GHz) as crystal x 2/1 with the crystal = the local APIC
  timer's 1 GHz bus (as QEMU sets ECX to its apic_bus_freq: Linux's native_calibrate_tsc also
  derives the APIC timer period from the crystal), and 16H with base = maximum = 2000 MHz and a
  1000 MHz bus — so Linux knows both rates without calibrating them. AMD models keep 15H/16H as
  they are (Linux reads the TSC rate from kvmclock there).
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from cetvm import InputError
from cetvm.arch.cpuid_bits import IBT, SHSTK
from cetvm.arch.xfeatures import XFeature
from cetvm.cpuid import HOST_MODEL, CpuidModel, model_names, resolve_model
from cetvm.kvm import Host
from cetvm.arch.timekeeping import TscFrequencyLeaves
from cetvm.kvm.api import KVM_MAX_VCPUS
from cetvm.kvm.timekeeping import DEFAULT_REALTIME_BASE_NS, DEFAULT_TSC_KHZ, KVM_PV_FEATURES
from cetvm.vmm.guest_cpu import GuestCpuSpec, fix_xsave_leaf, honest_cpuid
from cetvm.vmm.layout import MiB, check_ram_size

DEFAULT_CPU_MODEL = "sapphire-rapids"
DEFAULT_MEMORY_SIZE = 256 * MiB
XSAVE_LEAF = 0xD


#: The most vCPUs a machine may have (``--smp`` / ``-smp``): what its KVM allows.
MAX_VCPUS = KVM_MAX_VCPUS


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


def parse_wall_clock(value: str | int) -> int:
    """``wall_clock`` (see :class:`MachineConfig`) → ns since the Unix epoch."""
    if value == "fixed":
        return DEFAULT_REALTIME_BASE_NS
    if value == "host":
        return time.time_ns()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise InputError(f"wall clock must be 'fixed', 'host' or ns since 1970 (0..2^64-1), got {value!r}")
    return value


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
#: The crystal and bus clocks CPUID 15H/16H name (module docstring).
TSC_LEAVES = TscFrequencyLeaves(DEFAULT_TSC_KHZ, crystal_hz=1_000_000_000, bus_mhz=1000)
_LEVEL_SMT, _LEVEL_CORE = 1, 2


def core_id_bits(nr_cpus: int) -> int:
    """Bits of the APIC ID that number ``nr_cpus`` cores (the core level's shift)."""
    return (nr_cpus - 1).bit_length()


def topology_leaf(model: CpuidModel, leaf: int, apic_id: int, nr_cpus: int = 1) -> None:
    """CPUID.0xB / 0x1F for one package of ``nr_cpus`` single-thread cores (module docstring)."""
    model.set(leaf, 0, 0, 1, _LEVEL_SMT << 8, apic_id)
    model.set(leaf, 1, core_id_bits(nr_cpus), nr_cpus, 1 | _LEVEL_CORE << 8, apic_id)
    model.set(leaf, 2, 0, 0, 2, apic_id)


def vmm_cpuid_leaves(model: CpuidModel, apic_id: int = 0, nr_cpus: int = 1) -> CpuidModel:
    """Topology and hypervisor leaves the VMM adds to the guest CPUID (module docstring)."""
    if model.contains(1, 0):
        eax, ebx, ecx, edx = model.get(1, 0)
        if nr_cpus > 1:
            ebx, edx = (apic_id & 0xFF) << 24 | (nr_cpus & 0xFF) << 16 | (ebx & 0xFFFF), edx | _HTT
        else:
            ebx, edx = (apic_id & 0xFF) << 24 | (ebx & 0xFFFF), edx & ~_HTT
        model.set(1, 0, eax, ebx, ecx, edx)
    if model.max_basic_leaf >= 4:
        subleaf = 0
        while model.contains(4, subleaf) and model.get(4, subleaf)[0] & 0x1F:
            eax, ebx, ecx, edx = model.get(4, subleaf)
            model.set(4, subleaf, (eax & 0x03FF_FFFF) | (nr_cpus - 1) << 26, ebx, ecx, edx)
            subleaf += 1
    for leaf in (0xB, 0x1F):
        if model.max_basic_leaf >= leaf:
            topology_leaf(model, leaf, apic_id, nr_cpus)
    if model.vendor != "amd":
        if model.max_basic_leaf >= 0x15:
            model.set(0x15, 0, *TSC_LEAVES.leaf_15h())
        if model.max_basic_leaf >= 0x16:
            model.set(0x16, 0, *TSC_LEAVES.leaf_16h())
    model.set(KVM_CPUID_SIGNATURE, 0, KVM_CPUID_FEATURES, *KVM_SIGNATURE_REGS)
    model.set(KVM_CPUID_FEATURES, 0, int(KVM_PV_FEATURES), 0, 0, 0)
    return model


def guest_cpuid(supported: CpuidModel, cet: CetMode, spec: GuestCpuSpec | None = None, apic_id: int = 0,
                nr_cpus: int = 1) -> CpuidModel:
    """The guest CPUID of the vCPU with ``apic_id`` in a machine of ``nr_cpus`` vCPUs, for ``cet``,
    from KVM's supported CPUID (module docstring table): the ``-cpu`` spec
    (:class:`~cetvm.vmm.guest_cpu.GuestCpuSpec`, default ``host``),
    :func:`~cetvm.vmm.guest_cpu.honest_cpuid` (nothing the CPU cannot execute is shown), the
    VMM's leaves (topology, hypervisor leaves), then the CET setting."""
    model = supported.copy()
    if spec is not None:
        model = spec.apply(model)
    honest_cpuid(model)
    model = vmm_cpuid_leaves(model, apic_id, nr_cpus)  # topology last: HTT is the VMM's, not a CPU feature
    if not cet.shows_shstk:
        model.set_feature(SHSTK.name, False)
    if not cet.shows_ibt:
        model.set_feature(IBT.name, False)
    if cet is CetMode.OFF:
        _clear_xss_component(model, XFeature.CET_USER)
        _clear_xss_component(model, XFeature.CET_KERNEL)
        fix_xsave_leaf(model)
    return model


def embedded_cpu(cpu: str | CpuidModel) -> str | CpuidModel:
    """A built-in model stays a name; anything else (a CPUID file, ``host``) is read now, once,
    into a :class:`CpuidModel`, so the machine and every snapshot of it carry the CPUID table
    itself: a snapshot restores from any directory, after the file is deleted, and editing the
    file later does not change the guest."""
    if isinstance(cpu, CpuidModel) or cpu in builtin_model_names():
        return cpu
    return resolve_model(cpu)


def builtin_model_names() -> frozenset[str]:
    """Names whose CPUID table is part of cetvm (a snapshot may store just the name)."""
    return frozenset(model_names()) - {HOST_MODEL}


@dataclass
class MachineConfig:
    """Everything needed to build a machine (and to rebuild it from a snapshot).

    ``cpu``: the host CPU (a built-in model name, a CPUID dump file, or a CpuidModel); ignored
    when ``host`` is given. ``memory``: RAM bytes (or "256M"). ``cet``: see :class:`CetMode`.
    ``cmdline``: the kernel command line (multiboot). ``modules``: multiboot module files
    (``initrd`` is the first). ``serial_sink``: receives every byte the guest writes to COM1.
    ``smp``: the number of vCPUs, 1 to :data:`MAX_VCPUS` (QEMU ``-smp N``).
    ``force_emulation_prefix``: load the modeled KVM with ``kvm.force_emulation_prefix=1``
    (ignored when ``host`` is given: set it on the Host).
    ``guest_cpu``: the guest CPU in QEMU ``-cpu`` syntax (:class:`~cetvm.vmm.guest_cpu.GuestCpuSpec`;
    "" or ``host`` = everything KVM offers that the CPU can execute).
    ``wall_clock``: the real time (ns since the Unix epoch) when guest time is 0, which the RTC
    and kvmclock's wall clock count from: "fixed" (default, deterministic:
    :data:`~cetvm.kvm.timekeeping.DEFAULT_REALTIME_BASE_NS`, 2024-01-01T00:00:00Z), "host" (the
    host's time when the config is made) or a number; resolved to the number at creation, which
    snapshots record (a restored guest's clocks continue, they do not jump to the host's time).
    """

    cpu: str | CpuidModel = DEFAULT_CPU_MODEL
    memory: int | str = DEFAULT_MEMORY_SIZE
    cet: CetMode | str = CetMode.ON
    cmdline: str = ""
    modules: tuple[str, ...] = ()
    host: Host | None = None
    smp: int = 1
    force_emulation_prefix: bool = False
    guest_cpu: str = ""
    wall_clock: str | int = "fixed"
    serial_sink: Callable[[bytes], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.cpu = embedded_cpu(self.cpu)
        self.memory = parse_memory_size(self.memory)
        self.cet = CetMode.parse(self.cet)
        self.modules = tuple(str(m) for m in self.modules)
        self.smp = check_vcpu_count(self.smp)
        self.guest_cpu_spec = GuestCpuSpec.parse(self.guest_cpu) if self.guest_cpu else None
        self.wall_clock = parse_wall_clock(self.wall_clock)

    @property
    def realtime_base_ns(self) -> int:
        """The real time (ns) at guest time 0 (see ``wall_clock``)."""
        assert isinstance(self.wall_clock, int)
        return self.wall_clock

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
        return Host(cpu=model, force_emulation_prefix=self.force_emulation_prefix)

    @property
    def cpu_name(self) -> str:
        if self.host is not None:
            return self.host.name
        return self.cpu.name if isinstance(self.cpu, CpuidModel) else str(self.cpu)

    def to_manifest(self) -> dict:
        """The JSON part a snapshot records (a custom Host or CpuidModel is stored as its CPUID)."""
        doc: dict = {"memory": self.memory_size, "cet": self.cet_mode.value, "cmdline": self.cmdline,
                     "modules": list(self.modules), "smp": self.smp}
        if self.force_emulation_prefix:
            doc["force_emulation_prefix"] = True
        if self.guest_cpu:
            doc["guest_cpu"] = self.guest_cpu
        if self.realtime_base_ns != DEFAULT_REALTIME_BASE_NS:
            doc["wall_clock"] = self.realtime_base_ns
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
                       modules=tuple(doc.get("modules", ())), host=host, smp=doc.get("smp", 1),
                       force_emulation_prefix=doc.get("force_emulation_prefix", False) is True,
                       guest_cpu=str(doc.get("guest_cpu", "")), wall_clock=doc.get("wall_clock", "fixed"),
                       serial_sink=serial_sink)
        except KeyError as exc:
            raise InputError(f"snapshot machine config has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"snapshot machine config is invalid: {exc}") from None
