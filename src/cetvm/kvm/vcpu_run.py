"""KVM's in-kernel handling of VM exits (vmx_handle_exit → kvm_emulate_* handlers) and the
``kvm_run`` exit reasons returned to userspace [K x86.c, vmx.c, cpuid.c].

Handled inside KVM (the run loop re-enters the guest):

- CPUID — kvm_emulate_cpuid(): the vCPU's table (KVM_SET_CPUID2 + runtime leaf 0xD sizes);
  CPUID.1.ECX.OSXSAVE mirrors CR4.OSXSAVE and CPUID.7.ECX.OSPKE mirrors CR4.PKE
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
vCPU out of KVM_RUN (-EINTR with exit_reason KVM_EXIT_INTR).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cetvm.arch import Cr4, Vector
from cetvm.arch.cpuid_bits import FEATURES
from cetvm.arch.xfeatures import XFeature
from cetvm.cpu.exits import ExitReason, IoExit, MmioExit, VmExit
from cetvm.kvm.msr import MsrResult, is_xstate_managed_msr, kvm_get_msr, kvm_set_msr
from cetvm.kvm.vcpu import VcpuCetState
from cetvm.xstate import xcr0_fault

KVM_ENOSYS = 1000
KVM_EPERM = 1
_U64 = 0xFFFF_FFFF_FFFF_FFFF
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


class InternalErrorSuberror(enum.Enum):
    EMULATION = "KVM_INTERNAL_ERROR_EMULATION"
    UNEXPECTED_EXIT_REASON = "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON"


@dataclass
class HypercallExit:
    """kvm_run.hypercall: number, four arguments (RBX, RCX, RDX, RSI), and the VMM's result."""

    nr: int
    args: tuple[int, int, int, int]
    ret: int = 0


@dataclass
class KvmRun:
    """What KVM_RUN returned: the exit reason and the matching union member."""

    exit_reason: KvmExitReason
    rip: int
    io: IoExit | None = None
    mmio: MmioExit | None = None
    hypercall: HypercallExit | None = None
    suberror: InternalErrorSuberror | None = None
    detail: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        part = self.io or self.mmio or self.hypercall or self.detail
        return f"{self.exit_reason.value} at {self.rip:#x}{' ' + str(part) if part else ''}"


# --------------------------------------------------------------------------- CPUID
def kvm_cpuid(vcpu: VcpuCetState, cr4: int, function: int, index: int) -> tuple[int, int, int, int]:
    """CPUID.(function, index) for the guest (see the module docstring)."""
    entries = vcpu.cpuid.entries
    if not entries.contains(function, index):
        return 0, 0, 0, 0
    eax, ebx, ecx, edx = entries.get(function, index)
    if function == 1:
        osxsave = FEATURES["osxsave"].mask
        ecx = (ecx | osxsave) if cr4 & Cr4.OSXSAVE else (ecx & ~osxsave)
    elif function == 7 and index == 0:
        ecx = (ecx | _OSPKE) if cr4 & Cr4.PKE else (ecx & ~_OSPKE)
    return eax, ebx, ecx, edx


def handle_cpuid(vcpu: VcpuCetState, cpu) -> None:
    regs = kvm_cpuid(vcpu, cpu.cr4, cpu.reg("rax") & 0xFFFF_FFFF, cpu.reg("rcx") & 0xFFFF_FFFF)
    for name, value in zip(("rax", "rbx", "rcx", "rdx"), regs):
        cpu.set_reg(name, value)


# --------------------------------------------------------------------------- MSRs
def handle_msr(vcpu: VcpuCetState, cpu, exit_: VmExit, fpu_get, fpu_put) -> None:
    """An intercepted RDMSR/WRMSR (the CPU completes it, or injects #GP when ``error``)."""
    msr = exit_.msr
    assert msr is not None
    needs_fpu = is_xstate_managed_msr(msr.index)
    if needs_fpu:
        fpu_put()
    try:
        if exit_.reason is ExitReason.RDMSR:
            result, msr.data = kvm_get_msr(vcpu, msr.index, host_initiated=False)
        else:
            result = kvm_set_msr(vcpu, msr.index, msr.data, host_initiated=False)
    finally:
        if needs_fpu:
            fpu_get()
    msr.error = result is not MsrResult.OK


# --------------------------------------------------------------------------- XSETBV
def kvm_set_xcr_fault(vcpu: VcpuCetState, index: int, xcr0: int) -> str | None:
    """__kvm_set_xcr(): why the write fails (#GP for the guest, -EINVAL for userspace)."""
    if index != 0:
        return f"XCR{index} does not exist (only XCR0)"
    valid = vcpu.cpuid.guest_supported_xcr0 | XFeature.X87.mask
    return xcr0_fault(xcr0, valid)


def kvm_set_xcr0(vcpu: VcpuCetState, xcr0: int) -> None:
    if xcr0 != vcpu.xcr0:
        vcpu.xcr0 = xcr0
        vcpu.cpuid.kvm_update_cpuid_runtime(vcpu.xcr0, vcpu.ia32_xss)


def handle_xsetbv(vcpu: VcpuCetState, cpu, exit_: VmExit) -> None:
    if kvm_set_xcr_fault(vcpu, exit_.xcr_index, exit_.xcr_value):
        cpu.inject_exception(Vector.GP, 0)
        return
    kvm_set_xcr0(vcpu, exit_.xcr_value)


# --------------------------------------------------------------------------- VMCALL
def hypercall_args(cpu) -> tuple[int, tuple[int, int, int, int]]:
    """(nr, (a0..a3)) from RAX, RBX, RCX, RDX, RSI; truncated to 32 bits outside 64-bit mode."""
    mask = _U64 if cpu.long_mode else 0xFFFF_FFFF
    regs = [cpu.reg(n) & mask for n in ("rax", "rbx", "rcx", "rdx", "rsi")]
    return regs[0], (regs[1], regs[2], regs[3], regs[4])


def handle_vmcall(cpu, exit_hypercall_mask: int) -> HypercallExit | None:
    """kvm_emulate_hypercall(); returns the exit for userspace, or None when handled."""
    nr, args = hypercall_args(cpu)
    if cpu.cpl != 0:
        cpu.set_reg("rax", -KVM_EPERM & _U64)
        return None
    if nr < 64 and exit_hypercall_mask >> nr & 1:
        return HypercallExit(nr, args)
    cpu.set_reg("rax", -KVM_ENOSYS & _U64)
    return None


# --------------------------------------------------------------------------- exits for userspace
def userspace_exit(exit_: VmExit) -> KvmRun:
    """Map a CPU exit KVM does not handle itself to kvm_run."""
    reason = exit_.reason
    if reason is ExitReason.IO:
        return KvmRun(KvmExitReason.IO, exit_.rip, io=exit_.io)
    if reason is ExitReason.MMIO:
        return KvmRun(KvmExitReason.MMIO, exit_.rip, mmio=exit_.mmio)
    if reason is ExitReason.HLT:
        return KvmRun(KvmExitReason.HLT, exit_.rip)
    if reason is ExitReason.TRIPLE_FAULT:
        return KvmRun(KvmExitReason.SHUTDOWN, exit_.rip, detail=exit_.detail or "triple fault")
    if reason is ExitReason.BUDGET:
        return KvmRun(KvmExitReason.INTR, exit_.rip, detail="instruction budget reached")
    if reason is ExitReason.SHUTDOWN:
        return KvmRun(KvmExitReason.INTERNAL_ERROR, exit_.rip, suberror=InternalErrorSuberror.EMULATION,
                      detail=exit_.detail)
    return KvmRun(KvmExitReason.INTERNAL_ERROR, exit_.rip,
                  suberror=InternalErrorSuberror.UNEXPECTED_EXIT_REASON, detail=str(exit_))
