"""VM exits: why :meth:`cetvm.cpu.vcpu.Vcpu.run` returned (a VMX-like seam, nothing KVM-specific).

The hypervisor completes an exit before the next ``run`` the way KVM userspace completes
``struct kvm_run``: for IN it stores the value in ``exit.io.data``, for CPUID it writes the
registers, for an intercepted RDMSR it stores ``exit.msr.data`` (or sets ``exit.msr.error`` to
have #GP(0) injected). The vCPU then finishes the instruction (writes the result, advances RIP)
at the start of the next run. ``Vcpu.inject_exception`` instead of completion cancels it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from cetvm.arch.vmx import VMX_EXIT_REASONS_FAILED_VMENTRY
from cetvm.arch.vmx import ExitReason as VmxExitReason


class ExitReason(enum.Enum):
    IO = "io"
    MMIO = "mmio"
    HLT = "hlt"
    CPUID = "cpuid"
    INVD = "invd"
    RDMSR = "rdmsr"
    WRMSR = "wrmsr"
    XSETBV = "xsetbv"
    VMCALL = "vmcall"
    EXCEPTION = "exception"
    TRIPLE_FAULT = "triple_fault"
    #: MOV to CR0/CR4 changing a host-owned bit (the VMCS guest/host mask); ``qualification``
    #: as SDM Vol. 3 Table 28-3 (:func:`cetvm.arch.vmx.cr_access_qualification`)
    CR_ACCESS = "cr_access"
    #: "interrupt-window exiting" and the guest can take an interrupt (IF = 1, no STI / MOV SS
    #: shadow) [SDM Vol. 3 §26.7.5]
    INTERRUPT_WINDOW = "interrupt_window"
    #: "NMI-window exiting" and no blocking by NMI, STI or MOV SS [SDM Vol. 3 §26.7.6]
    NMI_WINDOW = "nmi_window"
    #: VM entry failed its guest-state checks (nothing ran; ``detail`` says which check)
    ENTRY_FAILED = "entry_failed"
    BUDGET = "budget"
    #: the CPU cannot go on: an instruction it cannot emulate, a fetch from no RAM, an event it
    #: cannot deliver in this mode (KVM: KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION)
    EMULATION_FAILED = "emulation_failed"
    #: event delivery touched memory without RAM (KVM: KVM_INTERNAL_ERROR_DELIVERY_EV)
    DELIVERY_FAILED = "delivery_failed"
    #: a VMX instruction (VMXON ... INVVPID) in VMX non-root operation: always exits [SDM Vol.
    #: 3 §26.1.2]; ``vmx_reason`` is its basic exit reason, ``qualification`` the memory
    #: operand's displacement, ``instruction_info`` its VMX_INSTRUCTION_INFO
    VMX_INSTRUCTION = "vmx_instruction"
    #: a MOV to CR8 lowered the TPR below the VMCS's TPR threshold (trap-like: the instruction
    #: retired, ``rip`` is the next one) [SDM Vol. 3 §30.1.2]
    TPR_BELOW_THRESHOLD = "tpr_below_threshold"


#: The basic VM-exit reason the CPU stores in VM_EXIT_REASON for each exit [SDM Vol. 3 App. C].
#: cetvm's own stops (BUDGET: the instruction budget, like the VMX-preemption timer;
#: EMULATION_FAILED, DELIVERY_FAILED: the CPU cannot go on) have no architectural reason and
#: leave the field as it was.
BASIC_EXIT_REASONS: dict[ExitReason, int] = {
    ExitReason.EXCEPTION: VmxExitReason.EXCEPTION_NMI,
    ExitReason.TRIPLE_FAULT: VmxExitReason.TRIPLE_FAULT,
    ExitReason.CPUID: VmxExitReason.CPUID,
    ExitReason.INVD: VmxExitReason.INVD,
    ExitReason.HLT: VmxExitReason.HLT,
    ExitReason.INTERRUPT_WINDOW: VmxExitReason.INTERRUPT_WINDOW,
    ExitReason.NMI_WINDOW: VmxExitReason.NMI_WINDOW,
    ExitReason.VMCALL: VmxExitReason.VMCALL,
    ExitReason.CR_ACCESS: VmxExitReason.CR_ACCESS,
    ExitReason.IO: VmxExitReason.IO_INSTRUCTION,
    ExitReason.RDMSR: VmxExitReason.MSR_READ,
    ExitReason.WRMSR: VmxExitReason.MSR_WRITE,
    ExitReason.ENTRY_FAILED: VmxExitReason.ENTRY_FAIL_GUEST_STATE | VMX_EXIT_REASONS_FAILED_VMENTRY,
    ExitReason.MMIO: VmxExitReason.EPT_VIOLATION,
    ExitReason.XSETBV: VmxExitReason.XSETBV,
    ExitReason.TPR_BELOW_THRESHOLD: VmxExitReason.TPR_BELOW_THRESHOLD,
}


class Direction(enum.Enum):
    IN = "in"    # read by the guest
    OUT = "out"  # written by the guest


@dataclass
class IoExit:
    port: int
    size: int
    direction: Direction
    data: int = 0


@dataclass
class MmioExit:
    address: int
    size: int
    direction: Direction
    data: int = 0


@dataclass
class MsrExit:
    index: int
    data: int = 0
    error: bool = False


@dataclass
class ExceptionExit:
    vector: int
    error_code: int | None = None
    cr2: int | None = None
    #: a software exception (INT3 / INTO): the exit reports it as interruption type 6 with the
    #: instruction's length, RIP at the instruction [SDM Vol. 3 §27.2.2]
    software: bool = False


@dataclass
class VmExit:
    """One exit. ``rip`` is the address of the exiting instruction (VMX convention)."""

    reason: ExitReason
    rip: int
    instruction_length: int = 0
    io: IoExit | None = None
    mmio: MmioExit | None = None
    msr: MsrExit | None = None
    exception: ExceptionExit | None = None
    xcr_index: int = 0
    xcr_value: int = 0
    #: the exit qualification (CR_ACCESS; ENTRY_FAILED: 0, "no further detail")
    qualification: int = 0
    detail: str = ""
    #: VMX_INSTRUCTION: the basic exit reason (VMCLEAR ... INVVPID) and VMX_INSTRUCTION_INFO
    vmx_reason: int | None = None
    instruction_info: int = 0

    def __str__(self) -> str:
        extra = self.detail
        for part in (self.io, self.mmio, self.msr, self.exception):
            if part is not None:
                extra = str(part)
        return f"{self.reason.value} at {self.rip:#x}{' ' + extra if extra else ''}"


@dataclass(frozen=True)
class MmioStepHooks:
    """What an emulated instruction adds around its execution over MMIO: ``check(data)`` before
    it runs with the bytes read (raises GuestFault: the instruction faults instead), ``after()``
    once it has run."""

    check: Callable[[bytes], None] | None = None
    after: Callable[[], None] | None = None
