"""KVM's in-kernel handling of VM exits (vmx_handle_exit → kvm_emulate_* handlers) and the
``kvm_run`` exit reasons returned to userspace [K x86.c, vmx.c, cpuid.c].

Handled inside KVM (the run loop re-enters the guest):

- CPUID — kvm_emulate_cpuid(): the vCPU's table (KVM_SET_CPUID2 + runtime leaf 0xD sizes);
  CPUID.1.ECX.OSXSAVE mirrors CR4.OSXSAVE, CPUID.1.EDX.APIC mirrors IA32_APIC_BASE.EN (a guest
  that disables its local APIC no longer sees one) and CPUID.7.ECX.OSPKE mirrors CR4.PKE
  (kvm_update_cpuid_runtime). Decision: a leaf the table lacks reads as zeros.
- RDMSR/WRMSR of intercepted MSRs — kvm_get_msr/kvm_set_msr with host_initiated=False;
  GUEST_GP injects #GP(0). The xstate-managed MSRs need the guest FPU (kvm_fpu_get), so the
  loaded FPU is put before and loaded again after the access.
- XSETBV — __kvm_set_xcr(): only XCR0; #GP(0) for bits outside guest_supported_xcr0 | x87 or
  an architecturally invalid combination; a new XCR0 updates CPUID.(0xD,0/1).EBX.
- VMCALL — kvm_emulate_hypercall(): CPL > 0 → RAX = -KVM_EPERM; a hypercall number the VMM
  enabled with KVM_CAP_EXIT_HYPERCALL exits as KVM_EXIT_HYPERCALL (the VMM writes ``ret``,
  which lands in RAX before the guest resumes); anything else → RAX = -KVM_ENOSYS (-1000).

Returned to userspace (:class:`KvmExitReason`): IO and MMIO (the VMM completes an IN / MMIO
read by filling ``data`` before the next run, like kvm_run.io/mmio); HLT — decision: cetvm's
KVM has no in-kernel irqchip (as KVM without KVM_CREATE_IRQCHIP), so __kvm_emulate_halt()
always returns KVM_EXIT_HLT to userspace; SHUTDOWN for a triple fault; INTERNAL_ERROR with
suberror EMULATION when the CPU cannot go on (instruction fetch from no RAM, an event the CPU
cannot deliver) or an unexpected exception exit; INTR when the instruction budget of
:meth:`cetvm.kvm.api.KvmVcpu.run` is used up — cetvm's budget acts like a signal kicking the
vCPU out of KVM_RUN (-EINTR with exit_reason KVM_EXIT_INTR); IRQ_WINDOW_OPEN when userspace set
``request_interrupt_window`` and the guest can take an interrupt [K api.rst "KVM_INTERRUPT",
"request_interrupt_window"; x86.c vcpu_run / dm_request_for_irq_injection]. Decision: the
window is checked at run entry and after every exit KVM handles itself (never per block), so
an STI in a stretch of code the engine runs without exits is noticed at the next exit or slice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cetvm import CetvmError
from cetvm.arch import Cr4, Vector
from cetvm.arch.apic import APIC_BASE_ENABLE
from cetvm.arch.apic import X2APIC_MSRS
from cetvm.arch.cpuid_bits import FEATURES
from cetvm.arch.vmx import CR_ACCESS_TYPE_MOV_TO_CR, VmcsField
from cetvm.arch.xfeatures import XFeature
from cetvm.cpu.exits import ExitReason, IoExit, MmioExit, VmExit
from cetvm.kvm.cr import kvm_set_cr4
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.ioctl_args import check_bytes, check_instance, check_u32
from cetvm.kvm.msr import (
    CPU_HELD_MSRS,
    KvmMsrState,
    MsrResult,
    is_xstate_managed_msr,
    kvm_guest_get_msr_raw,
    kvm_guest_set_msr_raw,
)
from cetvm.kvm.vcpu import VcpuArch
from cetvm.xstate import xcr0_fault
from cetvm.arch.regs import U64_MASK

KVM_ENOSYS = 1000
KVM_EPERM = 1
_OSPKE = 1 << 4  # CPUID.(7,0).ECX[4]


class KvmExitReason(enum.Enum):
    """kvm_run.exit_reason values cetvm returns."""

    IO = "KVM_EXIT_IO"
    MMIO = "KVM_EXIT_MMIO"
    HLT = "KVM_EXIT_HLT"
    SHUTDOWN = "KVM_EXIT_SHUTDOWN"
    INTERNAL_ERROR = "KVM_EXIT_INTERNAL_ERROR"
    INTR = "KVM_EXIT_INTR"
    HYPERCALL = "KVM_EXIT_HYPERCALL"
    X86_RDMSR = "KVM_EXIT_X86_RDMSR"
    X86_WRMSR = "KVM_EXIT_X86_WRMSR"
    IRQ_WINDOW_OPEN = "KVM_EXIT_IRQ_WINDOW_OPEN"
    #: the guest lowered its TPR (MOV to CR8) below what userspace's APIC had: kvm_run.cr8 has
    #: the new value (handle_cr without an in-kernel LAPIC)
    SET_TPR = "KVM_EXIT_SET_TPR"
    #: VM entry failed (kvm_run.fail_entry.hardware_entry_failure_reason: the VM_EXIT_REASON,
    #: bit 31 set); ``detail`` names the guest-state check [K vmx.c __vmx_handle_exit]
    FAIL_ENTRY = "KVM_EXIT_FAIL_ENTRY"
    #: cetvm extension: an exception userspace intercepts (KvmVcpu.set_exception_intercepts),
    #: before delivery. KVM reports these as KVM_EXIT_DEBUG (KVM_SET_GUEST_DEBUG) and, in old
    #: kernels, KVM_EXIT_EXCEPTION; cetvm uses the latter name for any vector.
    EXCEPTION = "KVM_EXIT_EXCEPTION"


class InternalErrorSuberror(enum.Enum):
    EMULATION = "KVM_INTERNAL_ERROR_EMULATION"
    DELIVERY_EV = "KVM_INTERNAL_ERROR_DELIVERY_EV"
    UNEXPECTED_EXIT_REASON = "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"


@dataclass
class HypercallExit:
    """kvm_run.hypercall: number, four arguments (RBX, RCX, RDX, RSI), and the VMM's result."""

    nr: int
    args: tuple[int, int, int, int]
    ret: int = 0


@dataclass(frozen=True)
class KvmExceptionExit:
    """kvm_run for KVM_EXIT_EXCEPTION (cetvm extension): the intercepted exception and the vCPU
    state at the faulting instruction, before delivery (``ssp``: the guest's current SSP,
    ``cpl``: CS.RPL, ``cr2``: the #PF address, None otherwise)."""

    vector: int
    error_code: int | None
    rip: int
    cpl: int
    ssp: int
    rsp: int
    cr2: int | None = None


@dataclass
class KvmRun:
    """What KVM_RUN returned: the exit reason and the matching union member — copies, as in the
    kvm_run page: what userspace writes into ``io.data`` / ``mmio.data`` / ``msr`` /
    ``hypercall.ret`` reaches the vCPU only when the next KVM_RUN completes the exit
    (complete_userspace_io)."""

    exit_reason: KvmExitReason
    rip: int
    io: IoExit | None = None
    mmio: MmioExit | None = None
    hypercall: HypercallExit | None = None
    msr: "KvmMsrExit | None" = None
    exception: KvmExceptionExit | None = None
    suberror: InternalErrorSuberror | None = None
    detail: str = ""
    #: kvm_run.fail_entry.hardware_entry_failure_reason (KVM_EXIT_FAIL_ENTRY)
    hardware_entry_failure_reason: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    #: kvm_run.if_flag and .ready_for_interrupt_injection, filled on every exit
    #: (post_kvm_run_save): RFLAGS.IF; and "KVM_INTERRUPT would deliver now" (IF = 1, no
    #: STI/MOV SS shadow, no interrupt already pending).
    if_flag: bool = False
    ready_for_interrupt_injection: bool = False
    #: kvm_run.cr8 at the exit (post_kvm_run_save: kvm_get_cr8), see KvmVcpu.cr8.
    cr8: int = 0

    def __str__(self) -> str:
        part = self.io or self.mmio or self.hypercall or self.msr or self.detail
        return f"{self.exit_reason.value} at {self.rip:#x}{' ' + str(part) if part else ''}"


# --------------------------------------------------------------------------- CPUID
def kvm_cpuid(vcpu: VcpuArch, cr4: int, apic_base: int, function: int, index: int) -> tuple[int, int, int, int]:
    """CPUID.(function, index) for the guest with its CR4 and IA32_APIC_BASE (module docstring)."""
    entries = vcpu.cpuid.entries
    if not entries.contains(function, index):
        return 0, 0, 0, 0
    eax, ebx, ecx, edx = entries.get(function, index)
    if function == 1:
        osxsave, apic = FEATURES["osxsave"].mask, FEATURES["apic"].mask
        ecx = (ecx | osxsave) if cr4 & Cr4.OSXSAVE else (ecx & ~osxsave)
        edx = (edx | apic) if apic_base & APIC_BASE_ENABLE else (edx & ~apic)
    elif function == 7 and index == 0:
        ecx = (ecx | _OSPKE) if cr4 & Cr4.PKE else (ecx & ~_OSPKE)
    return eax, ebx, ecx, edx


def handle_cpuid(vcpu: VcpuArch, cpu, apic_base: int) -> None:
    regs = kvm_cpuid(vcpu, cpu.cr4, apic_base, cpu.reg("rax") & 0xFFFF_FFFF, cpu.reg("rcx") & 0xFFFF_FFFF)
    for name, value in zip(("rax", "rbx", "rcx", "rdx"), regs):
        cpu.set_reg(name, value)


# --------------------------------------------------------------------------- MSRs
class KvmMsrExitReason(enum.IntFlag):
    """kvm_run.msr.reason, and the KVM_CAP_X86_USER_SPACE_MSR argument [K KVM_MSR_EXIT_REASON_*]."""

    INVAL = 1 << 0    # access to an invalid MSR or reserved bits (KVM's "return 1")
    UNKNOWN = 1 << 1  # an MSR KVM does not know (KVM_MSR_RET_UNSUPPORTED)
    FILTER = 1 << 2   # denied by KVM_X86_SET_MSR_FILTER (KVM_MSR_RET_FILTERED)


KVM_MSR_EXIT_REASON_VALID_MASK = int(KvmMsrExitReason.INVAL | KvmMsrExitReason.UNKNOWN
                                     | KvmMsrExitReason.FILTER)
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600


@dataclass
class KvmMsrExit:
    """kvm_run.msr for KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR. KVM fills ``reason``, ``index``
    and (for WRMSR) ``data`` and clears ``error``; before the next KVM_RUN userspace stores the
    value read in ``data``, or sets ``error`` = 1 to have KVM inject #GP(0) [K api.rst]."""

    reason: KvmMsrExitReason
    index: int
    data: int = 0
    error: int = 0

    def __str__(self) -> str:
        return f"MSR {self.index:#x} ({self.reason.name}) data={self.data:#x}"


@dataclass(frozen=True)
class MsrFilterRange:
    """struct kvm_msr_filter_range: ``nmsrs`` MSRs from ``base``; bit n of ``bitmap`` set
    allows the access kinds in ``flags`` (KVM_MSR_FILTER_READ/WRITE) to MSR base+n."""

    flags: int
    base: int
    nmsrs: int
    bitmap: bytes

    def covers(self, index: int, access: int) -> bool:
        return bool(self.flags & access) and self.base <= index < self.base + self.nmsrs

    def allows(self, index: int) -> bool:
        bit = index - self.base
        return bool(self.bitmap[bit >> 3] >> (bit & 7) & 1)


@dataclass(frozen=True)
class MsrFilter:
    """struct kvm_msr_filter as KVM holds it after KVM_X86_SET_MSR_FILTER."""

    default_deny: bool = False
    ranges: tuple[MsrFilterRange, ...] = ()

    def denies_any(self, index: int) -> bool:
        return not (kvm_msr_allowed(self, index, KVM_MSR_FILTER_READ)
                    and kvm_msr_allowed(self, index, KVM_MSR_FILTER_WRITE))


def kvm_msr_allowed(msr_filter: MsrFilter, index: int, access: int) -> bool:
    """kvm_msr_allowed(): x2APIC MSRs are never filtered; the first range that covers the index
    for this kind of access decides with its bitmap bit; otherwise the default action."""
    if index in X2APIC_MSRS:
        return True
    for rng in msr_filter.ranges:
        if rng.covers(index, access):
            return rng.allows(index)
    return not msr_filter.default_deny


def _check_filter_range_fields(i: int, rng: object) -> MsrFilterRange:
    """struct kvm_msr_filter_range: flags, base and nmsrs are u32, the bitmap a buffer."""
    what = f"KVM_X86_SET_MSR_FILTER: range {i}"
    rng = check_instance(what, rng, MsrFilterRange)
    return MsrFilterRange(check_u32(f"{what}: flags", rng.flags), check_u32(f"{what}: base", rng.base),
                          check_u32(f"{what}: nmsrs", rng.nmsrs),
                          check_bytes(f"{what}: bitmap", rng.bitmap, KVM_MSR_FILTER_MAX_BITMAP_SIZE))


def _check_filter_range(i: int, rng: MsrFilterRange) -> None:
    """kvm_add_msr_filter(): known flags, a non-empty bitmap no larger than 0x600 bytes that
    holds nmsrs bits, 32-bit indices."""
    def bad(why: str) -> KvmInvalidArgument:
        return KvmInvalidArgument(f"KVM_X86_SET_MSR_FILTER: range {i}: {why}")
    if rng.flags & ~(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE) or not rng.flags:
        raise bad(f"flags {rng.flags:#x} must be KVM_MSR_FILTER_READ and/or KVM_MSR_FILTER_WRITE")
    size = (rng.nmsrs + 63) // 64 * 8
    if size > KVM_MSR_FILTER_MAX_BITMAP_SIZE:
        raise bad(f"{rng.nmsrs} MSRs need a bitmap larger than {KVM_MSR_FILTER_MAX_BITMAP_SIZE:#x} bytes")
    if len(rng.bitmap) * 8 < rng.nmsrs:
        raise bad(f"bitmap of {len(rng.bitmap)} bytes is shorter than {rng.nmsrs} bits")
    if not 0 <= rng.base < 1 << 32 or rng.base + rng.nmsrs > 1 << 32:
        raise bad(f"MSRs {rng.base:#x}+{rng.nmsrs} are not 32-bit indices")


def kvm_vm_ioctl_set_msr_filter(flags: int, ranges: list[MsrFilterRange]) -> MsrFilter:
    """KVM_X86_SET_MSR_FILTER: validate and build the filter. Ranges with nmsrs == 0 are
    skipped; all-empty with KVM_MSR_FILTER_DEFAULT_DENY is -EINVAL."""
    if flags & ~KVM_MSR_FILTER_DEFAULT_DENY:
        raise KvmInvalidArgument(f"KVM_X86_SET_MSR_FILTER: unknown flags {flags:#x}")
    if len(ranges) > KVM_MSR_FILTER_MAX_RANGES:
        raise KvmInvalidArgument(f"KVM_X86_SET_MSR_FILTER: {len(ranges)} ranges, at most "
                                 f"{KVM_MSR_FILTER_MAX_RANGES}")
    ranges = [_check_filter_range_fields(i, r) for i, r in enumerate(ranges)]
    used = [r for r in ranges if r.nmsrs]
    if not used and flags & KVM_MSR_FILTER_DEFAULT_DENY:
        raise KvmInvalidArgument("KVM_X86_SET_MSR_FILTER: KVM_MSR_FILTER_DEFAULT_DENY needs at least one range")
    for i, rng in enumerate(used):
        _check_filter_range(i, rng)
    return MsrFilter(bool(flags & KVM_MSR_FILTER_DEFAULT_DENY), tuple(used))


class MsrInterceptBitmap:
    """The VMX MSR bitmap KVM programs: every MSR exits to KVM except the ``passthrough`` ones
    (an index outside the bitmap's ranges always exits on VMX, so "intercept unless listed"
    is the hardware's own rule). vmx_msr_filter_changed(): an MSR the filter denies in any
    direction is intercepted even if it would pass through."""

    def __init__(self, passthrough: frozenset[int]) -> None:
        self.passthrough = passthrough

    def __contains__(self, index: object) -> bool:
        return index not in self.passthrough

    def intercepted(self, candidates) -> set[int]:
        """The members of ``candidates`` that exit (for inspection and tests)."""
        return {int(i) for i in candidates if i in self}


def vmx_msr_bitmap(cet_intercepts: set[int], cet_msrs: frozenset[int], msr_filter: MsrFilter) -> MsrInterceptBitmap:
    """Pass through the CPU-held MSRs and the CET MSRs vmx_update_intercept_for_cet_msr() lets
    through, minus everything the filter denies."""
    passthrough = (CPU_HELD_MSRS | (cet_msrs - cet_intercepts))
    if msr_filter.ranges or msr_filter.default_deny:
        passthrough = frozenset(i for i in passthrough if not msr_filter.denies_any(i))
    return MsrInterceptBitmap(frozenset(passthrough))


def kvm_msr_reason(result: MsrResult) -> KvmMsrExitReason:
    """kvm_msr_reason(): UNSUPPORTED → UNKNOWN, FILTERED → FILTER, any other failure → INVAL."""
    if result is MsrResult.UNSUPPORTED:
        return KvmMsrExitReason.UNKNOWN
    if result is MsrResult.FILTERED:
        return KvmMsrExitReason.FILTER
    return KvmMsrExitReason.INVAL


def kvm_msr_with_filter(vcpu: VcpuArch, msrs: KvmMsrState, cpu, index: int, data: int | None,
                        msr_filter: MsrFilter, fpu_get, fpu_put) -> tuple[MsrResult, int]:
    """kvm_get_msr_with_filter (``data`` None) / kvm_set_msr_with_filter: a guest-initiated
    access — the MSR filter first (FILTERED), then KVM's handler with the guest FPU put around
    an xstate-managed MSR. (raw result, value read or 0)."""
    access = KVM_MSR_FILTER_READ if data is None else KVM_MSR_FILTER_WRITE
    if not kvm_msr_allowed(msr_filter, index, access):
        return MsrResult.FILTERED, 0
    needs_fpu = is_xstate_managed_msr(index)
    if needs_fpu:
        fpu_put()
    try:
        if data is None:
            return kvm_guest_get_msr_raw(vcpu, msrs, cpu, index)
        return kvm_guest_set_msr_raw(vcpu, msrs, cpu, index, data), 0
    finally:
        if needs_fpu:
            fpu_get()


def handle_msr(vcpu: VcpuArch, msrs: KvmMsrState, cpu, exit_: VmExit, msr_filter: MsrFilter,
               user_space_msr_mask: int, fpu_get, fpu_put) -> KvmMsrExit | None:
    """kvm_emulate_rdmsr / kvm_emulate_wrmsr for an intercepted guest RDMSR/WRMSR.

    The filter is checked first (kvm_get/set_msr_with_filter), then KVM's handler runs. On
    failure, kvm_msr_user_space(): if userspace enabled the reason, return the exit for
    KVM_RUN (the CPU completes it at the next entry with what userspace wrote); else the CPU
    injects #GP(0). The xstate-managed MSRs need the guest FPU put around the access.
    """
    msr = exit_.msr
    assert msr is not None
    reading = exit_.reason is ExitReason.RDMSR
    result, data = kvm_msr_with_filter(vcpu, msrs, cpu, msr.index, None if reading else msr.data, msr_filter,
                                       fpu_get, fpu_put)
    if result is MsrResult.OK:
        cpu.set_exit_result(data=data if reading else None)
        return None
    reason = kvm_msr_reason(result)
    if user_space_msr_mask & reason:
        return KvmMsrExit(reason, msr.index, 0 if reading else msr.data)
    cpu.set_exit_result(error=True)
    return None


# --------------------------------------------------------------------------- XSETBV
def kvm_set_xcr_fault(vcpu: VcpuArch, index: int, xcr0: int) -> str | None:
    """__kvm_set_xcr(): why the write fails (#GP for the guest, -EINVAL for userspace)."""
    if index != 0:
        return f"XCR{index} does not exist (only XCR0)"
    valid = vcpu.cpuid.guest_supported_xcr0 | XFeature.X87.mask
    return xcr0_fault(xcr0, valid)


def kvm_set_xcr0(vcpu: VcpuArch, xcr0: int) -> None:
    if xcr0 != vcpu.xcr0:
        vcpu.xcr0 = xcr0
        vcpu.cpuid.kvm_update_cpuid_runtime(vcpu.xcr0, vcpu.ia32_xss)


def handle_xsetbv(vcpu: VcpuArch, cpu, exit_: VmExit) -> None:
    if kvm_set_xcr_fault(vcpu, exit_.xcr_index, exit_.xcr_value):
        cpu.inject_exception(Vector.GP, 0)
        return
    kvm_set_xcr0(vcpu, exit_.xcr_value)


# --------------------------------------------------------------------------- CR access
#: GPR numbers of the exit qualification (SDM Vol. 3 Table 28-3) → register names.
_GPR_BY_NUMBER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def handle_cr(vcpu: VcpuArch, cpu, exit_: VmExit) -> None:
    """handle_cr(): a MOV to CR4 that touched a host-owned bit. kvm_set_cr4() refuses it → #GP(0);
    otherwise the guest's CR4 takes the value (vmcs_writel(GUEST_CR4), the read shadow follows)
    and the instruction retires. Other CRs and access types do not exit (their masks are 0)."""
    qualification = exit_.qualification
    cr, access = qualification & 0xF, (qualification >> 4) & 3
    if cr != 4 or access != CR_ACCESS_TYPE_MOV_TO_CR:
        raise CetvmError(f"internal error: unexpected CR-access exit (qualification {qualification:#x})")
    value = cpu.reg(_GPR_BY_NUMBER[(qualification >> 8) & 0xF])
    if not cpu.long_mode:
        value &= 0xFFFF_FFFF
    if not kvm_set_cr4(vcpu, value):
        cpu.inject_exception(Vector.GP, 0)
        return
    cpu.write_cr(4, value)
    vcpu.vmcs.write(VmcsField.CR4_READ_SHADOW, value & vcpu.vmcs.read(VmcsField.CR4_GUEST_HOST_MASK))


# --------------------------------------------------------------------------- VMCALL
def hypercall_args(cpu) -> tuple[int, tuple[int, int, int, int]]:
    """(nr, (a0..a3)) from RAX, RBX, RCX, RDX, RSI; truncated to 32 bits outside 64-bit mode."""
    mask = U64_MASK if cpu.long_mode else 0xFFFF_FFFF
    regs = [cpu.reg(n) & mask for n in ("rax", "rbx", "rcx", "rdx", "rsi")]
    return regs[0], (regs[1], regs[2], regs[3], regs[4])


def kvm_hypercall_result(nr: int, cpl: int, exit_hypercall_mask: int) -> int | None:
    """kvm_emulate_hypercall()'s RAX for hypercall ``nr`` at ``cpl``, or None when it goes to
    userspace (KVM_CAP_EXIT_HYPERCALL): -KVM_EPERM above CPL 0; KVM implements none of the
    hypercalls a guest may make here, so -KVM_ENOSYS."""
    if cpl != 0:
        return -KVM_EPERM & U64_MASK
    if nr < 64 and exit_hypercall_mask >> nr & 1:
        return None
    return -KVM_ENOSYS & U64_MASK


def handle_vmcall(cpu, exit_hypercall_mask: int) -> HypercallExit | None:
    """kvm_emulate_hypercall(); returns the exit for userspace, or None when handled."""
    nr, args = hypercall_args(cpu)
    result = kvm_hypercall_result(nr, cpu.cpl, exit_hypercall_mask)
    if result is None:
        return HypercallExit(nr, args)
    cpu.set_reg("rax", result)
    return None


# --------------------------------------------------------------------------- exits for userspace
def userspace_exit(exit_: VmExit, hardware_entry_failure_reason: int = 0) -> KvmRun:
    """Map a CPU exit KVM does not handle itself to kvm_run (``hardware_entry_failure_reason``:
    the VMCS's VM_EXIT_REASON, for KVM_EXIT_FAIL_ENTRY)."""
    reason = exit_.reason
    if reason is ExitReason.IO and exit_.io is not None:
        io = exit_.io
        return KvmRun(KvmExitReason.IO, exit_.rip, io=IoExit(io.port, io.size, io.direction, io.data))
    if reason is ExitReason.MMIO and exit_.mmio is not None:
        mmio = exit_.mmio
        return KvmRun(KvmExitReason.MMIO, exit_.rip, mmio=MmioExit(mmio.address, mmio.size, mmio.direction, mmio.data))
    if reason is ExitReason.HLT:
        return KvmRun(KvmExitReason.HLT, exit_.rip)
    if reason is ExitReason.ENTRY_FAILED:
        return KvmRun(KvmExitReason.FAIL_ENTRY, exit_.rip, detail=exit_.detail,
                      hardware_entry_failure_reason=hardware_entry_failure_reason)
    if reason is ExitReason.TRIPLE_FAULT:
        return KvmRun(KvmExitReason.SHUTDOWN, exit_.rip, detail=exit_.detail or "triple fault")
    if reason is ExitReason.BUDGET:
        return KvmRun(KvmExitReason.INTR, exit_.rip, detail="instruction budget reached")
    if reason is ExitReason.DELIVERY_FAILED:
        return KvmRun(KvmExitReason.INTERNAL_ERROR, exit_.rip, suberror=InternalErrorSuberror.DELIVERY_EV,
                      detail=exit_.detail)
    if reason is ExitReason.EMULATION_FAILED:
        return KvmRun(KvmExitReason.INTERNAL_ERROR, exit_.rip, suberror=InternalErrorSuberror.EMULATION,
                      detail=exit_.detail)
    return KvmRun(KvmExitReason.INTERNAL_ERROR, exit_.rip,
                  suberror=InternalErrorSuberror.UNEXPECTED_EXIT_REASON, detail=str(exit_))
