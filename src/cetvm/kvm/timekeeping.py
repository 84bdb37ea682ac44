"""KVM's timekeeping: the host clock, the guest TSC (offset per vCPU) and kvmclock [K x86.c
kvm_synchronize_tsc, kvm_compute_l1_tsc_offset, adjust_tsc_offset_guest, kvm_set_msr_common /
kvm_get_msr_common MSR_IA32_TSC, MSR_IA32_TSC_ADJUST, MSR_KVM_SYSTEM_TIME(_NEW),
MSR_KVM_WALL_CLOCK(_NEW), kvm_guest_time_update, kvm_write_wall_clock, KVM_GET/SET_CLOCK,
KVM_VCPU_TSC_OFFSET; Documentation/virt/kvm/x86/msr.rst].

The host clock (a decision; cetvm has no host time of its own): KVM reads the host's time through
:class:`HostClock` — ``monotonic_ns()`` (what ktime_get and the host TSC count) and the
real time at monotonic 0 (``realtime_base_ns``, what ktime_get_real adds). The VMM owns guest
time (instructions retired plus halted time skipped, :class:`cetvm.vmm.irq.GuestClock`), so it
hands its clock to the VM (:meth:`cetvm.kvm.api.Vm.set_host_clock`); until it does, the host
clock is the guest time all vCPUs of the VM spent running (:func:`guest_time_ns`: instructions at
1 GHz plus their VM exits). The clock must be monotonic.

Guest time of a VM exit (a decision): every VM exit costs :data:`VM_EXIT_NS` (1 µs, 2,000 ticks of
the 2 GHz TSC) of the VM's clock. On real KVM an exit takes host time, and the guest's TSC runs
on through it: on Sapphire Rapids an exit KVM handles itself (CPUID, VMCALL, an MSR) round-trips
in about 1,000-2,000 cycles, one that goes to the VMM (port I/O to QEMU) several times that.
cetvm's clocks count retired instructions (1 ns each: deterministic guest time), so without a
charge an exit would take no guest time at all, and a guest that measures exits
(kvm-unit-tests' vmexit.flat loops until 2^30 TSC cycles pass) or polls a device until time
passes (Linux polling the PIT for 30-50 ms) would run tens of millions of them. The rule:

- which: every exit the CPU takes from guest mode (KVM's ``exits`` statistic, KVM_GET_STATS),
  whatever its reason and whether KVM or the VMM handles it, except: cetvm's budget stop (the
  stand-in for a signal kicking the vCPU out of KVM_RUN: where it falls depends on the VMM's
  slices and wall-clock timeout); the interrupt-window exit (how a VMM without an in-kernel
  irqchip waits to inject: KVM with its own APIC injects at the next entry instead, and whether
  one happens depends on where the VMM's runs end, so charging it would make guest time depend
  on the slicing); an exception intercepted only for userspace
  (``KvmVcpu.set_exception_intercepts``: observing a guest, as ``--cet-report`` does, leaves its
  time unchanged); and the port I/O KVM completes by itself from its coalesced ring or a
  read-only PIO register (``KvmVm.set_pio_read_value``: a console's line status) — the CPU's
  native exit loop completes those next to the engine, inside a run whose TSC counts
  instructions only, so they are free on every path (the same guest time with or without the
  native loop). One cost for every reason: the guest-visible figure is "about a microsecond per
  exit", not a model of each handler.
- when: at the exit. KVM's handler and the VMM see the time the exit ends (the exiting
  instruction's time + VM_EXIT_NS), and the guest resumes at it: a timer an exiting write
  programs starts VM_EXIT_NS after the instruction; a HLT pays its exit before the vCPU halts,
  so a timer waking it adds nothing.
- deterministic: guest time is :func:`guest_time_ns` of the counts (instructions, exits) plus
  halted time; the same run gives the same guest time whatever the host's speed, snapshots keep
  the counts, and the VM's clock (the sum over its vCPUs) stays monotonic.
- KVM_RUN's budget is guest time (``KvmVcpu.run``): a run ends once its retired instructions
  and its exits add up to it, so a run the VMM bounds by the next timer event ends there even
  when the guest exits in a loop.

The host TSC runs at :data:`DEFAULT_TSC_KHZ` (2 GHz, exact: two ticks per nanosecond of the
host clock, so TSC, APIC timer and kvmclock agree to the tick); guests get it unscaled
(KVM_GET_TSC_KHZ = tsc_khz, KVM_SET_TSC_KHZ not supported). A vCPU's TSC is
``host_tsc + l1_tsc_offset``; the CPU adds the offset itself (:class:`cetvm.cpu.tsc.TimeStampCounter`,
VMCS TSC_OFFSET), so RDTSC never exits.

IA32_TIME_STAMP_COUNTER (0x10), kvm_set_msr_common:

- guest WRMSR: the offset changes so that the TSC reads the value now; IA32_TSC_ADJUST moves by
  the same amount [SDM Vol. 3 §18.17.3];
- KVM_SET_MSRS (kvm_synchronize_tsc): 0 means "synchronise" (vCPU creation, or userspace
  writing 0 on purpose); a value within one second of the TSC the VM's last write implies now
  is taken as that write's offset (KVM's "UAPI baggage" matching, so vCPUs restored one after
  the other stay in sync); any other value sets the offset exactly. KVM_VCPU_TSC_OFFSET
  (:meth:`VcpuTime.set_offset`) sets the offset without matching (what a VMM restoring a
  snapshot uses for an exact continuation).

IA32_TSC_ADJUST (0x3B): KVM's per-vCPU value; a guest write needs CPUID.(7,0).EBX[1]
(tsc-adjust) and moves the offset by the difference (an access without it is ignored / reads
the value, as kvm_set/get_msr_common do); userspace writes only the value.

kvmclock: :data:`KVM_PV_FEATURES` (CLOCKSOURCE2 and CLOCKSOURCE_STABLE_BIT) is what this KVM
implements for CPUID.0x40000001.EAX. A guest write to MSR_KVM_SYSTEM_TIME_NEW stores the
value; with bit 0 set KVM writes a pvclock_vcpu_time_info at the address: tsc_timestamp = the
vCPU's TSC now, system_time = kvmclock now (host monotonic + kvmclock_offset), the 2 GHz scale
(mul 2**31, shift 0) and PVCLOCK_TSC_STABLE_BIT (the TSC is one stable clock for all vCPUs:
KVM's master clock). The structure is rewritten (version odd while writing, then even, +2 per
update) whenever the pair can change: the MSR write, a TSC or TSC_ADJUST write, KVM_SET_CLOCK,
KVM_VCPU_TSC_OFFSET. A structure that is not inside one page of guest RAM is not written
(kvm_gpc_activate fails; the MSR write still succeeds). MSR_KVM_WALL_CLOCK_NEW: KVM writes
pvclock_wall_clock (version odd/even, sec, nsec) = the real time at kvmclock 0 to the address
(none for address 0).
The legacy MSRs 0x11/0x12 need KVM_FEATURE_CLOCKSOURCE, which cetvm does not advertise: every
kvmclock MSR whose feature the guest CPUID lacks fails (as KVM with
KVM_CAP_ENFORCE_PV_FEATURE_CPUID), for the guest and for userspace. RESET and INIT disable
the vCPU's system time (kvmclock_reset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from cetvm.arch import Msr
from cetvm.arch.qemu_features import QEMU_FEATURES
from cetvm.arch.timekeeping import (
    KVM_SYSTEM_TIME_ENABLE,
    NSEC_PER_SEC,
    PVCLOCK_TSC_STABLE_BIT,
    PVCLOCK_VCPU_TIME_INFO,
    PVCLOCK_WALL_CLOCK,
    U64,
    KvmFeature,
    PvclockTimeInfo,
    ns_to_ticks,
    pvclock_time_scale,
)

if TYPE_CHECKING:
    from cetvm.cpu.vcpu import Vcpu
    from cetvm.cpuid.model import CpuidModel

#: Guest time (ns) one VM exit costs (module docstring, "Guest time of a VM exit").
VM_EXIT_NS = 1_000
#: The host TSC frequency (kHz): 2 GHz (module docstring).
DEFAULT_TSC_KHZ = 2_000_000
#: The real time at host monotonic 0 unless the VMM says otherwise: 2024-01-01T00:00:00Z.
DEFAULT_REALTIME_BASE_NS = 1_704_067_200 * NSEC_PER_SEC
#: CPUID.0x40000001.EAX: the paravirtual features this KVM implements (module docstring).
KVM_PV_FEATURES = KvmFeature.CLOCKSOURCE2 | KvmFeature.CLOCKSOURCE_STABLE_BIT
#: The MSRs of this module, with the PV feature each needs (None: a CPUID feature bit instead).
KVMCLOCK_MSRS: dict[int, KvmFeature] = {
    int(Msr.KVM_WALL_CLOCK): KvmFeature.CLOCKSOURCE, int(Msr.KVM_SYSTEM_TIME): KvmFeature.CLOCKSOURCE,
    int(Msr.KVM_WALL_CLOCK_NEW): KvmFeature.CLOCKSOURCE2, int(Msr.KVM_SYSTEM_TIME_NEW): KvmFeature.CLOCKSOURCE2,
}
TIME_MSRS = frozenset(KVMCLOCK_MSRS) | {int(Msr.IA32_TIME_STAMP_COUNTER), int(Msr.IA32_TSC_ADJUST)}
#: KVM_GET_MSR_INDEX_LIST's emulated_msrs for kvmclock (KVM lists all four).
KVMCLOCK_EMULATED_MSRS: tuple[int, ...] = tuple(sorted(KVMCLOCK_MSRS))
_PAGE = 0x1000


def guest_time_ns(instructions: int, exits: int) -> int:
    """Guest time (ns) a vCPU spends running: 1 ns per retired instruction (the clocks' nominal
    1 GHz) and VM_EXIT_NS per VM exit (module docstring)."""
    return instructions + exits * VM_EXIT_NS


#: CPUID leaf of KVM's paravirtual features.
KVM_CPUID_FEATURES = 0x4000_0001


def guest_pv_features(cpuid: "CpuidModel") -> int:
    """CPUID.0x40000001.EAX of a guest CPUID table (0 without the leaf)."""
    return cpuid.get(KVM_CPUID_FEATURES, 0)[0] if cpuid.contains(KVM_CPUID_FEATURES, 0) else 0


def guest_shows_tsc_adjust(cpuid: "CpuidModel") -> bool:
    """CPUID.(7,0).EBX[1] (IA32_TSC_ADJUST exists)."""
    bit = QEMU_FEATURES["tsc-adjust"]
    return cpuid.contains(bit.leaf, bit.subleaf) and bool(cpuid.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask)


@dataclass
class HostClock:
    """The host's clocks as KVM reads them (module docstring)."""

    monotonic_ns: Callable[[], int]
    realtime_base_ns: int = DEFAULT_REALTIME_BASE_NS
    tsc_khz: int = DEFAULT_TSC_KHZ
    #: The clock advances 1 ns per instruction a vCPU of the VM retires in guest mode, and
    #: otherwise only outside it (exits, halts; KVM's default clock and the VMM's guest time
    #: do): the CPU then extrapolates the TSC natively between VM entry and exit
    #: (:mod:`cetvm.cpu.tsc`).
    counts_instructions: bool = True

    def tsc(self) -> int:
        """The host TSC now (rdtsc on the host)."""
        return ns_to_ticks(self.monotonic_ns(), self.tsc_khz)

    def ticks_per_instruction(self) -> int:
        """Host TSC ticks per retired instruction (0: the clock does not count instructions, or
        not in whole ticks)."""
        whole = self.tsc_khz % 1_000_000 == 0
        return self.tsc_khz // 1_000_000 if self.counts_instructions and whole else 0


@dataclass
class VmTime:
    """kvm->arch's time state: the host clock, kvmclock_offset, the wall-clock MSR value and the
    last host-initiated TSC write (kvm_synchronize_tsc's matching)."""

    host: HostClock
    kvmclock_offset: int = 0
    wall_clock: int = 0
    last_tsc_write: int | None = None
    last_tsc_nsec: int = 0
    last_tsc_offset: int = 0

    def kvmclock_ns(self) -> int:
        """get_kvmclock_ns(): host monotonic + kvmclock_offset."""
        return self.host.monotonic_ns() + self.kvmclock_offset

    def set_clock(self, ns: int) -> None:
        """KVM_SET_CLOCK: kvmclock reads ``ns`` now."""
        self.kvmclock_offset = ns - self.host.monotonic_ns()

    def wall_clock_at_zero(self) -> tuple[int, int]:
        """(sec, nsec) of the real time at kvmclock 0 (kvm_get_wall_clock_epoch)."""
        ns = self.host.realtime_base_ns - self.kvmclock_offset
        return divmod(ns, NSEC_PER_SEC)


@dataclass
class VcpuTime:
    """vcpu->arch's TSC and kvmclock state, with the CPU whose TSC_OFFSET it programs.
    ``pv_features``: the guest CPUID's 0x40000001.EAX, ``tsc_adjust_shown``: its TSC_ADJUST bit
    (both set from KVM_SET_CPUID2)."""

    vm: VmTime
    cpu: "Vcpu"
    tsc_adjust: int = 0
    system_time: int = 0
    pv_features: int = 0
    tsc_adjust_shown: bool = False
    updates: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.attach_host_clock()

    def attach_host_clock(self) -> None:
        """Point the CPU's TSC at the VM's host clock (at creation and when the VMM sets it)."""
        self.cpu.tsc.set_source(self.vm.host.tsc, self.vm.host.ticks_per_instruction())

    # ------------------------------------------------------------------ TSC
    @property
    def offset(self) -> int:
        """vcpu->arch.l1_tsc_offset (the CPU's TSC_OFFSET)."""
        return self.cpu.tsc.offset

    def set_offset(self, offset: int) -> None:
        """KVM_SET_DEVICE_ATTR KVM_VCPU_TSC_OFFSET (and every offset change): program the CPU
        and refresh kvmclock."""
        self.cpu.tsc.offset = offset & U64
        self.kvmclock_update()

    def read_tsc(self) -> int:
        return self.cpu.tsc.read()

    def guest_write_tsc(self, data: int) -> None:
        """Guest WRMSR IA32_TIME_STAMP_COUNTER: the TSC reads ``data``; TSC_ADJUST follows."""
        adjustment = (data - self.read_tsc()) & U64
        self.tsc_adjust = (self.tsc_adjust + adjustment) & U64
        self.set_offset(self.offset + adjustment)

    def synchronize_tsc(self, data: int) -> None:
        """kvm_synchronize_tsc() for a host-initiated write (module docstring)."""
        vm, host = self.vm, self.vm.host
        now = host.monotonic_ns()
        khz = host.tsc_khz
        matching = data == 0 and vm.last_tsc_write is not None
        if data and vm.last_tsc_write is not None:
            expected = vm.last_tsc_write + ns_to_ticks(now - vm.last_tsc_nsec, khz)
            matching = abs(data - expected) < khz * 1000
        if matching:
            offset = vm.last_tsc_offset
        else:
            offset = (data - host.tsc()) & U64
            vm.last_tsc_write, vm.last_tsc_nsec, vm.last_tsc_offset = data, now, offset
        self.set_offset(offset)

    def write_tsc_adjust(self, data: int, host_initiated: bool) -> None:
        """MSR_IA32_TSC_ADJUST write (module docstring)."""
        if not self.tsc_adjust_shown and not host_initiated:
            return
        if not host_initiated:
            self.set_offset(self.offset + data - self.tsc_adjust)
        self.tsc_adjust = data

    # ------------------------------------------------------------------ kvmclock
    def pv_msr_exists(self, index: int) -> bool:
        """The kvmclock MSR's PV feature is in the guest CPUID (enforced, module docstring)."""
        return bool(self.pv_features & KVMCLOCK_MSRS[index])

    def write_system_time(self, data: int) -> None:
        """MSR_KVM_SYSTEM_TIME(_NEW): store it, and publish the time if enabled."""
        self.system_time = data
        self.kvmclock_update()

    def kvmclock_update(self) -> None:
        """kvm_guest_time_update(): write pvclock_vcpu_time_info (module docstring)."""
        if not self.system_time & KVM_SYSTEM_TIME_ENABLE:
            return
        gpa = self.system_time & ~KVM_SYSTEM_TIME_ENABLE & U64
        size = PVCLOCK_VCPU_TIME_INFO.size
        if (gpa % _PAGE) + size > _PAGE or not self.cpu.is_ram(gpa, size):
            return
        mul, shift = pvclock_time_scale(self.vm.host.tsc_khz * 1000)
        version = int.from_bytes(self.cpu.read_phys(gpa, 4), "little")
        odd = (version + 1) | 1
        self.cpu.write_phys(gpa, (odd & 0xFFFF_FFFF).to_bytes(4, "little"))
        info = PvclockTimeInfo(odd, self.read_tsc(), self.vm.kvmclock_ns(), mul, shift, PVCLOCK_TSC_STABLE_BIT)
        self.cpu.write_phys(gpa, info.pack())
        self.cpu.write_phys(gpa, ((odd + 1) & 0xFFFF_FFFF).to_bytes(4, "little"))
        self.updates += 1

    def write_wall_clock(self, data: int) -> None:
        """MSR_KVM_WALL_CLOCK(_NEW): kvm_write_wall_clock() at guest-physical ``data``."""
        self.vm.wall_clock = data
        size = PVCLOCK_WALL_CLOCK.size
        if not data or not self.cpu.is_ram(data, size):
            return  # 0 means "none" (kvm_write_wall_clock), as a restored unused MSR writes it
        version = int.from_bytes(self.cpu.read_phys(data, 4), "little")
        odd = (version + 1) | 1
        sec, nsec = self.vm.wall_clock_at_zero()
        self.cpu.write_phys(data, PVCLOCK_WALL_CLOCK.pack(odd & 0xFFFF_FFFF, sec & 0xFFFF_FFFF, nsec))
        self.cpu.write_phys(data, ((odd + 1) & 0xFFFF_FFFF).to_bytes(4, "little"))

    def reset(self) -> None:
        """kvmclock_reset() at RESET and INIT."""
        self.system_time = 0

    # ------------------------------------------------------------------ MSR access
    def set_msr(self, index: int, data: int, host_initiated: bool) -> bool:
        """kvm_set_msr_common for the time MSRs: False is KVM's "return 1"."""
        if index == Msr.IA32_TIME_STAMP_COUNTER:
            if host_initiated:
                self.synchronize_tsc(data)
            else:
                self.guest_write_tsc(data)
        elif index == Msr.IA32_TSC_ADJUST:
            self.write_tsc_adjust(data, host_initiated)
        elif not self.pv_msr_exists(index):
            return False
        elif index in (Msr.KVM_SYSTEM_TIME, Msr.KVM_SYSTEM_TIME_NEW):
            self.write_system_time(data)
        else:
            self.write_wall_clock(data)
        return True

    def get_msr(self, index: int, host_initiated: bool = True) -> int | None:
        """kvm_get_msr_common for the time MSRs: None is KVM's "return 1". A guest RDMSR of the
        TSC reads it as RDTSC does (:meth:`cetvm.cpu.tsc.TimeStampCounter.guest_read`)."""
        if index == Msr.IA32_TIME_STAMP_COUNTER:
            return self.read_tsc() if host_initiated else self.cpu.tsc.guest_read()
        if index == Msr.IA32_TSC_ADJUST:
            return self.tsc_adjust
        if not self.pv_msr_exists(index):
            return None
        if index in (Msr.KVM_SYSTEM_TIME, Msr.KVM_SYSTEM_TIME_NEW):
            return self.system_time
        return self.vm.wall_clock
