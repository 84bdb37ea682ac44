"""The VMM run loop: KVM_RUN until the machine stops, dispatching exits to the buses.

QEMU's ``kvm_cpu_exec`` in miniature: KVM_EXIT_IO → the port bus, KVM_EXIT_MMIO → the MMIO bus
(the xAPIC page), KVM_EXIT_X86_RDMSR/WRMSR → the ``msr`` handler (the local APIC's MSRs, see
:mod:`cetvm.vmm.msr_exits`; without a handler the access completes with error → #GP), KVM_EXIT_HLT → stop, KVM_EXIT_SHUTDOWN → stop with a diagnosis, KVM_EXIT_INTR
(cetvm's instruction budget, see :mod:`cetvm.kvm.vcpu_run`) → check the limits and re-enter;
with ``irq`` (:mod:`cetvm.vmm.irq`): before each KVM_RUN the APIC's vector is injected or the
interrupt window requested (KVM_EXIT_IRQ_WINDOW_OPEN → re-enter), slices end at the next timer
expiry, and KVM_EXIT_HLT with IF = 1 advances guest time to that expiry instead of stopping.
A device stops the machine by raising a :class:`~cetvm.vmm.requests.MachineRequest`.

Exit statuses (:attr:`RunResult.status`), chosen so that QEMU-based test runners work unchanged:

===================  ==========  ===================================================
stop                 status      why
===================  ==========  ===================================================
isa-debug-exit       (v<<1)|1    QEMU's isa-debug-exit; a process returns status & 0xFF
power off            0           the guest shut the machine down (port 0x8900)
halted               0           HLT with nothing that could wake the vCPU (no irqchip)
snapshot taken       0           ``--save-at`` reached: the state is in the snapshot
reset requested      0           QEMU ``-no-reboot``: a reset ends the run
paused               0           a :class:`PauseRequest` from the VMM side
timeout / limit      124         GNU timeout's status, which kvm-unit-tests reads as timeout
triple fault         125         KVM_EXIT_SHUTDOWN
internal error       126         KVM_EXIT_INTERNAL_ERROR (the CPU cannot go on)
===================  ==========  ===================================================
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from typing import Callable

from cetvm import NotSupportedError
from cetvm.arch import VECTORS_WITH_ERROR_CODE, Vector
from cetvm.kvm.api import Direction, KvmExitReason, KvmRun
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.irq import InterruptRouting
from cetvm.vmm.requests import GuestExitRequest, GuestFaultRequest, MachineRequest, PowerOffRequest, ResetRequest

#: Instructions per KVM_RUN between limit checks (the "signal kick" period).
RUN_SLICE = 2_000_000
#: With a wall-clock timeout, a shorter period so the timeout is honoured within ~0.1 s even on the
#: Python CET path (~2-5 MIPS); on the native path a slice is a few milliseconds.
TIMEOUT_SLICE = 200_000
#: Seconds between two progress reports of a long run.
PROGRESS_PERIOD = 1.0
STATUS_TIMEOUT = 124
STATUS_TRIPLE_FAULT = 125
STATUS_INTERNAL_ERROR = 126


@dataclass(eq=False)
class PauseRequest(MachineRequest):
    """Stop the run loop and leave the machine as it is (status 0), e.g. from a serial sink that
    watches for a marker; :meth:`cetvm.vmm.machine.Machine.run` can be called again to resume."""

    why: str = "paused by the VMM"

    def __str__(self) -> str:
        return self.why


class StopReason(enum.Enum):
    """Why the machine stopped (value: the words used in reports)."""

    GUEST_EXIT = "guest exit"
    PAUSED = "paused"
    POWER_OFF = "power off"
    HALTED = "guest halted"
    RESET = "reset requested"
    SNAPSHOT = "snapshot taken"
    TIMEOUT = "timeout"
    INSTRUCTION_LIMIT = "instruction limit"
    TRIPLE_FAULT = "triple fault"
    INTERNAL_ERROR = "internal error"

    @property
    def is_failure(self) -> bool:
        return self in (StopReason.TIMEOUT, StopReason.INSTRUCTION_LIMIT, StopReason.TRIPLE_FAULT,
                        StopReason.INTERNAL_ERROR)


@dataclass(frozen=True)
class ExceptionInfo:
    """An exception the guest took (vector, its name, error code if it has one)."""

    vector: int
    error_code: int | None = None

    @property
    def name(self) -> str:
        try:
            return f"#{Vector(self.vector).name}"
        except ValueError:
            return f"vector {self.vector}"

    def __str__(self) -> str:
        return self.name + ("" if self.error_code is None else f"({self.error_code:#x})")

    def to_json(self) -> dict:
        return {"vector": self.vector, "name": self.name, "error_code": self.error_code}


_EXCEPTION_RE = re.compile(r"#([A-Z]{2,3})(?:\((0x[0-9a-fA-F]+|\d+)\))?")


def exception_from_detail(detail: str) -> ExceptionInfo | None:
    """The first ``#NAME(code)`` in a KVM exit's detail text (the CPU describes the fault that
    ended a triple-fault chain that way)."""
    for match in _EXCEPTION_RE.finditer(detail or ""):
        name, code = match.group(1), match.group(2)
        if name in Vector.__members__:
            return ExceptionInfo(int(Vector[name]), int(code, 0) if code else None)
    return None


@dataclass(frozen=True)
class RunResult:
    """How a run ended."""

    status: int
    reason: StopReason
    message: str
    instructions: int
    rip: int
    last_exception: ExceptionInfo | None = None

    @property
    def exit_code(self) -> int:
        """What a process can return for ``status`` (the low 8 bits, as QEMU's exit())."""
        return self.status & 0xFF

    def diagnosis(self) -> str:
        """One line: reason, RIP, last exception."""
        text = f"{self.reason.value}: {self.message} (rip={self.rip:#x}, {self.instructions} instructions"
        if self.last_exception is not None:
            text += f", last exception {self.last_exception}"
        return text + ")"

    def to_json(self) -> dict:
        return {"status": self.status, "reason": self.reason.value, "message": self.message,
                "instructions": self.instructions, "rip": self.rip,
                "last_exception": self.last_exception.to_json() if self.last_exception else None}


@dataclass(frozen=True)
class RunLimits:
    """When to stop a run that does not stop by itself. ``max_instructions`` counts from the
    start of the machine (snapshots carry the count); ``save_at`` stops with SNAPSHOT there."""

    timeout: float | None = None
    max_instructions: int | None = None
    save_at: int | None = None


def request_result(request: MachineRequest, instructions: int, rip: int) -> RunResult:
    """The RunResult for a device's stop request."""
    if isinstance(request, GuestExitRequest):
        return RunResult(request.status, StopReason.GUEST_EXIT, str(request), instructions, rip)
    if isinstance(request, PowerOffRequest):
        return RunResult(0, StopReason.POWER_OFF, str(request), instructions, rip)
    if isinstance(request, PauseRequest):
        return RunResult(0, StopReason.PAUSED, str(request), instructions, rip)
    if isinstance(request, ResetRequest):
        return RunResult(0, StopReason.RESET, f"{request}; cetvm stops instead of rebooting",
                         instructions, rip)
    return RunResult(STATUS_INTERNAL_ERROR, StopReason.INTERNAL_ERROR, f"unhandled device request: {request}",
                     instructions, rip)


def exit_result(run: KvmRun, instructions: int) -> RunResult | None:
    """The RunResult for a KVM exit that ends the run (None: keep running)."""
    reason = run.exit_reason
    if reason is KvmExitReason.HLT:
        return RunResult(0, StopReason.HALTED, "HLT with no interrupt source (no in-kernel irqchip)",
                         instructions, run.rip)
    if reason is KvmExitReason.SHUTDOWN:
        return RunResult(STATUS_TRIPLE_FAULT, StopReason.TRIPLE_FAULT, f"KVM_EXIT_SHUTDOWN: {run.detail}",
                         instructions, run.rip, exception_from_detail(run.detail))
    if reason is KvmExitReason.INTERNAL_ERROR:
        sub = run.suberror.value if run.suberror else "unknown"
        return RunResult(STATUS_INTERNAL_ERROR, StopReason.INTERNAL_ERROR,
                         f"KVM_EXIT_INTERNAL_ERROR {sub}: {run.detail}", instructions, run.rip,
                         exception_from_detail(run.detail))
    if reason is KvmExitReason.HYPERCALL:
        return RunResult(STATUS_INTERNAL_ERROR, StopReason.INTERNAL_ERROR,
                         f"unexpected KVM_EXIT_HYPERCALL {run.hypercall}", instructions, run.rip)
    return None


def complete_io(run: KvmRun, pio: PioBus) -> None:
    """KVM_EXIT_IO: OUT goes to the device; IN's value is stored for KVM to complete."""
    io = run.io
    assert io is not None
    if io.direction is Direction.OUT:
        pio.write(io.port, io.size, io.data)
    else:
        io.data = pio.read(io.port, io.size)


def complete_mmio(run: KvmRun, mmio: MmioBus) -> None:
    mm = run.mmio
    assert mm is not None
    if mm.direction is Direction.OUT:
        mmio.write(mm.address, mm.size, mm.data)
    else:
        mm.data = mmio.read(mm.address, mm.size)


def reinjectable(vector: int, error_code: int | None) -> tuple[int, int | None]:
    """The KVM_SET_VCPU_EVENTS arguments that re-deliver an intercepted exception as it was."""
    return vector, error_code if vector in VECTORS_WITH_ERROR_CODE else None


def complete_msr(run: KvmRun, handler: Callable[[KvmRun], None] | None) -> None:
    """KVM_EXIT_X86_RDMSR/WRMSR: the handler fills kvm_run.msr; none → error (#GP)."""
    assert run.msr is not None
    if handler is None:
        run.msr.error = 1
    else:
        handler(run)


@dataclass
class RunLoop:
    """One vCPU's KVM_RUN loop. ``vcpu`` is a :class:`cetvm.kvm.api.KvmVcpu`;
    ``instructions_done`` is the count before this loop started (restored machines);
    ``retired`` reads the vCPU's instruction counter."""

    vcpu: object
    pio: PioBus
    mmio: MmioBus
    retired: Callable[[], int]
    instructions_done: int = 0
    clock: Callable[[], float] = time.monotonic
    msr: Callable[[KvmRun], None] | None = None
    irq: InterruptRouting | None = None
    #: KVM_EXIT_EXCEPTION (intercepted exceptions, cetvm extension): called with the exit and
    #: the instruction count, then the exception is re-injected unchanged.
    on_exception: Callable[[KvmRun, int], None] | None = None
    #: Called as ``progress(instructions, seconds)`` at most every PROGRESS_PERIOD seconds of a
    #: long run (the CLI shows it on a terminal); never called for runs shorter than that.
    progress: Callable[[int, float], None] | None = None

    def __post_init__(self) -> None:
        self._base = self.retired()

    def _report_progress(self, started: float, last: list[float]) -> None:
        now = self.clock()
        if self.progress is not None and now - last[0] >= PROGRESS_PERIOD:
            last[0] = now
            self.progress(self.instructions, now - started)

    @property
    def instructions(self) -> int:
        return self.instructions_done + self.retired() - self._base

    def _slice(self, limits: RunLimits) -> int:
        budget = RUN_SLICE if limits.timeout is None else TIMEOUT_SLICE
        for cap in (limits.max_instructions, limits.save_at):
            if cap is not None:
                budget = min(budget, max(0, cap - self.instructions))
        if self.irq is not None and budget:
            until_timer = self.irq.instructions_to_next_event()
            if until_timer is not None:
                budget = min(budget, until_timer)
        return budget

    def _limit_result(self, limits: RunLimits, rip: int, started: float) -> RunResult | None:
        n = self.instructions
        if limits.save_at is not None and n >= limits.save_at:
            return RunResult(0, StopReason.SNAPSHOT, f"stopped after {n} instructions to save the state", n, rip)
        if limits.max_instructions is not None and n >= limits.max_instructions:
            return RunResult(STATUS_TIMEOUT, StopReason.INSTRUCTION_LIMIT,
                             f"instruction limit of {limits.max_instructions} reached", n, rip)
        if limits.timeout is not None and self.clock() - started >= limits.timeout:
            return RunResult(STATUS_TIMEOUT, StopReason.TIMEOUT, f"wall-clock timeout of {limits.timeout:g} s",
                             n, rip)
        return None

    def run(self, limits: RunLimits = RunLimits()) -> RunResult:
        """KVM_RUN until the machine stops."""
        started = self.clock()
        rip = self.vcpu.get_regs().rip
        ready = False  # kvm_run.ready_for_interrupt_injection of the last exit
        last_progress = [started]
        while True:
            self._report_progress(started, last_progress)
            stop = self._limit_result(limits, rip, started)
            if stop is not None:
                return stop
            if self.irq is not None:
                self.irq.route(self.vcpu, ready)
            run = self.vcpu.run(budget=self._slice(limits))
            rip, ready = run.rip, run.ready_for_interrupt_injection
            try:
                stop = self._dispatch(run)
            except GuestFaultRequest as fault:
                self.vcpu.queue_exception(int(fault.vector), fault.error_code
                                          if int(fault.vector) in VECTORS_WITH_ERROR_CODE else None)
                continue
            except MachineRequest as request:
                return request_result(request, self.instructions, rip)
            if stop is not None:
                return stop

    def _dispatch(self, run: KvmRun) -> RunResult | None:
        if run.exit_reason is KvmExitReason.IO:
            complete_io(run, self.pio)
            return None
        if run.exit_reason is KvmExitReason.MMIO:
            complete_mmio(run, self.mmio)
            return None
        if run.exit_reason in (KvmExitReason.INTR, KvmExitReason.IRQ_WINDOW_OPEN):
            return None
        if run.exit_reason is KvmExitReason.HLT and run.if_flag and self.irq is not None and self.irq.wake_halted():
            return None
        if run.exit_reason in (KvmExitReason.X86_RDMSR, KvmExitReason.X86_WRMSR):
            complete_msr(run, self.msr)
            return None
        if run.exit_reason is KvmExitReason.EXCEPTION and run.exception is not None:
            self._reinject(run)
            return None
        return exit_result(run, self.instructions)

    def _reinject(self, run: KvmRun) -> None:
        """Show the intercepted exception to the VMM, then let the guest take it unchanged.
        #PF is not re-injectable this way (KVM_SET_VCPU_EVENTS carries no CR2 here)."""
        exc = run.exception
        assert exc is not None
        if exc.vector == Vector.PF:
            raise NotSupportedError("re-injecting an intercepted #PF (its CR2) is not supported")
        if self.on_exception is not None:
            self.on_exception(run, self.instructions)
        self.vcpu.queue_exception(*reinjectable(exc.vector, exc.error_code))

