"""The KVM-shaped API: ``Kvm(host)`` → ``create_vm()`` → ``Vm.create_vcpu()``, named after the
ioctls (/dev/kvm, the VM fd, the vCPU fd) [K Documentation/virt/kvm/api.rst].

Where state lives (as in KVM, see :mod:`cetvm.kvm.vcpu`): U_CET and PL0-3_SSP in the guest
fpstate, S_CET / SSP / INTR_SSP_TABLE in the VMCS, XCR0 / IA32_XSS / CR0 / CR4 in
``vcpu->arch``; GPRs, segments, other MSRs and memory in the CPU (:class:`cetvm.cpu.vcpu.Vcpu`,
the "hardware"). ``run()`` loads the guest FPU (kvm_load_guest_fpu), enters the guest (VMCS
guest CET state → CPU), handles exits as KVM does (:mod:`cetvm.kvm.vcpu_run`). KVM puts the
FPU back (kvm_put_guest_fpu) before it returns to userspace; cetvm puts it when userspace next
reads or writes what lives in the fpstate (KVM_GET/SET_MSRS, _XSAVE, _CPUID2; INIT puts and
reloads it itself, :func:`cetvm.kvm.reset.kvm_xstate_reset`) — the
CPU holds the guest's values meanwhile and nothing else runs on it, so no ioctl can tell the
difference, and an exit to userspace (a serial-port read) does not pay the copy (decision).

Decisions:
- Every call checks its arguments first (:mod:`cetvm.kvm.ioctl_args`): a value that does not
  fit the ioctl's struct field (wrong type, negative, too wide) is -EINVAL
  (:class:`~cetvm.kvm.errors.KvmInvalidArgument`), never truncated; every failure is a
  :class:`~cetvm.kvm.errors.KvmError` with an ``errno``.
- Up to :data:`KVM_MAX_VCPUS` vCPUs per VM, ids 0..KVM_MAX_VCPUS-1 (KVM_CREATE_VCPU: -EINVAL
  for an id out of range, -EEXIST for one in use). Each vCPU is its own CPU engine; they share
  guest RAM (one host mapping per memory slot handed to every engine). The Vm owns the first
  engine from creation so that memory can be loaded before a vCPU exists; the first vCPU
  created takes it. vCPU 0 is the BSP (kvm->arch.bsp_vcpu_id = 0).
- Cross-modifying code: each engine notices its own stores to code it has translated (QEMU's
  self-modifying-code detection), not another engine's. A vCPU's translations are flushed
  whenever it is reset by INIT (:meth:`cetvm.cpu.vcpu.Vcpu.flush_translations`), so code
  written by one vCPU before it INITs/SIPIs another (an AP trampoline) is always fresh; code
  rewritten under a vCPU that keeps running is not detected (SDM Vol. 3 §9.1.3 asks the
  executing processor for a serializing instruction; cetvm does not flush on those).
- MP states (KVM_GET/SET_MP_STATE) as KVM with its in-kernel LAPIC keeps them
  (kvm_apic_accept_events), while the LAPIC registers and IPI routing live in the VMM: the BSP
  starts RUNNABLE, APs UNINITIALIZED (kvm_arch_vcpu_create with lapic_in_kernel). The VMM
  delivers INIT with ``set_mp_state(INIT_RECEIVED)`` and SIPI with
  ``set_mp_state(SIPI_RECEIVED, sipi_vector=v)`` (cetvm extension: KVM takes the vector from
  its own APIC). Both are latched (apic->pending_events) and accepted at the vCPU's next run()
  or get_mp_state(): INIT resets the vCPU (kvm_vcpu_reset(init_event=True)) and leaves the
  BSP RUNNABLE at the reset vector and an AP in INIT_RECEIVED (wait-for-SIPI); a SIPI is
  accepted only in INIT_RECEIVED (kvm_vcpu_deliver_sipi_vector: CS.selector = vector << 8,
  CS.base = vector << 12, RIP = 0, RUNNABLE) and dropped otherwise. run() of a vCPU in
  UNINITIALIZED or INIT_RECEIVED executes nothing and returns KVM_EXIT_INTR (KVM blocks the
  thread instead; cetvm's VMM only runs RUNNABLE vCPUs). KVM_GET_MP_STATE reports
  INIT_RECEIVED while an INIT is latched (``run(immediate_exit=True)`` accepts it).
- Memory slots are RAM; every other guest-physical address is MMIO that exits to userspace.
  Slots cannot be moved, resized or deleted (KvmNotSupported, a NotSupportedError).
- KVM_GET/SET_MSRS follow KVM: processing stops at the first MSR that fails and the number
  processed is returned. MSR_KVM_INTERNAL_GUEST_SSP is not reachable through them (only via
  KVM_GET/SET_ONE_REG with KVM_REG_GUEST_SSP), as it is not in KVM_GET_MSR_INDEX_LIST.
- KVM_CAP_X86_USER_SPACE_MSR (:meth:`Vm.enable_cap_user_space_msr`) and KVM_X86_SET_MSR_FILTER
  (:meth:`Vm.set_msr_filter`) work as api.rst documents them: a guest RDMSR/WRMSR that KVM
  fails (reason INVAL), does not know (UNKNOWN) or that the filter denies (FILTER) exits as
  KVM_EXIT_X86_RDMSR/WRMSR when userspace enabled that reason; the VMM answers in
  ``run.msr.data`` / ``run.msr.error`` before the next run() (error=1 → #GP(0)). Otherwise the
  guest gets #GP(0). Which MSRs KVM itself handles: :mod:`cetvm.kvm.msr` ("KVM's own MSRs";
  no in-kernel LAPIC, so x2APIC MSRs fail with INVAL and IA32_APIC_BASE is only stored).
- KVM_GET_MSR_INDEX_LIST adds KVM's emulated MSRs (IA32_UCODE_REV, IA32_MISC_ENABLE) to the
  capability policy's list; KVM_GET/SET_MSRS reach every MSR KVM handles.
- An exception queued with :meth:`KvmVcpu.queue_exception` (KVM_SET_VCPU_EVENTS) is delivered
  by the CPU through the guest IDT at the next run; vectors with an error code (#CP included,
  IA32_VMX_BASIC[56]) must come with one.
- Exception intercepts (cetvm extension, modelled on KVM_SET_GUEST_DEBUG's
  KVM_GUESTDBG_USE_SW_BP/HW_BP which set bits in the VMCS exception bitmap):
  :meth:`KvmVcpu.set_exception_intercepts` makes a hardware exception with one of the given
  vectors exit to userspace as ``KVM_EXIT_EXCEPTION`` (:class:`KvmExceptionExit`) at the
  faulting instruction, before the guest sees anything. Nothing is delivered: the VMM re-injects
  it with :meth:`KvmVcpu.queue_exception` to let the guest see exactly what it would have.
  Exceptions injected by userspace and software exceptions (INT n/INT3/INTO) never exit.
- SMM (:mod:`cetvm.kvm.smm`): :meth:`KvmVcpu.smi` is KVM_SMI (KVM_CAP_X86_SMM); the SMI is
  taken at the next run; RSM is emulated at KVM's #UD intercept (which KVM always sets, for
  RSM and the force-emulation prefix); :meth:`KvmVcpu.get_vcpu_events_smi` /
  :meth:`KvmVcpu.set_vcpu_events_smi` are the ``smi`` part of KVM_GET/SET_VCPU_EVENTS. An INIT
  latched in SMM waits for RSM and a SIPI then is dropped.
- NMIs (:mod:`cetvm.kvm.nmi`): :meth:`KvmVcpu.nmi` is KVM_NMI; a pending NMI is injected at
  the next VM entry NMIs are not blocked at (VM_ENTRY_INTR_INFO type NMI), else KVM waits for
  the NMI window; :meth:`KvmVcpu.get_vcpu_events_nmi` / :meth:`KvmVcpu.set_vcpu_events_nmi` are
  the ``nmi`` part of KVM_GET/SET_VCPU_EVENTS.
- :meth:`KvmVcpu.translate` is KVM_TRANSLATE: a software walk of the guest's page tables with
  its current CR0/CR3/CR4/EFER (kvm_mmu_gva_to_gpa_system, supervisor read access); None where
  the address is not mapped (KVM reports valid = 0).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Callable



from cetvm import InputError, NotSupportedError
from cetvm.arch import VECTORS_WITH_ERROR_CODE, Cr0, Cr4, Vector, VmcsField
from cetvm.arch.msr import VMX_CAPABILITY_MSRS, Efer, Msr
from cetvm.arch.regs import CR8_TPR
from cetvm.cpu.exits import Direction, ExitReason, VmExit
from cetvm.cpu.faults import GuestFault, HardwareRefused
from cetvm.cpu.native import EXIT_PIO_READS, NativeExitInsns
from cetvm.cpu.paging import Access, PagingMode
from cetvm.cpu.paging import translate as walk_page_tables
# The API's structures, as <linux/kvm.h> defines them for userspace: kvm_regs, kvm_sregs,
# kvm_segment, kvm_dtable, and the KVM_EXIT_IO direction. The VMM imports them from here.
from cetvm.cpu.state import DescriptorTable, Regs, Segment, Sregs
from cetvm.cpu.vmcs import SOFTWARE_EXCEPTION_VECTORS
from cetvm.cpu.vcpu import Vcpu as CpuVcpu
from cetvm.cpuid.model import CpuidModel
from cetvm.kvm import reset as _reset
from cetvm.kvm import nmi as _nmi
from cetvm.kvm import smm
from cetvm.kvm import vmx
from cetvm.kvm.caps import KvmCaps, kvm_caps_for_host
from cetvm.kvm.coalesced_mmio import CoalescedMmio, CoalescedWrite, CoalescedZone
from cetvm.kvm.cr import kvm_is_valid_sregs_state
from cetvm.kvm.emulate import (
    cet_guards, emulation_blocked_by_cet, is_rsm, kvm_emulate_syscall_on_ud, kvm_handle_ud,
)
from cetvm.kvm.errors import (
    KvmBadAddress,
    KvmExists,
    KvmInvalidArgument,
    KvmIoctlError,  # re-exported: callers catch it from here
    KvmNoMemory,
    KvmNotSupported,
    KvmTooBig,
)
from cetvm.kvm.host import Host
from cetvm.kvm.ioctl_args import (
    MAX_IO_ENTRIES,
    U64_MAX,
    check_bytes,
    check_flag,
    check_instance,
    check_int,
    check_items,
    check_kvm_regs,
    check_kvm_sregs,
    check_pair,
    check_u8,
    check_u32,
    check_u64,
)
from cetvm.kvm.memslots import SHADOW_PAGING_GPA_BITS, kvm_memory_region_invalid
from cetvm.kvm.nested import NestedVmx, free_nested
from cetvm.kvm.nested_entry import (handle_vmx_instruction, leave_guest_mode, nested_exit_on_intr, nested_irq_for_l1_waits,
                                    nested_interrupt_exit_due, nested_l2_owns_cr8, nested_vmx_reflect_vmexit)
from cetvm.kvm.nested_state import NestedState, get_nested_state, set_nested_state
from cetvm.kvm.msr import (
    EMULATED_MSRS,
    kvm_get_arch_capabilities,
    MODELLED_MSRS,
    PAT_RESET,
    KvmMsrState,
    MsrResult,
    get_one_reg,
    guest_maxphyaddr,
    kvm_get_msr,
    kvm_host_get_msr,
    kvm_host_set_msr,
    kvm_set_msr,
    set_one_reg,
)
from cetvm.kvm.timekeeping import (
    HostClock,
    VcpuTime,
    VmTime,
    guest_pv_features,
    guest_shows_tsc_adjust,
    guest_time_ns,
    VM_EXIT_NS,
)
from cetvm.kvm.vcpu import VcpuArch
from cetvm.kvm.vcpu_run import (
    KVM_MSR_EXIT_REASON_VALID_MASK,
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    # kvm_run.msr, its reasons and struct kvm_msr_filter_range: the VMM imports them from here.
    HypercallExit,
    InternalErrorSuberror,
    KvmExceptionExit,
    KvmExitReason,
    KvmMsrExitReason,
    KvmRun,
    MsrFilter,
    MsrFilterRange,
    handle_cpuid,
    handle_msr,
    kvm_cpuid,
    kvm_hypercall_result,
    handle_vmcall,
    handle_cr,
    handle_xsetbv,
    kvm_msr_with_filter,
    kvm_set_xcr0,
    kvm_set_xcr_fault,
    kvm_vm_ioctl_set_msr_filter,
    userspace_exit,
    vmx_msr_bitmap,
)

PAGE = 0x1000
#: The most vCPUs a VM may have, and the bound on vCPU ids (KVM_CAP_MAX_VCPUS,
#: KVM_CAP_MAX_VCPU_ID).
KVM_MAX_VCPUS = 8
#: CPU exits that take no guest time (:mod:`cetvm.kvm.timekeeping`): cetvm's budget stop and the
#: interrupt-window exit of the VMM's interrupt injection.
_FREE_EXITS = frozenset({ExitReason.BUDGET, ExitReason.INTERRUPT_WINDOW})
#: Exceptions KVM_SET_VCPU_EVENTS accepts here: 0-21 except NMI (its own field), 9 and 15.
INJECTABLE_EXCEPTIONS = frozenset(range(22)) - {int(Vector.NMI), 9, 15}
#: KVM_MAX_VCPU_IDS on x86: KVM_MAX_VCPUS (CONFIG_KVM_MAX_NR_VCPUS, 1024) x KVM_VCPU_ID_RATIO (4);
#: KVM_CREATE_VCPU refuses a larger id with -EINVAL.
KVM_MAX_VCPU_IDS = 1024 * 4
#: struct kvm_xcrs holds at most KVM_MAX_XCRS entries (-EINVAL above).
KVM_MAX_XCRS = 16
#: Ports with a value from KvmVm.set_pio_read_value (what the CPU's native port I/O holds).
MAX_PIO_READ_VALUES = EXIT_PIO_READS


class MpState(enum.Enum):
    """KVM_GET/SET_MP_STATE values."""

    RUNNABLE = "KVM_MP_STATE_RUNNABLE"
    UNINITIALIZED = "KVM_MP_STATE_UNINITIALIZED"
    INIT_RECEIVED = "KVM_MP_STATE_INIT_RECEIVED"
    HALTED = "KVM_MP_STATE_HALTED"
    SIPI_RECEIVED = "KVM_MP_STATE_SIPI_RECEIVED"


@dataclass(frozen=True)
class QueuedException:
    """kvm_vcpu_events.exception: injected but not yet delivered."""

    vector: int
    error_code: int | None = None


@dataclass(frozen=True)
class MemorySlot:
    slot: int
    guest_phys_addr: int
    memory_size: int

    def contains(self, gpa: int, size: int) -> bool:
        return self.guest_phys_addr <= gpa and gpa + size <= self.guest_phys_addr + self.memory_size


class Kvm:
    """/dev/kvm: the module loaded on ``host`` (refuses to load as KVM does: KvmLoadError)."""

    def __init__(self, host: Host) -> None:
        self.host = check_instance("Kvm: host", host, Host)
        self.caps: KvmCaps = kvm_caps_for_host(host)
        #: The physical CPU's CET state outside guests (HOST_S_CET: 0 on cetvm's model hosts).
        self.host_cpu = vmx.HostCpu()

    def get_supported_cpuid(self, guest_perm: int = 0) -> CpuidModel:
        """KVM_GET_SUPPORTED_CPUID (``guest_perm``: the xfeatures permitted to guests, u64)."""
        return self.caps.get_supported_cpuid(check_u64("KVM_GET_SUPPORTED_CPUID: guest_perm", guest_perm))

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: msrs_to_save (the capability policy) + emulated_msrs."""
        vmx = sorted(VMX_CAPABILITY_MSRS) if self.host.nested_vmx else []  # emulated_msrs with nested=1
        return self.caps.get_msr_index_list() + list(EMULATED_MSRS) + vmx

    def create_vm(self) -> "Vm":
        """KVM_CREATE_VM."""
        return Vm(self)


class Vm:
    """A VM fd: guest-physical memory, one vCPU, VM-wide capabilities."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        #: The first engine (the first vCPU created takes it); every other engine shares its RAM.
        self._cpu = CpuVcpu(kvm.host.cpu, trace=True)
        self._cpu_taken = False
        self._slots: dict[int, MemorySlot] = {}
        self._vcpus: dict[int, KvmVcpu] = {}
        self.exit_hypercall_mask = 0
        self.user_space_msr_mask = 0
        self.msr_filter = MsrFilter()
        #: kvm->arch's time (:mod:`cetvm.kvm.timekeeping`); the host clock defaults to the
        #: guest time the VM's vCPUs spent running (instructions at 1 GHz and their exits).
        self.time = VmTime(HostClock(self._vcpus_time_ns))
        #: KVM_REGISTER_COALESCED_MMIO zones and the ring (:mod:`cetvm.kvm.coalesced_mmio`)
        self.coalesced_mmio = CoalescedMmio()
        #: cetvm's read-only PIO registers (:meth:`set_pio_read_value`) and their generation
        self.pio_read_values: dict[int, int] = {}
        self.pio_read_generation = 0

    def _vcpus_time_ns(self) -> int:
        return sum(guest_time_ns(vcpu.cpu.instructions_retired, vcpu.stat_exits) for vcpu in self._vcpus.values())

    # ------------------------------------------------------------------ time
    def set_host_clock(self, monotonic_ns: Callable[[], int], realtime_base_ns: int | None = None,
                       counts_instructions: bool = False) -> None:
        """cetvm extension: the host clock KVM reads (a callable giving monotonic nanoseconds,
        and the real time in ns at monotonic 0), see :mod:`cetvm.kvm.timekeeping`. The VMM sets
        it once, before any vCPU runs (the host TSC must not jump under a running guest).
        ``counts_instructions``: the clock advances 1 ns per instruction a vCPU of this VM
        retires in guest mode and otherwise only outside it — VM exits (:data:`~cetvm.kvm.timekeeping.VM_EXIT_NS`
        each, see :mod:`cetvm.kvm.timekeeping`), halts, between KVM_RUNs (the CPU then computes
        the TSC natively; a clock that does not keep this promise gives the guest wrong TSCs)."""
        if not callable(monotonic_ns):
            raise KvmInvalidArgument(f"set_host_clock: monotonic_ns must be callable, got {type(monotonic_ns).__name__}")
        host = self.time.host
        host.monotonic_ns = monotonic_ns
        host.counts_instructions = check_flag("set_host_clock: counts_instructions", counts_instructions)
        if realtime_base_ns is not None:
            host.realtime_base_ns = check_u64("set_host_clock: realtime_base_ns", realtime_base_ns)
        for vcpu in self._vcpus.values():
            vcpu.msrs.time.attach_host_clock()

    def get_clock(self) -> int:
        """KVM_GET_CLOCK: kvmclock now (ns)."""
        return self.time.kvmclock_ns() & U64_MAX

    def set_clock(self, ns: int) -> None:
        """KVM_SET_CLOCK: kvmclock reads ``ns`` now; every vCPU's pvclock is rewritten
        (KVM_REQ_CLOCK_UPDATE)."""
        self.time.set_clock(check_u64("KVM_SET_CLOCK: clock", ns))
        for vcpu in self._vcpus.values():
            vcpu.msrs.time.kvmclock_update()

    # ------------------------------------------------------------------ coalesced MMIO / PIO
    def register_coalesced_mmio(self, zone: CoalescedZone) -> None:
        """KVM_REGISTER_COALESCED_MMIO (KVM_CAP_COALESCED_MMIO, KVM_CAP_COALESCED_PIO)."""
        self.coalesced_mmio.register(zone)

    def unregister_coalesced_mmio(self, zone: CoalescedZone) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO."""
        self.coalesced_mmio.unregister(zone)

    def set_pio_read_value(self, port: int, value: int | None) -> None:
        """cetvm extension (not in Linux KVM): byte reads of ``port`` return ``value`` without an
        exit to userspace until userspace changes it (None: they exit again). For a status
        register whose reads have no side effect, such as a 16550 UART's line-status register,
        which a Linux serial console reads before every character: userspace keeps the value
        current whenever the device's state changes (between KVM_RUNs). At most
        :data:`MAX_PIO_READ_VALUES` ports (-ENOSPC); wider reads and reads while L2 runs exit."""
        port = check_int("set_pio_read_value: port", port, 0, 0xFFFF)
        if value is None:
            if self.pio_read_values.pop(port, None) is None:
                return
        else:
            value = check_int("set_pio_read_value: value", value, 0, 0xFF)
            if self.pio_read_values.get(port) == value:
                return
            if port not in self.pio_read_values and len(self.pio_read_values) >= MAX_PIO_READ_VALUES:
                raise KvmInvalidArgument(f"set_pio_read_value: -ENOSPC, {MAX_PIO_READ_VALUES} ports have values")
            self.pio_read_values[port] = value
        self.pio_read_generation += 1

    def take_coalesced_writes(self) -> list[CoalescedWrite]:
        """Empty the coalesced ring (what userspace reads from its mmap'ed page after a KVM_RUN)."""
        return self.coalesced_mmio.take()

    # ------------------------------------------------------------------ memory
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: RAM at [guest_phys_addr, +memory_size), zero-filled.

        -EINVAL for what :func:`~cetvm.kvm.memslots.kvm_memory_region_invalid` refuses and for
        deleting (size 0) a slot that does not exist; -EEXIST for an overlap; -ENOMEM when the
        host cannot allocate the RAM; moving, resizing or deleting a slot is not supported."""
        slot = check_u32("KVM_SET_USER_MEMORY_REGION: slot", slot)
        guest_phys_addr = check_u64("KVM_SET_USER_MEMORY_REGION: guest_phys_addr", guest_phys_addr)
        memory_size = check_u64("KVM_SET_USER_MEMORY_REGION: memory_size", memory_size)
        host = self.kvm.host
        why = kvm_memory_region_invalid(slot, guest_phys_addr, memory_size,
                                        host.cpu.phys_addr_bits if host.tdp else SHADOW_PAGING_GPA_BITS)
        if why is not None:
            raise KvmInvalidArgument(f"KVM_SET_USER_MEMORY_REGION: {why}")
        if slot in self._slots:
            raise KvmNotSupported(f"memory slot {slot} exists; moving, resizing or deleting slots is not supported")
        if not memory_size:
            raise KvmInvalidArgument(f"KVM_SET_USER_MEMORY_REGION: slot {slot} does not exist (size 0 deletes a slot)")
        try:
            self._cpu.map_ram(guest_phys_addr, memory_size)
        except InputError as err:
            raise KvmExists(f"KVM_SET_USER_MEMORY_REGION: {err}") from None
        except (OSError, OverflowError, MemoryError, HardwareRefused) as err:
            raise KvmNoMemory(f"KVM_SET_USER_MEMORY_REGION: cannot allocate {memory_size:#x} bytes of "
                              f"guest RAM: {err}") from None
        for vcpu in self._vcpus.values():
            if vcpu.cpu is not self._cpu:
                vcpu.cpu.map_ram(guest_phys_addr, memory_size, share_with=self._cpu)
        self._slots[slot] = MemorySlot(slot, guest_phys_addr, memory_size)

    @property
    def memory_slots(self) -> tuple[MemorySlot, ...]:
        return tuple(self._slots.values())

    def _check_ram(self, gpa: int, size: int) -> None:
        """-EFAULT (also an InputError) unless [gpa, gpa+size) lies inside one RAM slot."""
        if not any(s.contains(gpa, size) for s in self._slots.values()):
            raise KvmBadAddress(f"guest-physical {gpa:#x}+{size:#x} is not inside one RAM slot")

    def get_memory(self, gpa: int, size: int) -> bytes:
        """Read guest RAM (the VMM's view of its memory mapping)."""
        gpa, size = check_u64("get_memory: gpa", gpa), check_u64("get_memory: size", size)
        self._check_ram(gpa, size)
        return self._cpu.read_phys(gpa, size)

    def put_memory(self, gpa: int, data: bytes) -> None:
        """Write guest RAM (loading kernels, restoring snapshots)."""
        gpa, data = check_u64("put_memory: gpa", gpa), check_bytes("put_memory: data", data, U64_MAX)
        self._check_ram(gpa, len(data))
        self._cpu.write_phys(gpa, data)

    # ------------------------------------------------------------------ capabilities
    def enable_cap_exit_hypercall(self, mask: int) -> None:
        """KVM_CAP_EXIT_HYPERCALL: VMCALLs whose number is set in ``mask`` exit to userspace."""
        self.exit_hypercall_mask = check_u64("KVM_CAP_EXIT_HYPERCALL: mask", mask)

    def enable_cap_user_space_msr(self, reasons: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR): ``reasons`` is a mask of
        :class:`KvmMsrExitReason`; failing guest MSR accesses with those reasons exit to
        userspace instead of #GP. -EINVAL for unknown bits."""
        reasons = check_u64("KVM_CAP_X86_USER_SPACE_MSR: reasons", reasons)
        if reasons & ~KVM_MSR_EXIT_REASON_VALID_MASK:
            raise KvmInvalidArgument(f"KVM_CAP_X86_USER_SPACE_MSR: unknown reasons {reasons:#x}")
        self.user_space_msr_mask = int(reasons)

    def set_msr_filter(self, ranges: list[MsrFilterRange], default_deny: bool = False) -> None:
        """KVM_X86_SET_MSR_FILTER (flags = KVM_MSR_FILTER_DEFAULT_DENY when ``default_deny``).
        An empty list removes the filter; x2APIC MSRs are never filtered (api.rst)."""
        ranges = check_items("KVM_X86_SET_MSR_FILTER: ranges", ranges)
        deny = check_flag("KVM_X86_SET_MSR_FILTER: default_deny", default_deny)
        self.msr_filter = kvm_vm_ioctl_set_msr_filter(1 if deny else 0, ranges)
        for vcpu in self._vcpus.values():  # KVM_REQ_MSR_FILTER_CHANGED
            vcpu.update_msr_bitmap()

    # ------------------------------------------------------------------ vCPUs
    def create_vcpu(self, vcpu_id: int = 0) -> "KvmVcpu":
        """KVM_CREATE_VCPU (kvm_vm_ioctl_create_vcpu: -EINVAL for an id >= KVM_MAX_VCPU_IDS or
        more than KVM_MAX_VCPUS vCPUs, -EEXIST for an id in use; kvm_arch_vcpu_create ends with
        kvm_vcpu_reset(RESET)). A new engine shares the VM's RAM."""
        vcpu_id = check_int("KVM_CREATE_VCPU: vcpu_id", vcpu_id, 0, KVM_MAX_VCPUS - 1)
        if vcpu_id in self._vcpus:
            raise KvmExists(f"KVM_CREATE_VCPU: vCPU {vcpu_id} exists")
        if not self._cpu_taken:
            cpu, self._cpu_taken = self._cpu, True
        else:
            cpu = CpuVcpu(self.kvm.host.cpu, trace=True, cet_path=self._cpu.cet_path)
            for memslot in self._slots.values():
                cpu.map_ram(memslot.guest_phys_addr, memslot.memory_size, share_with=self._cpu)
        vcpu = KvmVcpu(self, vcpu_id, cpu)
        self._vcpus[vcpu_id] = vcpu
        return vcpu

    @property
    def vcpus(self) -> tuple["KvmVcpu", ...]:
        """The vCPUs created so far, by id."""
        return tuple(self._vcpus[i] for i in sorted(self._vcpus))


class KvmVcpu:
    """A vCPU fd."""

    def __init__(self, vm: Vm, vcpu_id: int, cpu: CpuVcpu) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.cpu = cpu
        self.state = VcpuArch.create(vm.kvm.caps)
        self.host_cpu = vm.kvm.host_cpu
        self.mp_state = MpState.RUNNABLE
        self.msrs = KvmMsrState(time=VcpuTime(vm.time, cpu),
                                arch_capabilities=kvm_get_arch_capabilities(vm.kvm.caps.host))
        #: the kvm_run of the last exit userspace completes (I/O, MMIO, MSR): its copies go
        #: back to the CPU at the next run (_complete_userspace_exit)
        self._userspace_exit: KvmRun | None = None
        self._queued: QueuedException | None = None
        self._init_latched = False
        #: A SIPI's vector waiting for kvm_apic_accept_events (apic->sipi_vector + KVM_APIC_SIPI).
        self._sipi_vector: int | None = None
        self._hypercall: HypercallExit | None = None
        self._last_run: KvmRun | None = None  # its kvm_run fields are checked at the next run()
        #: KVM's ``exits`` statistic: the VM exits that cost guest time (the rule of
        #: :mod:`cetvm.kvm.timekeeping`: all but the budget stop and userspace-only intercepts)
        self.stat_exits = 0
        #: kvm_run.request_interrupt_window: exit with KVM_EXIT_IRQ_WINDOW_OPEN as soon as an
        #: interrupt can be injected (userspace-owned PIC/APIC, no in-kernel irqchip).
        self.request_interrupt_window = False
        #: kvm_run.cr8 (in/out) of KVM without an in-kernel LAPIC: the vCPU's CR8 (TPR[7:4])
        #: lives with userspace's APIC, so KVM_RUN loads CR8 from it (kvm_set_cr8: bits 63:4 set
        #: → -EINVAL) and every exit stores CR8 back (post_kvm_run_save), here and in KvmRun.cr8;
        #: a VMM writes its APIC's TPR here before each run and takes the guest's CR8 writes after
        #: it, as QEMU's kvm_arch_pre_run / kvm_arch_post_run do. Decision: CR8 accesses do not
        #: exit (KVM would set CR8-load/store exiting; cetvm's CPU keeps CR8 as with a TPR
        #: shadow), but lowering CR8 below this value does — KVM_EXIT_SET_TPR, as KVM's handle_cr
        #: for "cr8_prev > cr8" — through the TPR threshold (vmx.vmx_update_cr8_intercept), so
        #: the VMM's APIC learns it before the guest runs on (guests/tests/apic_cr8.c).
        self.cr8 = 0
        #: exception intercepts userspace asked for (set_exception_intercepts), and KVM's own:
        #: #UD (handle_ud: RSM, and the force-emulation prefix when kvm.force_emulation_prefix is on)
        self._user_exception_bitmap = 0
        self._kvm_exception_bitmap = 1 << Vector.UD
        self._force_emulation_prefix = vm.kvm.host.fep_enabled
        self._forced_emulation = False
        #: (zones, read values) generation the CPU's native port I/O was last given
        self._native_port_io_generation: tuple[int, int] | None = None
        #: vmx->nested (:mod:`cetvm.kvm.nested`): VMX operation of L1 and the L2 it runs
        self.nested = NestedVmx.create(self.state)
        self.cpu.vmptrld(self.state.vmcs)
        self.state.vmcs.write(VmcsField.EXCEPTION_BITMAP, self._kvm_exception_bitmap)
        vmx.init_vmcs_exec_controls(self.state)
        vmx.init_vmcs_cet(self.state, self.host_cpu)
        self._after_set_cpuid()
        self.kvm_vcpu_reset(init_event=False)
        self.msrs.time.synchronize_tsc(0)  # kvm_arch_vcpu_postcreate
        native = cpu.native_exit_insns
        if native is not None:  # CPUID and VMCALL answered next to the engine (KVM's exit fastpath)
            native.set_exit_fastpath(cpuid=self._cpuid_fastpath, hypercall=self._hypercall_fastpath,
                                     exit_charge=VM_EXIT_NS)

    def _cpuid_fastpath(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """A CPUID exit handled without leaving the CPU's run: handle_cpuid's answer."""
        return kvm_cpuid(self.state, self.cpu.cr4, self.msrs.apic_base, leaf, subleaf)

    def _hypercall_fastpath(self, nr: int) -> int | None:
        """A VMCALL at CPL 0 in 64-bit mode handled without leaving the CPU's run: handle_vmcall's
        RAX, or None when it is an exit to userspace."""
        return kvm_hypercall_result(nr, 0, self.vm.exit_hypercall_mask)

    # ------------------------------------------------------------------ CPUID
    def set_cpuid(self, model: CpuidModel) -> None:
        """KVM_SET_CPUID2 (then vmx_vcpu_after_set_cpuid: MSR intercepts, CR4 mask)."""
        self._fpu_sync()
        self.state.set_cpuid(check_instance("KVM_SET_CPUID2: model", model, CpuidModel))
        self._after_set_cpuid()

    def _after_set_cpuid(self) -> None:
        self.update_msr_bitmap()
        entries = self.state.cpuid.entries
        self.msrs.time.pv_features = guest_pv_features(entries)
        self.msrs.time.tsc_adjust_shown = guest_shows_tsc_adjust(entries)
        vmx.vmx_vcpu_after_set_cpuid(self.state, self.cpu)
        self.nested.after_set_cpuid(self.state)

    def update_msr_bitmap(self) -> None:
        """Program the VMCS's MSR bitmap from the CET intercepts and the VM's MSR filter."""
        cet = vmx.vmx_update_intercept_for_cet_msr(self.state)
        self.state.vmcs.set_msr_bitmap(vmx_msr_bitmap(cet, vmx.CET_INTERCEPTABLE_MSRS, self.vm.msr_filter))

    def get_cpuid2(self) -> CpuidModel:
        """KVM_GET_CPUID2: the table with the runtime leaf 0xD sizes."""
        return self.state.cpuid.entries.copy()

    def get_msr_index_list(self) -> list[int]:
        return self.vm.kvm.get_msr_index_list()

    # ------------------------------------------------------------------ TSC
    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency (the host's, unscaled)."""
        return self.vm.time.host.tsc_khz

    def get_tsc_offset(self) -> int:
        """KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)."""
        return self.msrs.time.offset

    def set_tsc_offset(self, offset: int) -> None:
        """KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET): exact, no matching."""
        self.msrs.time.set_offset(check_u64("KVM_VCPU_TSC_OFFSET", offset))

    # ------------------------------------------------------------------ registers
    def get_regs(self) -> Regs:
        return self.cpu.get_regs()

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS (see :func:`~cetvm.kvm.ioctl_args.check_kvm_regs`)."""
        self.cpu.set_regs(check_kvm_regs(regs))

    def get_sregs(self) -> Sregs:
        return self.cpu.get_sregs()

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS with kvm_is_valid_sregs(): -EINVAL for an invalid CR0 (bits 63:32, NW
        without CD, PG without PE), CR4 bits reserved for this guest (CR4.CET without SHSTK/IBT),
        CR4.CET without CR0.WP, long mode without CR4.PAE or EFER.LMA or with a CR3 beyond
        MAXPHYADDR, EFER.LMA or a 64-bit CS outside long mode; and for fields that do not fit
        struct kvm_sregs (:func:`~cetvm.kvm.ioctl_args.check_kvm_sregs`)."""
        sregs = check_kvm_sregs(sregs)
        cr0, cr4 = sregs.cr0, sregs.cr4
        why = kvm_is_valid_sregs_state(self.state, cr0=cr0, cr3=sregs.cr3, cr4=cr4, efer=sregs.efer,
                                       cs_long=sregs.cs.long, maxphyaddr=guest_maxphyaddr(self.state))
        if why is not None:
            raise KvmInvalidArgument(f"KVM_SET_SREGS: {why}")
        self.cpu.set_sregs(sregs)
        self.state.cr0, self.state.cr4 = cr0, cr4

    # ------------------------------------------------------------------ MSRs
    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS: (index, value) for each MSR up to the first that fails (-E2BIG for
        MAX_IO_MSRS entries or more, -EINVAL for an index that is not a u32)."""
        indices = [check_u32("KVM_GET_MSRS: index", i)
                   for i in check_items("KVM_GET_MSRS: indices", indices, MAX_IO_ENTRIES, KvmTooBig)]
        out: list[tuple[int, int]] = []
        for index in indices:
            ok, value = self._get_msr(index)
            if not ok:
                break
            out.append((index, value))
        return out

    def set_msrs(self, entries: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: the number of MSRs written (stops at the first that fails). The whole
        list is checked first, as copy_from_user copies it: -E2BIG for MAX_IO_MSRS entries or
        more, -EINVAL for an entry that is not a (u32 index, u64 value) pair."""
        checked = [self._msr_entry(e)
                   for e in check_items("KVM_SET_MSRS: entries", entries, MAX_IO_ENTRIES, KvmTooBig)]
        done = 0
        for index, value in checked:
            if not self._set_msr(index, value):
                break
            done += 1
        return done

    @staticmethod
    def _msr_entry(entry: object) -> tuple[int, int]:
        index, value = check_pair("KVM_SET_MSRS: entry", entry)
        return check_u32("KVM_SET_MSRS: index", index), check_u64("KVM_SET_MSRS: data", value)

    def _get_msr(self, index: int) -> tuple[bool, int]:
        self._fpu_sync()
        if index == Msr.KVM_INTERNAL_GUEST_SSP:
            return False, 0
        if index in MODELLED_MSRS:
            result, value = kvm_get_msr(self.state, index, host_initiated=True)
            return result is MsrResult.OK, value
        try:
            return kvm_host_get_msr(self.state, self.msrs, self.cpu, index)
        except HardwareRefused:
            return False, 0

    def _set_msr(self, index: int, value: int) -> bool:
        self._fpu_sync()
        if index == Msr.KVM_INTERNAL_GUEST_SSP:
            return False
        if index in MODELLED_MSRS:
            return kvm_set_msr(self.state, index, value, host_initiated=True) is MsrResult.OK
        try:
            return kvm_host_set_msr(self.state, self.msrs, self.cpu, index, value)
        except HardwareRefused:
            return False

    # ------------------------------------------------------------------ ONE_REG, XCRs, XSAVE
    def get_one_reg(self, reg_id: int) -> int:
        """KVM_GET_ONE_REG (KVM_REG_GUEST_SSP; -EINVAL without guest SHSTK)."""
        return get_one_reg(self.state, check_u64("KVM_GET_ONE_REG: id", reg_id))

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """KVM_SET_ONE_REG (KVM_REG_GUEST_SSP, a u64: canonical and 4-byte aligned)."""
        set_one_reg(self.state, check_u64("KVM_SET_ONE_REG: id", reg_id),
                    check_u64("KVM_SET_ONE_REG: value", value))

    def get_xcrs(self) -> list[tuple[int, int]]:
        """KVM_GET_XCRS: [(0, XCR0)]."""
        return [(0, self.state.xcr0)]

    def set_xcrs(self, xcrs: list[tuple[int, int]]) -> None:
        """KVM_SET_XCRS (kvm_vcpu_ioctl_x86_set_xcrs): the first XCR0 entry goes through
        __kvm_set_xcr (-EINVAL on a value the guest could not set); other XCRs and later XCR0
        entries are ignored, as KVM does. -EINVAL for more than KVM_MAX_XCRS entries or an entry
        that is not a (u32, u64) pair."""
        pairs = [check_pair("KVM_SET_XCRS: entry", x) for x in check_items("KVM_SET_XCRS: xcrs", xcrs, KVM_MAX_XCRS)]
        checked = [(check_u32("KVM_SET_XCRS: xcr", i), check_u64("KVM_SET_XCRS: value", v)) for i, v in pairs]
        for index, value in checked:
            if index != 0:  # only XCR_XFEATURE_ENABLED_MASK
                continue
            fault = kvm_set_xcr_fault(self.state, index, value)
            if fault:
                raise KvmInvalidArgument(f"KVM_SET_XCRS: {fault}")
            kvm_set_xcr0(self.state, value)
            break

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE2: the standard-format image of the guest's user components
        (see :mod:`cetvm.kvm.guest_fpu`; CET state is read with KVM_GET_MSRS / ONE_REG)."""
        self._fpu_sync()
        return self.state.fpu.to_uabi()

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE (-EINVAL for an image the guest FPU cannot hold, see
        :meth:`~cetvm.kvm.guest_fpu.GuestFpu.from_uabi`)."""
        self._fpu_sync()
        self.state.fpu.from_uabi(check_bytes("KVM_SET_XSAVE: data", data, self.state.fpu.uabi_size))

    # ------------------------------------------------------------------ events, MP state
    def queue_exception(self, vector: int, error_code: int | None = None) -> None:
        """KVM_SET_VCPU_EVENTS with a pending exception (delivered at the next run): vector a
        u8, error_code None or a u32 (kvm_vcpu_events.exception)."""
        vector = check_u8("KVM_SET_VCPU_EVENTS: vector", vector)
        if error_code is not None:
            error_code = check_u32("KVM_SET_VCPU_EVENTS: error_code", error_code)
        if vector not in INJECTABLE_EXCEPTIONS:
            raise KvmInvalidArgument(f"KVM_SET_VCPU_EVENTS: vector {vector} is not an injectable exception")
        has_code = vector in VECTORS_WITH_ERROR_CODE
        if has_code and error_code is None:
            raise KvmInvalidArgument(f"KVM_SET_VCPU_EVENTS: vector {vector} needs an error code")
        if not has_code and error_code is not None:
            raise KvmInvalidArgument(f"KVM_SET_VCPU_EVENTS: vector {vector} has no error code")
        self._queued = QueuedException(vector, error_code)

    def set_exception_intercepts(self, vectors: set[int]) -> None:
        """cetvm extension (module docstring): exceptions with these vectors (0-31) exit to
        userspace as KVM_EXIT_EXCEPTION before delivery; an empty set removes the intercepts.
        -EINVAL for a vector outside 0-31 (the VMCS exception bitmap has 32 bits)."""
        bitmap = 0
        for vector in check_items("exception intercepts: vectors", vectors):
            bitmap |= 1 << check_int("exception intercepts: vector", vector, 0, 31)
        self._user_exception_bitmap = bitmap
        # INT3/INTO (the only sources of #BP/#OF) stay out of the VMCS bitmap: software exceptions
        # never exit to userspace here (module docstring), although the CPU's VMCS honours them
        cpu_bitmap = bitmap & ~sum(1 << v for v in SOFTWARE_EXCEPTION_VECTORS)
        self.state.vmcs.write(VmcsField.EXCEPTION_BITMAP, cpu_bitmap | self._kvm_exception_bitmap)

    def get_exception_intercepts(self) -> set[int]:
        """The vectors :meth:`set_exception_intercepts` installed."""
        return {v for v in range(32) if self._user_exception_bitmap >> v & 1}

    def translate(self, linear: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address of ``linear`` under the guest's current
        paging mode (supervisor read; paging off: the address itself), None when unmapped or
        non-canonical (kvm_translation.valid = 0)."""
        linear = check_u64("KVM_TRANSLATE: linear address", linear)
        sregs = self.cpu.get_sregs()
        mode = PagingMode(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
        try:
            return walk_page_tables(self._read_pte, mode, linear, Access.READ)
        except GuestFault:
            return None

    def _read_pte(self, gpa: int) -> int:
        if not any(s.contains(gpa, 8) for s in self.vm.memory_slots):
            raise GuestFault(int(Vector.PF), 0, None)
        return int.from_bytes(self.cpu.read_phys(gpa, 8), "little")

    def get_stats(self) -> dict[str, int]:
        """KVM_GET_STATS_FD, reduced to what cetvm counts: instructions retired by this vCPU and
        ``exits`` (KVM's statistic, the exits that cost guest time: :mod:`cetvm.kvm.timekeeping`).

        Real KVM has no retired-instruction counter; cetvm's CPU has an exact one, which the VMM
        needs for instruction budgets and snapshots at an exact point.
        """
        return {"instructions": int(self.cpu.instructions_retired), "exits": self.stat_exits}

    def get_vcpu_events(self) -> QueuedException | None:
        """KVM_GET_VCPU_EVENTS: the exception queued but not yet delivered, if any."""
        return self._queued

    @property
    def is_bsp(self) -> bool:
        """kvm_vcpu_is_reset_bsp(): the vCPU whose id is the VM's BSP id (0)."""
        return self.vcpu_id == 0

    def get_mp_state(self) -> MpState:
        """KVM_GET_MP_STATE: accepts a pending SIPI first (kvm_apic_accept_events); an INIT not
        yet accepted reads as INIT_RECEIVED (module docstring)."""
        if self._init_latched and not smm.is_smm(self.state):
            return MpState.INIT_RECEIVED
        self._accept_events()
        return self.mp_state

    def set_mp_state(self, state: MpState, sipi_vector: int | None = None) -> None:
        """KVM_SET_MP_STATE (kvm_arch_vcpu_ioctl_set_mpstate). INIT_RECEIVED latches an INIT;
        SIPI_RECEIVED (with ``sipi_vector``, a cetvm extension) puts the vCPU in INIT_RECEIVED
        with the SIPI pending; RUNNABLE, HALTED and UNINITIALIZED are set as they are (module
        docstring)."""
        state = check_instance("KVM_SET_MP_STATE: state", state, MpState)
        if (sipi_vector is None) != (state is not MpState.SIPI_RECEIVED):
            raise KvmInvalidArgument("KVM_SET_MP_STATE: a SIPI vector goes with SIPI_RECEIVED only")
        if state is MpState.INIT_RECEIVED:
            self._init_latched = True
            self._sipi_vector = None
        elif state is MpState.SIPI_RECEIVED:
            sipi_vector = check_int("KVM_SET_MP_STATE: SIPI vector", sipi_vector, 0, 255)
            if not self._init_latched:
                self.mp_state = MpState.INIT_RECEIVED
            self._sipi_vector = sipi_vector
        else:
            self._init_latched = False
            self._sipi_vector = None
            self.mp_state = state

    @property
    def waiting_for_sipi(self) -> bool:
        """UNINITIALIZED or INIT_RECEIVED once the pending events are accepted: run() would
        execute nothing (a BSP with an INIT latched restarts at the reset vector instead)."""
        if self._init_latched and not smm.is_smm(self.state):
            return not self.is_bsp and self._sipi_vector is None
        return self.get_mp_state() in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED)

    def _accept_events(self) -> None:
        """kvm_apic_accept_events(): a latched INIT resets the vCPU (BSP → RUNNABLE, AP →
        INIT_RECEIVED); then a pending SIPI starts a vCPU in INIT_RECEIVED and is dropped
        otherwise."""
        if self._init_latched and smm.is_smm(self.state):
            self._sipi_vector = None  # kvm_apic_init_sipi_allowed(): INIT waits for RSM, SIPI dropped
            return
        if self._init_latched:
            self._init_latched = False
            self.kvm_vcpu_reset(init_event=True)
        if self._sipi_vector is not None:
            vector, self._sipi_vector = self._sipi_vector, None
            if self.mp_state is MpState.INIT_RECEIVED:
                self._deliver_sipi_vector(vector)
                self.mp_state = MpState.RUNNABLE

    def _deliver_sipi_vector(self, vector: int) -> None:
        """kvm_vcpu_deliver_sipi_vector(): CS.selector = vector << 8, CS.base = vector << 12,
        RIP = 0 [SDM Vol. 3 §9.4.4.1 (AP start-up: real mode at 000VV000H)]."""
        sregs = self.cpu.get_sregs()
        sregs.cs = dataclasses.replace(sregs.cs, selector=vector << 8, base=vector << 12)
        self.cpu.set_sregs(sregs)
        self.cpu.set_reg("rip", 0)

    # ------------------------------------------------------------------ reset
    def kvm_vcpu_reset(self, init_event: bool) -> None:
        """RESET (vCPU creation) or INIT (see :mod:`cetvm.kvm.reset`)."""
        init_event = check_flag("kvm_vcpu_reset: init_event", init_event)
        self._check_userspace_completion()
        state, cpu = self.state, self.cpu
        self._complete_userspace_exit()
        self._last_run = None
        self._leave_nested()
        old_cr0 = state.cr0
        if not init_event:
            _reset.reset_xcr0_xss(state)
            cpu.set_msr(int(Msr.IA32_PAT), PAT_RESET)
        self.msrs.reset(init_event, bsp=self.vcpu_id == 0)
        _reset.kvm_xstate_reset(state, cpu, init_event)
        _reset.vmx_vcpu_reset_cet(state)
        sregs = _reset.reset_sregs(old_cr0, init_event)
        cpu.set_regs(_reset.reset_regs(state))
        cpu.set_sregs(sregs)
        state.cr0, state.cr4 = sregs.cr0, sregs.cr4
        self._queued = None
        self._hypercall = None
        smm.kvm_smm_reset(state, init_event)
        _nmi.kvm_nmi_reset(state)
        cpu.cancel_interrupt()  # kvm_clear_interrupt_queue / pending_external_vector = -1
        if init_event:
            cpu.flush_translations()  # cross-modifying code (module docstring)
        if self.is_bsp:
            self.mp_state = MpState.RUNNABLE
        else:  # kvm_arch_vcpu_create (lapic_in_kernel) / kvm_apic_accept_events
            self.mp_state = MpState.INIT_RECEIVED if init_event else MpState.UNINITIALIZED

    # ------------------------------------------------------------------ nested VMX
    def _leave_nested(self) -> None:
        """vmx_leave_nested() + free_nested() (RESET/INIT): back to vmcs01, out of VMX operation."""
        if self.nested.guest_mode:
            leave_guest_mode(self)
        free_nested(self)

    def get_nested_state(self) -> NestedState | None:
        """KVM_GET_NESTED_STATE (vmx_get_nested_state): None outside VMX operation (KVM reports
        a header without VMX data); otherwise the VMXON and current-VMCS pointers, the cached
        vmcs12 and, in guest mode, L1's pre-entry CET state."""
        return get_nested_state(self.nested)

    def set_nested_state(self, nested: NestedState | None) -> None:
        """KVM_SET_NESTED_STATE (vmx_set_nested_state): leave VMX operation, then enter it as
        saved; in guest mode vmcs02 is rebuilt from the vmcs12 (the CPU registers, restored by
        KVM_SET_SREGS/REGS, already hold L2's state). -EINVAL for a state that does not fit."""
        self._leave_nested()
        set_nested_state(self, nested)

    # ------------------------------------------------------------------ interrupts
    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT without an in-kernel irqchip (kvm_vcpu_ioctl_interrupt): queue external
        interrupt ``vector``; the CPU delivers it through the IDT once RFLAGS.IF = 1 and no
        STI/MOV SS shadow blocks it. -EINVAL for a vector >= 256, -EEXIST while one is pending."""
        vector = check_u8("KVM_INTERRUPT: vector", vector)
        if self.cpu.pending_interrupt is not None:
            raise KvmExists(f"KVM_INTERRUPT: vector {self.cpu.pending_interrupt:#x} is still pending")
        self.cpu.inject_interrupt(vector)

    def ready_for_interrupt_injection(self) -> bool:
        """kvm_vcpu_ready_for_interrupt_injection(): IF = 1, no shadow, nothing pending — or, while
        L2 runs with external-interrupt exiting, nothing pending (vmx_interrupt_allowed: the
        interrupt is a VM exit to L1 whatever L2's RFLAGS.IF)."""
        if self.cpu.pending_interrupt is not None or self.nested.irq_for_l1 is not None:
            return False
        return nested_exit_on_intr(self) or self.cpu.interrupt_window_open

    def _irq_window_exit_due(self) -> bool:
        """dm_request_for_irq_injection() && kvm_vcpu_ready_for_interrupt_injection()."""
        return self.request_interrupt_window and self.ready_for_interrupt_injection()

    def _post_kvm_run_save(self, run: KvmRun) -> KvmRun:
        """post_kvm_run_save(): kvm_run.if_flag, ready_for_interrupt_injection and cr8 (the
        vCPU's TPR; while an L2 runs whose CR8 L1 virtualizes, kvm_run.cr8 keeps L1's last value)."""
        run.if_flag = self.cpu.if_flag
        run.ready_for_interrupt_injection = self.ready_for_interrupt_injection()
        if not nested_l2_owns_cr8(self):
            self.cr8 = self.cpu.cr8
        run.cr8 = self.cr8
        return run

    def _load_cr8(self) -> None:
        """KVM_RUN's kvm_set_cr8(vcpu, kvm_run->cr8) (see :attr:`cr8`)."""
        cr8 = check_u64("kvm_run.cr8", self.cr8)
        if cr8 & ~CR8_TPR:
            raise KvmInvalidArgument(f"KVM_RUN: kvm_run.cr8 {cr8:#x} has reserved bits 63:4 set")
        if not nested_l2_owns_cr8(self) and cr8 != self.cpu.cr8:
            self.cpu.write_cr(8, cr8)

    # ------------------------------------------------------------------ run
    def run(self, budget: int | None = None, immediate_exit: bool = False) -> KvmRun:
        """KVM_RUN: until an exit KVM returns to userspace. ``budget``: guest time (ns) → INTR,
        counted as :func:`~cetvm.kvm.timekeeping.guest_time_ns` of the instructions this run
        retires and the exits it takes (without exits: a count of instructions)."""
        if budget is not None:
            budget = check_u64("KVM_RUN: budget", budget)
        immediate_exit = check_flag("KVM_RUN: immediate_exit", immediate_exit)
        self.request_interrupt_window = check_flag("kvm_run.request_interrupt_window",
                                                   self.request_interrupt_window)
        self._check_userspace_completion()
        self._load_cr8()
        cpu, state = self.cpu, self.state
        # The budget counts from here: completing the previous exit (an OUT, a VMCALL...)
        # retires that instruction, and it belongs to this run.
        start = cpu.instructions_retired, self.stat_exits
        vmx.kvm_load_guest_fpu(state, cpu)
        try:
            self._accept_events()
            if self.mp_state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED):
                return self._post_kvm_run_save(KvmRun(KvmExitReason.INTR, cpu.rip,
                                                      detail="vCPU is waiting for INIT/SIPI"))
            if self._hypercall is not None:  # complete_hypercall_exit
                cpu.set_reg("rax", self._hypercall.ret)
                self._hypercall = None
            if immediate_exit:
                budget = 0
            self._complete_userspace_exit()
            if self._queued is not None:
                cpu.inject_exception(self._queued.vector, self._queued.error_code)
                self._queued = None
            self._last_run = self._post_kvm_run_save(self._run_loop(budget, start))
            return self._last_run
        except BaseException:
            vmx.kvm_put_guest_fpu(state, cpu)
            raise

    def _fpu_sync(self) -> None:
        """kvm_put_guest_fpu, deferred from the end of KVM_RUN (module docstring) to the first
        ioctl that reads or writes the fpstate."""
        vmx.kvm_put_guest_fpu(self.state, self.cpu)

    def _check_userspace_completion(self) -> None:
        """What userspace wrote into kvm_run for the last exit must fit its fields (-EINVAL,
        nothing changed): IN / MMIO-read data in ``size`` bytes, the RDMSR data a u64 and
        ``error`` 0 or 1, the hypercall result a u64."""
        last = self._last_run
        if last is None:
            return
        if last.io is not None:
            check_int("kvm_run.io.data", last.io.data, 0, (1 << 8 * last.io.size) - 1)
        if last.mmio is not None:
            check_int("kvm_run.mmio.data", last.mmio.data, 0, (1 << 8 * last.mmio.size) - 1)
        if last.msr is not None:
            check_u64("kvm_run.msr.data", last.msr.data)
            check_flag("kvm_run.msr.error", last.msr.error)
        if last.hypercall is not None:
            check_u64("kvm_run.hypercall.ret", last.hypercall.ret)

    def _complete_userspace_exit(self) -> None:
        """complete_userspace_io(): finish the last exit (IN data, MMIO read, RIP past HLT or
        VMCALL, RDMSR/WRMSR with what userspace put in kvm_run.msr) before anything else changes
        the vCPU: what userspace wrote into its copy in kvm_run goes to the vCPU now."""
        last, self._userspace_exit = self._userspace_exit, None
        if last is not None and last.msr is not None:  # complete_userspace_rdmsr / _emulated_msr_access
            self.cpu.set_exit_result(data=last.msr.data & 0xFFFF_FFFF_FFFF_FFFF, error=bool(last.msr.error))
        elif last is not None and (last.io or last.mmio) is not None:
            part = last.io or last.mmio
            if part.direction is Direction.IN:  # complete_emulated_pio / complete_emulated_mmio
                self.cpu.set_exit_result(data=part.data)
        self.cpu.complete_pending_exit()

    def _run_loop(self, budget: int | None, start: tuple[int, int]) -> KvmRun:
        cpu, state, host = self.cpu, self.state, self.host_cpu
        while True:
            left = None if budget is None else max(0, budget - guest_time_ns(cpu.instructions_retired - start[0],
                                                                             self.stat_exits - start[1]))
            # kvm_check_and_inject_events: the window exit userspace asked for, when it has no
            # interrupt queued (the CPU takes a queued one itself once the window opens)
            vmx.vmx_set_irq_window(state, self.request_interrupt_window and cpu.pending_interrupt is None)
            if left != 0 and state.smi_pending and smm.smi_allowed(state) and not cpu.has_pending_event:
                entered = self._enter_smm()
                if entered is not None:
                    return entered
            if nested_interrupt_exit_due(self):
                continue  # vmx_check_nested_events: L2 → L1 for the pending interrupt
            if self.nested.vmx_abort is not None:  # nested_vmx_abort's KVM_REQ_TRIPLE_FAULT
                return self._vmx_abort_shutdown()
            if left != 0 and not self.nested.guest_mode:  # L2 runs: NMIs wait for L1 (cetvm.kvm.nmi)
                _nmi.kvm_check_and_inject_nmi(state, cpu.has_pending_event)
            forced, self._forced_emulation = self._forced_emulation, False
            # an interrupt kept for L1 (nested exit without acknowledge): step L1 until it can take it
            forced = forced or nested_irq_for_l1_waits(self)
            vmx.vmx_vcpu_enter(state, cpu)
            vmx.vmx_update_cr8_intercept(state, None if nested_l2_owns_cr8(self) else self.cr8)
            native = cpu.native_exit_insns
            if native is not None:
                self._prepare_native_port_io(native)
            exit_ = cpu.run(1 if forced and left != 0 else left)
            vmx.vmx_vcpu_exit(state, cpu, host)
            _nmi.vmx_complete_nmi(state)
            if native is not None:
                self._collect_native_port_io(native)
            if forced and exit_.reason is ExitReason.BUDGET and left != 1:
                continue  # the instruction KVM emulated (force-emulation prefix) or L1 stepped retired
            if self._exit_costs_guest_time(exit_):
                self.stat_exits += 1
            result = self._handle_exit(exit_)
            if result is not None:
                return result
            # Handled in the kernel (CPUID, MSR, XSETBV, VMCALL): the instruction retires now,
            # so it counts against this run's budget before the next slice is computed.
            cpu.complete_pending_exit()
            if self._irq_window_exit_due():
                # vcpu_run(): userspace waits to inject and now may (e.g. L1 entered an L2 that
                # exits on external interrupts, whatever RFLAGS.IF says)
                return KvmRun(KvmExitReason.IRQ_WINDOW_OPEN, cpu.rip)

    def _exit_costs_guest_time(self, exit_: VmExit) -> bool:
        """The rule of :mod:`cetvm.kvm.timekeeping`: every exit costs VM_EXIT_NS but cetvm's
        budget stop and interrupt-window exits, the port I/O the CPU's native loop may complete
        next to the engine (a write a coalesced zone covers, a byte read of a read-only PIO
        register: on either path, so both give the same guest time) and an exception only
        userspace intercepts (KVM's own #UD intercept and an L2 exception L1 may want are exits
        the guest's execution makes)."""
        if exit_.reason in _FREE_EXITS or self._pio_register_value(exit_) is not None:
            return False
        if self.vm.coalesced_mmio.covers(exit_) is not None:
            return False  # (also when the ring is full: whether it is depends on where runs end)
        exc = exit_.exception
        if exit_.reason is ExitReason.EXCEPTION and exc is not None and not self.nested.guest_mode:
            vector = exc.vector
            return not self._user_exception_bitmap >> vector & 1 or bool(self._kvm_exception_bitmap >> vector & 1)
        return True

    def _prepare_native_port_io(self, native: NativeExitInsns) -> None:
        """Before entering the guest: what the CPU may do with port I/O next to the engine
        instead of exiting (coalesced_mmio_write for the VM's PIO zones, the VM's read-only PIO
        registers), never while L2 runs (L1 decides about its I/O), and how much the ring takes."""
        vm = self.vm
        generation = (vm.coalesced_mmio.generation, vm.pio_read_generation)
        if generation != self._native_port_io_generation:
            native.set_coalesced_ports(vm.coalesced_mmio.pio_ports)
            native.set_read_values(vm.pio_read_values)
            self._native_port_io_generation = generation
        native.set_port_io(not self.nested.guest_mode)
        native.set_fastpath_enabled(not self.nested.guest_mode)
        native.set_room(vm.coalesced_mmio.room)

    def _collect_native_port_io(self, native: NativeExitInsns) -> None:
        """After the guest ran: the OUTs the CPU kept go into the ring before the exit is handled
        (the guest made them first), and its port I/O counts as exits KVM handled."""
        writes = native.take_writes()
        if writes:
            self.vm.coalesced_mmio.append_pio_bytes(writes)
        self.host_cpu.exits += native.take_pio_exits()
        fastpath_exits = native.take_fastpath_exits()  # CPUID, VMCALL: exits that cost guest time
        self.host_cpu.exits += fastpath_exits
        self.stat_exits += fastpath_exits

    def _pio_register_value(self, exit_: VmExit) -> int | None:
        """The value of the read-only PIO register (:meth:`KvmVm.set_pio_read_value`) a byte IN
        reads, None for any other exit."""
        io = exit_.io
        if io is None or io.direction is not Direction.IN or io.size != 1:
            return None
        return self.vm.pio_read_values.get(io.port)

    def _answers_pio_read(self, exit_: VmExit) -> bool:
        """A byte IN from a read-only PIO register completes here with its value (the CPU's
        native path does the same next to the engine)."""
        value = self._pio_register_value(exit_)
        if value is None:
            return False
        exit_.io.data = value
        return True

    def _handle_exit(self, exit_: VmExit) -> KvmRun | None:
        reason = exit_.reason
        if self.nested.guest_mode and nested_vmx_reflect_vmexit(self, exit_):
            return None  # L1 handles it (nested_vmx_reflect_vmexit)
        if reason is ExitReason.VMX_INSTRUCTION:
            if handle_vmx_instruction(self, exit_):  # L2 entered halted: kvm_emulate_halt_noskip
                self._userspace_exit = KvmRun(KvmExitReason.HLT, self.cpu.rip)
                return self._userspace_exit
            return None
        if reason is ExitReason.CPUID:
            handle_cpuid(self.state, self.cpu, self.msrs.apic_base)
            return None
        if reason is ExitReason.INVD:  # handle_invd: kvm_emulate_as_nop
            return None
        if reason is ExitReason.TPR_BELOW_THRESHOLD:  # the MOV to CR8 retired; kvm_run.cr8 has it
            return KvmRun(KvmExitReason.SET_TPR, exit_.rip)
        if reason in (ExitReason.RDMSR, ExitReason.WRMSR):
            user = handle_msr(self.state, self.msrs, self.cpu, exit_, self.vm.msr_filter,
                              self.vm.user_space_msr_mask, self._fpu_get, self._fpu_put)
            if user is None:
                return None
            kind = KvmExitReason.X86_RDMSR if reason is ExitReason.RDMSR else KvmExitReason.X86_WRMSR
            self._userspace_exit = KvmRun(kind, exit_.rip, msr=user)
            return self._userspace_exit
        if reason is ExitReason.XSETBV:
            handle_xsetbv(self.state, self.cpu, exit_)
            return None
        if reason is ExitReason.CR_ACCESS:
            handle_cr(self.state, self.cpu, exit_)
            return None
        if reason is ExitReason.NMI_WINDOW:
            _nmi.handle_nmi_window(self.state)
            return None
        if reason is ExitReason.INTERRUPT_WINDOW:  # handle_interrupt_window, then vcpu_run's check
            vmx.vmx_set_irq_window(self.state, False)
            return KvmRun(KvmExitReason.IRQ_WINDOW_OPEN, exit_.rip) if self._irq_window_exit_due() else None
        if reason is ExitReason.VMCALL:
            hypercall = handle_vmcall(self.cpu, self.vm.exit_hypercall_mask)
            if hypercall is None:
                return None
            self._hypercall = hypercall
            return KvmRun(KvmExitReason.HYPERCALL, exit_.rip, hypercall=hypercall)
        if reason is ExitReason.EXCEPTION and exit_.exception is not None:
            return self._handle_exception_exit(exit_)
        if reason is ExitReason.MMIO and self._emulator_refuses(exit_.rip):
            return KvmRun(KvmExitReason.INTERNAL_ERROR, exit_.rip, suberror=InternalErrorSuberror.EMULATION,
                          detail="MMIO access by an instruction CET guards: KVM does not emulate it")
        if self.vm.coalesced_mmio.absorbs(exit_):
            return None  # kept in the ring; the write retires without an exit (coalesced_mmio_write)
        if self._answers_pio_read(exit_):
            return None
        self._userspace_exit = userspace_exit(exit_, self.state.vmcs.read(VmcsField.VM_EXIT_REASON))
        return self._userspace_exit

    def _vmx_abort_shutdown(self) -> KvmRun:
        """KVM_REQ_TRIPLE_FAULT after a VMX abort: KVM_EXIT_SHUTDOWN (kvm_check_request)."""
        indicator, self.nested.vmx_abort = self.nested.vmx_abort, None
        return KvmRun(KvmExitReason.SHUTDOWN, self.cpu.rip, detail=f"VMX abort (indicator {indicator})")

    def _fpu_get(self) -> None:
        vmx.kvm_load_guest_fpu(self.state, self.cpu)

    def _fpu_put(self) -> None:
        vmx.kvm_put_guest_fpu(self.state, self.cpu)

    def kvm_msr_with_filter(self, index: int, data: int | None = None) -> tuple[bool, int]:
        """A guest-initiated RDMSR (``data`` None) or WRMSR that KVM makes itself (nested
        MSR-load/store lists: kvm_get/set_msr_with_filter): (succeeded, value read)."""
        result, value = kvm_msr_with_filter(self.state, self.msrs, self.cpu, index, data, self.vm.msr_filter,
                                            self._fpu_get, self._fpu_put)
        return result is MsrResult.OK, value

    def _handle_exception_exit(self, exit_: VmExit) -> KvmRun | None:
        """An intercepted exception: KVM's own #UD intercept first (handle_ud and the
        force-emulation prefix, :func:`cetvm.kvm.emulate.kvm_handle_ud`; RSM; SYSCALL for AMD guests), then
        userspace's."""
        exc = exit_.exception
        assert exc is not None
        if exc.vector == Vector.UD and self._kvm_exception_bitmap >> Vector.UD & 1:
            handled = kvm_handle_ud(self.cpu, self._force_emulation_prefix, *self._guest_cet_controls())
            if handled is not None:
                self._forced_emulation = handled
                return None
            if is_rsm(self.cpu, exit_.rip):
                return self._em_rsm(exit_.rip)
            if kvm_emulate_syscall_on_ud(self.cpu, self.state.cpuid.entries.vendor_string,
                                         *self._guest_cet_controls()) is not None:
                return None
            if not self._user_exception_bitmap >> Vector.UD & 1:
                self.cpu.inject_exception(Vector.UD)
                return None
        return KvmRun(KvmExitReason.EXCEPTION, exit_.rip, exception=self._exception_exit(exit_))

    # ------------------------------------------------------------------ NMI
    def nmi(self) -> None:
        """KVM_NMI (kvm_vcpu_ioctl_nmi → kvm_inject_nmi): queue an NMI; it is injected at a VM
        entry where NMIs are not blocked (:mod:`cetvm.kvm.nmi`)."""
        _nmi.kvm_inject_nmi(self.state)

    @property
    def nmi_pending(self) -> bool:
        """An NMI queued or pending (kvm_vcpu_has_events): it wakes a halted vCPU whatever
        RFLAGS.IF says."""
        return _nmi.kvm_nmi_pending(self.state)

    def get_vcpu_events_nmi(self) -> _nmi.NmiEvents:
        """KVM_GET_VCPU_EVENTS, its ``nmi`` member (injected, pending count, masked)."""
        return _nmi.nmi_events(self.state)

    def set_vcpu_events_nmi(self, nmi: _nmi.NmiEvents) -> None:
        """KVM_SET_VCPU_EVENTS with KVM_VCPUEVENT_VALID_NMI_PENDING: ``pending`` a u8 (KVM keeps
        at most 2, or 1 while masked), ``injected`` and ``masked`` booleans; -EINVAL otherwise."""
        nmi = check_instance("KVM_SET_VCPU_EVENTS: nmi", nmi, _nmi.NmiEvents)
        nmi = _nmi.NmiEvents(injected=check_flag("KVM_SET_VCPU_EVENTS: nmi.injected", nmi.injected),
                             pending=check_u8("KVM_SET_VCPU_EVENTS: nmi.pending", nmi.pending),
                             masked=check_flag("KVM_SET_VCPU_EVENTS: nmi.masked", nmi.masked))
        _nmi.set_nmi_events(self.state, nmi)

    # ------------------------------------------------------------------ SMM
    def smi(self) -> None:
        """KVM_SMI (process_smi): make an SMI pending; the vCPU enters SMM at its next run
        (not an immediate_exit one), or after RSM when it is in SMM already."""
        self.state.smi_pending = True

    def get_vcpu_events_smi(self) -> smm.SmiEvents:
        """KVM_GET_VCPU_EVENTS, its ``smi`` member (KVM_VCPUEVENT_VALID_SMM)."""
        return smm.smi_events(self.state, self._init_latched)

    def set_vcpu_events_smi(self, smi: smm.SmiEvents) -> None:
        """KVM_SET_VCPU_EVENTS with KVM_VCPUEVENT_VALID_SMM: enter or leave SMM (the flags only,
        no state is saved or loaded), the pending SMI, HF_SMM_INSIDE_NMI and the latched INIT.
        -EINVAL for a vCPU in INIT_RECEIVED put in SMM or given a pending SMI, as KVM."""
        smi = check_instance("KVM_SET_VCPU_EVENTS: smi", smi, smm.SmiEvents)
        for name in ("smm", "pending", "smm_inside_nmi", "latched_init"):
            check_flag(f"KVM_SET_VCPU_EVENTS: smi.{name}", getattr(smi, name))
        if (smi.smm or smi.pending) and self.get_mp_state() is MpState.INIT_RECEIVED:
            raise KvmInvalidArgument("KVM_SET_VCPU_EVENTS: a vCPU in INIT_RECEIVED cannot be in SMM or have an SMI pending")
        smm.set_smi_events(self.state, smi)
        self._init_latched = smi.latched_init

    def _enter_smm(self) -> KvmRun | None:
        """kvm_check_and_inject_events() taking the pending SMI (enter_smm)."""
        state = self.state
        state.smi_pending = False
        state.smi_count += 1
        rip = self.cpu.rip
        entered = smm.enter_smm(state, self.cpu)
        if entered.dead:
            return KvmRun(KvmExitReason.INTERNAL_ERROR, rip, suberror=InternalErrorSuberror.EMULATION,
                          detail=entered.detail)
        if entered.shutdown:
            return KvmRun(KvmExitReason.SHUTDOWN, rip, detail=entered.detail)
        return None

    def _em_rsm(self, rip: int) -> KvmRun | None:
        """KVM emulates RSM at its #UD intercept (em_rsm): #UD outside SMM, a shutdown when the
        state-save map cannot be loaded."""
        done = smm.em_rsm(self.state, self.cpu)
        if done.ud:
            self.cpu.inject_exception(Vector.UD)
            return None
        if done.shutdown:
            return KvmRun(KvmExitReason.SHUTDOWN, rip, detail=done.detail)
        self.cpu.retire_emulated()
        if self._init_latched:  # kvm_smm_changed(): KVM_REQ_EVENT takes the INIT latched in SMM now
            self._accept_events()
            if self.mp_state is not MpState.RUNNABLE:
                return KvmRun(KvmExitReason.INTR, self.cpu.rip, detail="vCPU is waiting for INIT/SIPI")
        return None

    def _guest_cet_controls(self) -> tuple[int, int]:
        """(U_CET, S_CET) as the emulator's get_msr reads them (0 when the guest lacks CET)."""
        vmx.kvm_put_guest_fpu(self.state, self.cpu)
        try:
            return tuple(kvm_get_msr(self.state, index)[1] for index in (Msr.IA32_U_CET, Msr.IA32_S_CET))
        finally:
            vmx.kvm_load_guest_fpu(self.state, self.cpu)

    def _emulator_refuses(self, rip: int) -> bool:
        """KVM emulates an MMIO access; it refuses a CET-guarded instruction while CET is on
        (x86_decode_insn → EMULATION_FAILED → KVM_EXIT_INTERNAL_ERROR)."""
        if not self.cpu.cr4 & Cr4.CET:
            return False
        try:
            instr = self.cpu.fetch_instruction(rip)
        except GuestFault:
            return False
        return emulation_blocked_by_cet(cet_guards(instr), self.cpu.cr4, *self._guest_cet_controls())

    def _exception_exit(self, exit_: VmExit) -> KvmExceptionExit:
        """The intercepted exception with the state userspace needs to describe it: SSP as
        VM exit saved it in GUEST_SSP, RSP and CPL at the faulting instruction."""
        exc = exit_.exception
        assert exc is not None
        return KvmExceptionExit(exc.vector, exc.error_code, exit_.rip, int(self.cpu.cpl),
                                self.state.vmcs.read(VmcsField.GUEST_SSP), self.cpu.get_regs().rsp, exc.cr2)
