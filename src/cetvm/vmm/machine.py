"""The cetvm PC: a VM on the KVM-shaped API with RAM, the PC devices, a kernel and a run loop.

Built the way QEMU/Firecracker build a KVM machine, only through :mod:`cetvm.kvm.api`:
``Kvm(host).create_vm()`` → KVM_SET_USER_MEMORY_REGION for each :func:`~cetvm.vmm.layout.
ram_regions` range → :class:`~cetvm.vmm.devices.pc.PcDevices` on a port bus and an MMIO bus →
KVM_CREATE_VCPU + KVM_SET_CPUID2 (:func:`~cetvm.vmm.config.guest_cpuid`) → the kernel's
:class:`~cetvm.vmm.loader.BootPlan` written with ``Vm.put_memory`` and its entry state applied
with KVM_SET_SREGS / KVM_SET_REGS → :class:`~cetvm.vmm.run_loop.RunLoop`.

Snapshots (:meth:`Machine.save` / :meth:`Machine.restore`): one :mod:`cetvm.vmm.snapshot` file
with the machine config, the instruction count, the vCPU state (:mod:`cetvm.vmm.snapshot_io`),
the device registers and every RAM region (section ``ram@<addr>``). A restored machine is built
from the saved config (so its CPUID and MSR index list are the same) and continues exactly where
the saved one stopped.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator, Mapping

from cetvm import InputError, NotSupportedError
from cetvm.kvm.api import DescriptorTable, Kvm, KvmRun, KvmVcpu, Regs, Segment, Sregs
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.cet_report import CetViolationRecorder
from cetvm.vmm.config import MachineConfig, guest_cpuid
from cetvm.vmm.devices.pc import PcDevices
from cetvm.vmm.irq import GuestClock, InterruptRouting
from cetvm.vmm.layout import RamRegion, ram_regions
from cetvm.vmm.msr_exits import claim_apic_msrs, complete_msr_exit
from cetvm.vmm.loader import BootPlan, Long64Entry, ModuleSpec, Protected32Entry, load_kernel
from cetvm.vmm.run_loop import RunLimits, RunLoop, RunResult
from cetvm.vmm.snapshot import SectionData, open_snapshot, write_snapshot
from cetvm.vmm.snapshot_io import check_vcpu_states, restore_vcpu, save_vcpu, xsave_section
from cetvm.vmm.snapshot_schema import SNAPSHOT_KIND, check_machine_manifest
#: Bytes per RAM read when saving (a snapshot streams: one chunk, its copy and its compressed
#: form are all the memory a save needs beyond the guest RAM).
SAVE_CHUNK = 4 << 20


def ram_section(region: RamRegion) -> str:
    return f"ram@{region.addr:#x}"


#: The largest XSAVE image a vCPU section may hold (KVM_GET_XSAVE2 sizes are ~11 KB with AMX).
MAX_XSAVE_SECTION = 1 << 20


def section_limit(manifest: Mapping[str, Any], section: str) -> int | None:
    """The most bytes each section of a (schema-checked) machine snapshot may hold once inflated:
    a RAM region's size, the XSAVE image's bound; None for a section a machine never writes."""
    if section == xsave_section(0):
        return MAX_XSAVE_SECTION
    try:
        regions = ram_regions(manifest["machine"]["memory"])
    except (InputError, KeyError, TypeError):
        return None
    return next((r.size for r in regions if ram_section(r) == section), None)


# --------------------------------------------------------------------------- entry state
def protected32_sregs(entry: Protected32Entry, sregs: Sregs) -> Sregs:
    """Multiboot machine state [Multiboot 0.6.96 §3.2]: flat 32-bit CS/DS..SS, paging off."""
    data = Segment.data(entry.ds)
    sregs.cs = Segment.code32(entry.cs)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, 0, 0, 0
    return sregs


def long64_sregs(entry: Long64Entry, sregs: Sregs) -> Sregs:
    """cetvm's ELF64 entry: 64-bit CS, flat data, the plan's GDT, CR3 and paging registers."""
    data = Segment.data(entry.ds)
    sregs.cs = Segment.code64(entry.cs)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt = DescriptorTable(entry.gdt_base, entry.gdt_limit)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
    return sregs


def apply_entry(vcpu: KvmVcpu, entry: Protected32Entry | Long64Entry) -> None:
    """KVM_SET_SREGS + KVM_SET_REGS for a BootPlan's entry state."""
    if isinstance(entry, Protected32Entry):
        vcpu.set_sregs(protected32_sregs(entry, vcpu.get_sregs()))
        vcpu.set_regs(Regs(rax=entry.eax, rbx=entry.ebx, rip=entry.eip, rflags=entry.rflags))
    else:
        vcpu.set_sregs(long64_sregs(entry, vcpu.get_sregs()))
        vcpu.set_regs(Regs(rax=entry.rax, rbx=entry.rbx, rsi=entry.rsi, rdi=entry.rdi, rsp=entry.rsp,
                           rip=entry.rip, rflags=entry.rflags))


def instructions_retired(vcpu: KvmVcpu) -> int:
    """The vCPU's retired-instruction count, from the kvm API's stats."""
    return vcpu.get_stats()["instructions"]


class RamRestore:
    """Streams a snapshot's ``ram@ADDR`` sections straight into guest memory as they are decoded
    (restoring holds one decoded chunk at a time, never a copy of the RAM); the guest RAM starts
    zeroed, so all-zero chunks are skipped."""

    def __init__(self, vm, regions: tuple[RamRegion, ...]) -> None:
        self.vm = vm
        self.regions = {ram_section(r): r for r in regions}
        self.filled = {section: 0 for section in self.regions}

    def consumer(self, section: str) -> Callable[[bytes], None] | None:
        region = self.regions.get(section)
        if region is None:
            return None

        def write(chunk: bytes) -> None:
            offset = self.filled[section]
            if chunk.count(0) != len(chunk):
                self.vm.put_memory(region.addr + offset, chunk)
            self.filled[section] = offset + len(chunk)
        return write

    def check_complete(self, name: str) -> None:
        """Every RAM region was restored, whole."""
        for section, region in self.regions.items():
            if self.filled[section] != region.size:
                if not self.filled[section]:
                    raise InputError(f"{name}: snapshot has no RAM section '{section}'")
                raise InputError(f"{name}: RAM section '{section}' holds {self.filled[section]:#x} bytes, "
                                 f"the region is {region.size:#x}")


class Machine:
    """One cetvm PC (one vCPU). Build with a :class:`MachineConfig`, then :meth:`load_kernel`
    (or :meth:`restore`), then :meth:`run`."""

    def __init__(self, config: MachineConfig) -> None:
        if config.smp != 1:
            raise NotSupportedError(f"{config.smp} vCPUs: cetvm runs one vCPU for now (SMP is not supported yet)")
        self.config = config
        self.host = config.make_host()
        self.kvm = Kvm(self.host)
        self.vm = self.kvm.create_vm()
        self.ram = ram_regions(config.memory_size)
        for slot, region in enumerate(self.ram):
            self.vm.set_user_memory_region(slot, region.addr, region.size)
        cpuid = guest_cpuid(self.kvm.get_supported_cpuid(), config.cet_mode)
        self.devices = PcDevices.create(config.memory_size, sink=config.serial_sink, cmdline=config.cmdline,
                                        x2apic_supported=cpuid.has("x2apic"), maxphyaddr=cpuid.phys_addr_bits)
        self.pio, self.mmio = PioBus(), MmioBus()
        self.devices.register(self.pio, self.mmio)
        claim_apic_msrs(self.vm)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid(cpuid)
        self.boot_plan: BootPlan | None = None
        #: Guest time for the devices (cetvm.vmm.irq): instructions at 1 GHz + halted time.
        self.clock = GuestClock(lambda: self.instructions)
        self.devices.lapics[0].clock = self.clock
        #: Set by :meth:`record_cet_violations` (``--cet-report``).
        self.cet_recorder: CetViolationRecorder | None = None
        self._loop = self._run_loop(0)

    def _run_loop(self, instructions_done: int) -> RunLoop:
        return RunLoop(self.vcpu, self.pio, self.mmio, lambda: instructions_retired(self.vcpu),
                       instructions_done=instructions_done, msr=self._complete_msr,
                       irq=InterruptRouting(self.devices.lapics[0], self.clock),
                       on_exception=self._on_exception)

    def record_cet_violations(self) -> CetViolationRecorder:
        """Intercept #CP and record each violation before the guest takes it (the guest's
        behaviour is unchanged: the exception is re-injected). Returns the recorder."""
        if self.cet_recorder is None:
            self.cet_recorder = CetViolationRecorder(self.vcpu, self.vm)
            self.vcpu.set_exception_intercepts(self.vcpu.get_exception_intercepts() | self.cet_recorder.vectors())
        return self.cet_recorder

    def _on_exception(self, run: KvmRun, instructions: int) -> None:
        if self.cet_recorder is not None and run.exception is not None:
            self.cet_recorder.record(run.exception, instructions)

    def _complete_msr(self, run: KvmRun) -> None:
        complete_msr_exit(run, self.devices.lapics[0], self.vcpu)

    # ------------------------------------------------------------------ boot
    @classmethod
    def boot(cls, image: str | os.PathLike, config: MachineConfig | None = None) -> "Machine":
        """A machine with ``image`` loaded and ready to run."""
        machine = cls(config or MachineConfig())
        machine.load_kernel(image)
        return machine

    def load_kernel(self, image: str | os.PathLike) -> BootPlan:
        """Load a multiboot or ELF64 kernel (+ the config's modules) and set the entry state."""
        modules = [ModuleSpec(m) for m in self.config.modules]
        plan = load_kernel(image, self.config.memory_size, self.config.cmdline, modules)
        plan.apply(self.vm.put_memory)
        apply_entry(self.vcpu, plan.entry)
        self.boot_plan = plan
        return plan

    # ------------------------------------------------------------------ run
    @property
    def instructions(self) -> int:
        """Instructions executed since the machine first started (across snapshots)."""
        return self._loop.instructions

    def run(self, timeout: float | None = None, max_instructions: int | None = None,
            save_at: int | None = None, progress: Callable[[int, float], None] | None = None) -> RunResult:
        """Run until the guest stops the machine or a limit is reached (see RunLimits);
        ``progress(instructions, seconds)`` is called about once a second during long runs."""
        for name, value in (("timeout", timeout), ("max_instructions", max_instructions), ("save_at", save_at)):
            if value is not None and value <= 0:
                raise InputError(f"{name} must be positive, got {value}")
        self._loop.progress = progress
        return self._loop.run(RunLimits(timeout, max_instructions, save_at))

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | os.PathLike) -> None:
        """Write config, vCPU state, devices and RAM to ``path`` (atomically).

        An exit the VMM has handled (an OUT already given to its device, an IN whose value is
        stored) is finished first with KVM_RUN(immediate_exit), as KVM requires before reading
        the state: otherwise the restored vCPU would execute that instruction a second time."""
        self.vcpu.run(immediate_exit=True)
        vcpu_state, blobs = save_vcpu(self.vcpu, 0)
        manifest = {
            "kind": SNAPSHOT_KIND,
            "machine": self.config.to_manifest(),
            "run": {"instructions": self.instructions, "halted_ns": self.clock.halted_ns},
            "vcpus": [vcpu_state],
            "devices": self.devices.get_state(),
            "ram": [{"addr": r.addr, "size": r.size, "section": ram_section(r)} for r in self.ram],
        }
        sections: dict[str, SectionData] = dict(blobs)
        for region in self.ram:
            sections[ram_section(region)] = functools.partial(self._ram_chunks, region)
        write_snapshot(path, manifest, sections)

    def _ram_chunks(self, region: RamRegion) -> Iterator[bytes]:
        """A RAM region, SAVE_CHUNK bytes at a time (saving streams: peak memory is the guest RAM
        plus a chunk or two, never a second copy of the RAM)."""
        for addr in range(region.addr, region.end, SAVE_CHUNK):
            yield self.vm.get_memory(addr, min(SAVE_CHUNK, region.end - addr))

    @classmethod
    def restore(cls, path: str | os.PathLike, serial_sink: Callable[[bytes], None] | None = None) -> "Machine":
        """A machine that continues a snapshot (built fresh from the saved config)."""
        decoder = open_snapshot(path, check_machine_manifest)
        manifest = decoder.manifest
        name = os.fspath(path)
        config = MachineConfig.from_manifest(manifest.get("machine"), serial_sink=serial_sink)
        machine = cls(config)
        vcpus = manifest.get("vcpus")
        if not isinstance(vcpus, list) or len(vcpus) != 1:
            raise InputError(f"{name}: a cetvm machine has one vCPU, the snapshot has "
                             f"{len(vcpus) if isinstance(vcpus, list) else 'no'} vCPU states")
        check_vcpu_states(manifest, machine.vcpu.get_msr_index_list())
        ram = RamRestore(machine.vm, machine.ram)
        blobs = decoder.sections(section_limit, ram.consumer)
        ram.check_complete(name)
        restore_vcpu(machine.vcpu, vcpus[0], blobs, 0)
        machine.devices.set_state(manifest.get("devices"))
        run = manifest.get("run")
        if not isinstance(run, dict) or not isinstance(run.get("instructions"), int):
            raise InputError(f"{name}: snapshot has no run.instructions count")
        halted = run.get("halted_ns", 0)
        if isinstance(halted, bool) or not isinstance(halted, int) or halted < 0:
            raise InputError(f"{name}: snapshot run.halted_ns must be a non-negative integer, got {halted!r}")
        machine.clock.halted_ns = halted
        machine._loop = machine._run_loop(run["instructions"])
        return machine

