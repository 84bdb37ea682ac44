"""The cetvm PC: a VM on the KVM-shaped API with RAM, the PC devices, a kernel and a run loop.

Built the way QEMU/Firecracker build a KVM machine, only through :mod:`cetvm.kvm.api`:
``Kvm(host).create_vm()`` → KVM_SET_USER_MEMORY_REGION for each :func:`~cetvm.vmm.layout.
ram_regions` range → :class:`~cetvm.vmm.devices.pc.PcDevices` on a port bus and an MMIO bus →
KVM_CREATE_VCPU + KVM_SET_CPUID2 (:func:`~cetvm.vmm.config.guest_cpuid`) → the kernel's
:class:`~cetvm.vmm.loader.BootPlan` written with ``Vm.put_memory`` and its entry state applied
with KVM_SET_SREGS / KVM_SET_REGS → :class:`~cetvm.vmm.run_loop.RunLoop`.

Snapshots (:meth:`Machine.save` / :meth:`Machine.restore`): one :mod:`cetvm.vmm.snapshot` file
with the machine config (its vCPU count included), the instruction and VM-exit counts and the
halted time (guest time), the scheduler's state,
every vCPU's state with its MP state (:mod:`cetvm.vmm.snapshot_io`), the device registers (one
local APIC per vCPU) and every RAM region (section ``ram@<addr>``). A restored machine is built
from the saved config (so its CPUID and MSR index list are the same) and continues exactly where
the saved one stopped.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Iterator, Mapping

from cetvm import InputError
from cetvm.arch.msr import MiscEnable, Msr
from cetvm.kvm.api import DescriptorTable, Kvm, KvmRun, KvmVcpu, MpState, Regs, Segment, Sregs
from cetvm.kvm.coalesced_mmio import CoalescedZone
from cetvm.vmm.acpi import write_acpi_tables
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.cet_report import CetViolationRecorder
from cetvm.vmm.config import MachineConfig, guest_cpuid
from cetvm.vmm.console_input import HostConsoleInput
from cetvm.vmm.devices.apic_bus import ApicBus
from cetvm.vmm.devices.pc import PcDevices
from cetvm.vmm.devices.serial import COM1_PORT, UART_LSR_OFFSET
from cetvm.vmm.irq import GuestClock, InterruptRouting
from cetvm.vmm.layout import RamRegion, ram_regions
from cetvm.vmm.msr_exits import claim_apic_msrs, complete_msr_exit
from cetvm.vmm.loader import BootPlan, Long64Entry, ModuleSpec, Protected32Entry, load_kernel
from cetvm.vmm.run_loop import RunLimits, RunLoop, RunResult, VcpuSlot
from cetvm.vmm.snapshot import SectionData, open_snapshot, write_snapshot
from cetvm.vmm.snapshot_io import check_vcpu_states, restore_vcpu, save_vcpu, xsave_section
from cetvm.vmm.snapshot_schema import SNAPSHOT_KIND, check_machine_manifest
#: Bytes per RAM read when saving (a snapshot streams: one chunk, its copy and its compressed
#: form are all the memory a save needs beyond the guest RAM).
SAVE_CHUNK = 4 << 20


#: MSR values the VMM sets at RESET with KVM_SET_MSRS, as QEMU's x86_cpu_reset does: IA32_MISC_ENABLE
#: = fast strings enabled (QEMU's MSR_IA32_MISC_ENABLE_DEFAULT; KVM's own RESET value has it clear,
#: and Linux then prints "Disabled fast string operations").
VMM_RESET_MSRS: dict[int, int] = {int(Msr.IA32_MISC_ENABLE): int(MiscEnable.FAST_STRING)}


def ram_section(region: RamRegion) -> str:
    return f"ram@{region.addr:#x}"


#: The largest XSAVE image a vCPU section may hold (KVM_GET_XSAVE2 sizes are ~11 KB with AMX).
MAX_XSAVE_SECTION = 1 << 20


def section_limit(manifest: Mapping[str, Any], section: str) -> int | None:
    """The most bytes each section of a (schema-checked) machine snapshot may hold once inflated:
    a RAM region's size, the XSAVE image's bound; None for a section a machine never writes."""
    vcpus = manifest.get("vcpus")
    if any(section == xsave_section(i) for i in range(len(vcpus) if isinstance(vcpus, list) else 1)):
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


def guest_tsc(vcpu: KvmVcpu) -> int:
    """The vCPU's TSC now (KVM_GET_MSRS of IA32_TIME_STAMP_COUNTER)."""
    return vcpu.get_msrs([int(Msr.IA32_TIME_STAMP_COUNTER)])[0][1]


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
    """One cetvm PC with ``config.smp`` vCPUs. Build with a :class:`MachineConfig`, then
    :meth:`load_kernel` (or :meth:`restore`), then :meth:`run`.

    SMP: vCPU i has APIC ID i and its own local APIC (the xAPIC page at the same address reaches
    the running vCPU's APIC; x2APIC MSR exits go to the exiting vCPU's); vCPU 0 is the BSP and
    starts at the kernel's entry, the APs wait for INIT/SIPI (KVM's MP states), which the APIC
    bus (:mod:`cetvm.vmm.devices.apic_bus`) delivers through KVM_SET_MP_STATE. The guest CPUID of
    each vCPU names its APIC ID and the topology of ``smp`` cores in one package; fw_cfg reports
    the CPU count. :class:`~cetvm.vmm.run_loop.RunLoop` schedules the vCPUs round-robin."""

    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.host = config.make_host()
        self.kvm = Kvm(self.host)
        self.vm = self.kvm.create_vm()
        self.ram = ram_regions(config.memory_size)
        for slot, region in enumerate(self.ram):
            self.vm.set_user_memory_region(slot, region.addr, region.size)
        supported = self.kvm.get_supported_cpuid()
        cpuids = [guest_cpuid(supported, config.cet_mode, config.guest_cpu_spec, apic_id=i, nr_cpus=config.smp)
                  for i in range(config.smp)]
        self.devices = PcDevices.create(config.memory_size, nb_cpus=config.smp, sink=config.serial_sink,
                                        cmdline=config.cmdline, x2apic_supported=cpuids[0].has("x2apic"),
                                        maxphyaddr=cpuids[0].phys_addr_bits,
                                        realtime_base_ns=config.realtime_base_ns)
        self.pio, self.mmio = PioBus(), MmioBus()
        self.devices.register(self.pio, self.mmio)
        self._thr_coalesced = False
        self.devices.serial.on_thr_buffering = self._coalesce_thr
        self._coalesce_thr(self.devices.serial.thr_write_unobservable)
        self.devices.serial.on_lsr = self._publish_lsr
        self._publish_lsr(self.devices.serial.lsr)
        claim_apic_msrs(self.vm)
        self.vcpus: list[KvmVcpu] = []
        for index, cpuid in enumerate(cpuids):
            vcpu = self.vm.create_vcpu(index)
            vcpu.set_cpuid(cpuid)
            vcpu.set_msrs(list(VMM_RESET_MSRS.items()))
            self.vcpus.append(vcpu)
        #: The BSP (vCPU 0).
        self.vcpu = self.vcpus[0]
        self.apic_bus = ApicBus(self.devices.lapics, init=self._deliver_init, sipi=self._deliver_sipi,
                                smi=self._deliver_smi, nmi=self._deliver_nmi)
        self.boot_plan: BootPlan | None = None
        #: VM exits before this machine object started (a restored snapshot's count).
        self._exits_done = 0
        #: Guest time for the devices (cetvm.vmm.irq): instructions of all vCPUs at 1 GHz, their
        #: VM exits (KVM's guest-time rule) + halted time. It is also KVM's host clock (the TSC
        #: and kvmclock count in it, cetvm.kvm.timekeeping).
        self.clock = GuestClock(lambda: self.instructions, lambda: self.exits)
        for apic, vcpu in zip(self.devices.lapics, self.vcpus):
            apic.tsc = functools.partial(guest_tsc, vcpu)
            apic.tsc_khz = vcpu.get_tsc_khz()
        self.devices.connect(self.clock, self.apic_bus.deliver_message)
        self.devices.apm.smi = self._smi_current
        #: Set by :meth:`record_cet_violations` (``--cet-report``).
        self.cet_recorder: CetViolationRecorder | None = None
        self._loop = self._run_loop(0)
        self.vm.set_host_clock(self.clock, config.realtime_base_ns, counts_instructions=True)

    def _coalesce_thr(self, unobservable: bool) -> None:
        """COM1's transmit register as a coalesced PIO zone while its writes are unobservable
        (no THR-empty interrupt, no loopback: Linux's console writes with IER = 0): KVM keeps
        them in its ring and the guest exits once per character (the line-status read), not
        twice; the run loop hands them to the UART after every KVM_RUN, in order."""
        if unobservable == self._thr_coalesced:
            return
        zone = CoalescedZone(COM1_PORT, 1, pio=1)
        if unobservable:
            self.vm.register_coalesced_mmio(zone)
        else:
            self.vm.unregister_coalesced_mmio(zone)
        self._thr_coalesced = unobservable

    def _publish_lsr(self, value: int) -> None:
        """COM1's line-status register as a read-only PIO register of KVM (a cetvm extension,
        :meth:`cetvm.kvm.api.KvmVm.set_pio_read_value`): a Linux serial console reads it before
        every character, and the answer changes only when the UART's receive queue does."""
        self.vm.set_pio_read_value(COM1_PORT + UART_LSR_OFFSET, value)

    def _retired(self) -> int:
        return sum(instructions_retired(vcpu) for vcpu in self.vcpus)

    def _run_loop(self, instructions_done: int) -> RunLoop:
        slots = [VcpuSlot(vcpu, irq=InterruptRouting(self.devices.lapics[i], self.clock,
                                                     extint=self.devices.pic if i == 0 else None,
                                                     timers=(self.devices.pit,)),
                          msr=functools.partial(self._complete_msr, i), enter=functools.partial(self._enter, i))
                 for i, vcpu in enumerate(self.vcpus)]
        return RunLoop(slots, self.pio, self.mmio, self._retired, instructions_done=instructions_done,
                       on_exception=self._on_exception, kick=self.apic_bus.take_kick,
                       take_coalesced=self.vm.take_coalesced_writes)

    def _enter(self, index: int) -> None:
        """Before vCPU ``index`` runs: its APIC answers the xAPIC page."""
        self.devices.apic_page.current = index

    def _deliver_smi(self, index: int) -> None:
        """An SMI IPI (ICR delivery mode SMI): KVM_SMI on the target vCPU."""
        self.vcpus[index].smi()

    def _deliver_nmi(self, index: int) -> None:
        """An NMI IPI (ICR delivery mode NMI): KVM_NMI on the target vCPU (QEMU's
        apic_bus_deliver → cpu_interrupt(CPU_INTERRUPT_NMI) → kvm_vcpu_ioctl(KVM_NMI))."""
        self.vcpus[index].nmi()

    def _smi_current(self) -> None:
        """An SMI from the chipset (APM_CNT) to the vCPU that wrote the port: KVM_SMI."""
        self.vcpus[self.devices.apic_page.current].smi()

    def _deliver_init(self, index: int) -> None:
        """INIT IPI: latch INIT in the vCPU (KVM_SET_MP_STATE INIT_RECEIVED)."""
        self.vcpus[index].set_mp_state(MpState.INIT_RECEIVED)

    def _deliver_sipi(self, index: int, vector: int) -> None:
        """Start-up IPI: only a vCPU in wait-for-SIPI takes it [SDM Vol. 3 §9.4.4.1]."""
        vcpu = self.vcpus[index]
        if vcpu.get_mp_state() is MpState.INIT_RECEIVED:
            vcpu.set_mp_state(MpState.SIPI_RECEIVED, sipi_vector=vector)

    def attach_console_input(self, fd: int) -> HostConsoleInput:
        """Host input on ``fd`` becomes COM1's received data (:mod:`cetvm.vmm.console_input`);
        the caller closes the returned object to restore a terminal."""
        console = HostConsoleInput(fd, self.devices.serial.queue_input)
        self._loop.host_input = console.poll
        return console

    def record_cet_violations(self) -> CetViolationRecorder:
        """Intercept #CP on every vCPU and record each violation before the guest takes it (the
        guest's behaviour is unchanged: the exception is re-injected). Returns the recorder."""
        if self.cet_recorder is None:
            self.cet_recorder = CetViolationRecorder(self.vcpu, self.vm)
            for vcpu in self.vcpus:
                vcpu.set_exception_intercepts(vcpu.get_exception_intercepts() | self.cet_recorder.vectors())
        return self.cet_recorder

    def _on_exception(self, run: KvmRun, instructions: int, index: int = 0) -> None:
        if self.cet_recorder is not None and run.exception is not None:
            self.cet_recorder.record(run.exception, instructions, self.vcpus[index])

    def _complete_msr(self, index: int, run: KvmRun) -> None:
        complete_msr_exit(run, self.devices.lapics[index], self.vcpus[index])

    # ------------------------------------------------------------------ boot
    @classmethod
    def boot(cls, image: str | os.PathLike, config: MachineConfig | None = None) -> "Machine":
        """A machine with ``image`` loaded and ready to run."""
        machine = cls(config or MachineConfig())
        machine.load_kernel(image)
        return machine

    def load_kernel(self, image: str | os.PathLike) -> BootPlan:
        """Load a multiboot or ELF64 kernel (+ the config's modules), write the ACPI tables
        (:mod:`cetvm.vmm.acpi`) and set the BSP's entry state (the APs wait for INIT/SIPI)."""
        modules = [ModuleSpec(m) for m in self.config.modules]
        plan = load_kernel(image, self.config.memory_size, self.config.cmdline, modules)
        plan.apply(self.vm.put_memory)
        write_acpi_tables(self.vm.put_memory, nr_cpus=self.config.smp, ioapic_id=self.devices.ioapic.id)
        apply_entry(self.vcpu, plan.entry)
        self.boot_plan = plan
        return plan

    # ------------------------------------------------------------------ run
    @property
    def instructions(self) -> int:
        """Instructions executed since the machine first started (across snapshots)."""
        return self._loop.instructions

    @property
    def exits(self) -> int:
        """VM exits that cost guest time since the machine first started (across snapshots)."""
        return self._exits_done + sum(vcpu.get_stats()["exits"] for vcpu in self.vcpus)

    def run(self, timeout: float | None = None, max_instructions: int | None = None,
            save_at: int | None = None, progress: Callable[[int, float], None] | None = None) -> RunResult:
        """Run until the guest stops the machine or a limit is reached (see RunLimits);
        ``progress(instructions, seconds)`` is called about once a second during long runs."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise InputError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
        for name, value in (("max_instructions", max_instructions), ("save_at", save_at)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        self._loop.progress = progress
        return self._loop.run(RunLimits(timeout, max_instructions, save_at))

    # ------------------------------------------------------------------ snapshots
    def save(self, path: str | os.PathLike) -> None:
        """Write config, every vCPU's state, the scheduler, devices and RAM to ``path``
        (atomically).

        An exit the VMM has handled (an OUT already given to its device, an IN whose value is
        stored) is finished first with KVM_RUN(immediate_exit), as KVM requires before reading
        the state: otherwise the restored vCPU would execute that instruction a second time.
        The same run accepts latched INIT/SIPI events, so the MP state is complete."""
        blobs: dict[str, bytes] = {}
        vcpu_states = []
        self._loop.complete_exits()
        for index, vcpu in enumerate(self.vcpus):
            vcpu_state, vcpu_blobs = save_vcpu(vcpu, index)
            vcpu_states.append(vcpu_state)
            blobs.update(vcpu_blobs)
        manifest = {
            "kind": SNAPSHOT_KIND,
            "machine": self.config.to_manifest(),
            "run": {"instructions": self.instructions, "exits": self.exits, "halted_ns": self.clock.halted_ns,
                    "kvmclock": self.vm.get_clock(), "scheduler": self._loop.get_state()},
            "vcpus": vcpu_states,
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
    def restore(cls, path: str | os.PathLike, serial_sink: Callable[[bytes], None] | None = None,
                smp: int | None = None) -> "Machine":
        """A machine that continues a snapshot (built fresh from the saved config). ``smp``:
        the vCPU count the caller expects; a snapshot of another count is refused."""
        decoder = open_snapshot(path, check_machine_manifest)
        manifest = decoder.manifest
        name = os.fspath(path)
        config = MachineConfig.from_manifest(manifest.get("machine"), serial_sink=serial_sink)
        if smp is not None and smp != config.smp:
            raise InputError(f"{name}: the snapshot is of a machine with {config.smp} vCPU(s); it cannot "
                             f"be restored with {smp}")
        vcpus = manifest.get("vcpus")
        if not isinstance(vcpus, list) or len(vcpus) != config.smp:
            raise InputError(f"{name}: the snapshot's machine has {config.smp} vCPU(s) but "
                             f"{len(vcpus) if isinstance(vcpus, list) else 'no'} vCPU states")
        machine = cls(config)
        check_vcpu_states(manifest, machine.vcpu.get_msr_index_list())
        ram = RamRestore(machine.vm, machine.ram)
        blobs = decoder.sections(section_limit, ram.consumer)
        ram.check_complete(name)
        run = manifest.get("run")
        if not isinstance(run, dict) or not isinstance(run.get("instructions"), int):
            raise InputError(f"{name}: snapshot has no run.instructions count")
        for key in ("halted_ns", "exits"):  # (absent from snapshots before halts / exit costs)
            value = run.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name}: snapshot run.{key} must be a non-negative integer, got {value!r}")
        # Guest time first: the vCPUs' TSCs and kvmclock are restored against it.
        machine.clock.halted_ns, machine._exits_done = run.get("halted_ns", 0), run.get("exits", 0)
        machine._loop = machine._run_loop(run["instructions"])
        for index, (vcpu, state) in enumerate(zip(machine.vcpus, vcpus)):
            restore_vcpu(vcpu, state, blobs, index)
        kvmclock = run.get("kvmclock")
        if kvmclock is not None:  # (snapshots from before kvmclock have none)
            if isinstance(kvmclock, bool) or not isinstance(kvmclock, int) or not 0 <= kvmclock < 1 << 64:
                raise InputError(f"{name}: snapshot run.kvmclock must be a u64 count of ns, got {kvmclock!r}")
            machine.vm.set_clock(kvmclock)
        machine.devices.set_state(manifest.get("devices"))
        if "scheduler" in run:  # (snapshots of one vCPU from before SMP have none)
            machine._loop.set_state(run["scheduler"])
        return machine

