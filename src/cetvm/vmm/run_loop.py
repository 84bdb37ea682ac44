"""The VMM run loop: KVM_RUN until the machine stops, dispatching exits to the buses.

QEMU's ``kvm_cpu_exec`` in miniature: KVM_EXIT_IO → the port bus, KVM_EXIT_MMIO → the MMIO bus
(the xAPIC page), KVM_EXIT_X86_RDMSR/WRMSR → the vCPU's ``msr`` handler (its local APIC's MSRs,
see :mod:`cetvm.vmm.msr_exits`; without a handler the access completes with error → #GP),
KVM_EXIT_HLT → the vCPU halts (it runs again when an interrupt wakes it; the machine stops when
nothing can), KVM_EXIT_SHUTDOWN → stop with a diagnosis, KVM_EXIT_INTR (cetvm's instruction
budget, see :mod:`cetvm.kvm.vcpu_run`) → check the limits and re-enter; with ``irq``
(:mod:`cetvm.vmm.irq`): before each KVM_RUN the APIC's vector is injected or the interrupt
window requested (KVM_EXIT_IRQ_WINDOW_OPEN → re-enter), runs end at the next timer expiry, and
when every vCPU is halted with IF = 1 guest time advances to the next expiry. Several vCPUs
run round-robin (:class:`RunLoop`). A device stops the machine by raising a :class:`~cetvm.vmm.requests.MachineRequest`.

Exit statuses (:attr:`RunResult.status`), chosen so that QEMU-based test runners work unchanged:

===================  ==========  ===================================================
stop                 status      why
===================  ==========  ===================================================
isa-debug-exit       (v<<1)|1    QEMU's isa-debug-exit; a process returns status & 0xFF
power off            0           the guest shut the machine down (port 0x8900)
halted               0           every vCPU halted (or waits for SIPI), nothing can wake one
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

from cetvm import InputError, NotSupportedError
from cetvm.arch import VECTORS_WITH_ERROR_CODE, Vector
from cetvm.kvm.api import Direction, KvmExitReason, KvmRun
from cetvm.kvm.coalesced_mmio import CoalescedWrite
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.irq import InterruptRouting
from cetvm.vmm.requests import GuestExitRequest, GuestFaultRequest, MachineRequest, PowerOffRequest, ResetRequest

#: Instructions per KVM_RUN between limit checks (the "signal kick" period).
RUN_SLICE = 2_000_000
#: Instructions per turn of one vCPU when several run round-robin (SMP): about a millisecond on
#: the native path, so a CPU spinning on another's progress wastes little.
SMP_SLICE = 100_000
#: With a wall-clock timeout, a shorter period so the timeout is honoured within ~0.1 s even on the
#: Python CET path (~2-5 MIPS); on the native path a slice is a few milliseconds.
TIMEOUT_SLICE = 200_000
#: Instructions of the first KVM_RUN while an interrupt waits for the guest's window (IF = 0):
#: KVM checks the window only between runs and exits (cetvm.kvm.vcpu_run), so an STI in code
#: that makes no exit is noticed at the end of the run. Each further run of the same wait is
#: twice as long (up to the normal slice): the interrupt arrives at most about as late again as
#: it has already waited, and a long IF = 0 stretch costs a few runs, not thousands
#: (deterministic: counts of instructions, saved with the vCPU's run state).
WINDOW_SLICE = 2_000
#: Timer events in a row that woke no vCPU (a periodic timer whose interrupt is masked while
#: every vCPU halts) after which the machine counts as halted instead of skipping time forever.
MAX_IDLE_SKIPS = 10_000
#: Seconds between two progress reports of a long run.
PROGRESS_PERIOD = 1.0
#: KVM_RUN returns with no instruction for userspace to complete: a budget stop, the interrupt
#: window it asked for, a lowered TPR (QEMU's kvm_cpu_exec ignores KVM_EXIT_SET_TPR: kvm_run.cr8
#: has already reached the APIC, InterruptRouting.take_cr8).
_NOTHING_TO_COMPLETE = frozenset({KvmExitReason.INTR, KvmExitReason.IRQ_WINDOW_OPEN, KvmExitReason.SET_TPR})
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
    """The RunResult for a KVM exit that ends the run (None: keep running). KVM_EXIT_HLT is
    not one: the vCPU halts (RunLoop); the machine stops when no vCPU can run."""
    reason = run.exit_reason
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
    if reason is KvmExitReason.FAIL_ENTRY:  # QEMU: "KVM: entry failed, hardware error"
        return RunResult(STATUS_INTERNAL_ERROR, StopReason.INTERNAL_ERROR,
                         f"KVM_EXIT_FAIL_ENTRY (hardware entry failure reason "
                         f"{run.hardware_entry_failure_reason:#x}): {run.detail}", instructions, run.rip)
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
class VcpuSlot:
    """The run loop's view of one vCPU: the KvmVcpu, its interrupt routing and MSR handler,
    ``enter`` (called before each KVM_RUN of this vCPU: the machine points the xAPIC page at its
    APIC), and the VMM-side run state — ``ready`` (the last kvm_run.ready_for_interrupt_injection),
    ``halted`` (it exited on HLT and waits for an interrupt; QEMU's cs->halted) with
    ``halt_if`` (an interrupt can wake it: RFLAGS.IF at that HLT, or KVM ready for injection)."""

    vcpu: object
    irq: InterruptRouting | None = None
    msr: Callable[[KvmRun], None] | None = None
    enter: Callable[[], None] | None = None
    ready: bool = False
    halted: bool = False
    halt_if: bool = False
    #: The last exit left an instruction for KVM to complete at the next KVM_RUN (IN/OUT, MMIO,
    #: MSR, HLT, ...): the run loop completes it when the vCPU's turn ends (see RunLoop).
    pending_exit: bool = False
    #: The budget of the next run while an interrupt waits for the window (WINDOW_SLICE, doubling).
    window_slice: int = WINDOW_SLICE

    def window_budget(self, normal: int) -> int:
        """The budget of this run: ``normal``, or while an interrupt waits for the window the
        current window slice (which doubles for the next run of the same wait)."""
        if not self.vcpu.request_interrupt_window:
            self.window_slice = WINDOW_SLICE
            return normal
        budget = min(self.window_slice, normal)
        self.window_slice = min(2 * self.window_slice, normal)
        return budget

    def complete_exit(self) -> int:
        """KVM_RUN(immediate_exit): finish the last exit now; the instructions it retired."""
        before = self.vcpu.get_stats()["instructions"]
        self.ready = self.vcpu.run(immediate_exit=True).ready_for_interrupt_injection
        self.pending_exit = False
        return self.vcpu.get_stats()["instructions"] - before

    def get_state(self) -> dict:
        return {"ready": self.ready, "halted": self.halted, "halt_if": self.halt_if,
                "window_slice": self.window_slice}

    def set_state(self, state: dict) -> None:
        for key in ("ready", "halted", "halt_if"):
            value = state.get(key) if isinstance(state, dict) else None
            if not isinstance(value, bool):
                raise InputError(f"snapshot vCPU run state '{key}' must be true or false, got {value!r}")
        window = state.get("window_slice", WINDOW_SLICE)  # (absent before device interrupts)
        if isinstance(window, bool) or not isinstance(window, int) or not WINDOW_SLICE <= window <= RUN_SLICE:
            raise InputError(f"snapshot vCPU run state 'window_slice' must be {WINDOW_SLICE}..{RUN_SLICE}, "
                             f"got {window!r}")
        self.ready, self.halted, self.halt_if = state["ready"], state["halted"], state["halt_if"]
        self.window_slice = window


@dataclass
class RunLoop:
    """The KVM_RUN loop of a machine's vCPUs (``slots``, index = vCPU index).

    One vCPU: KVM_RUN in slices of RUN_SLICE instructions until the machine stops. Several
    (SMP): deterministic round-robin — vCPU 0 runs a turn of at most SMP_SLICE instructions,
    then vCPU 1, ..., skipping vCPUs that wait for INIT/SIPI and halted ones (a halted vCPU runs
    again once its APIC presents an interrupt and it halted with IF = 1). A turn also ends at
    HLT and after an IPI to another CPU (``kick``), so the target runs next; a vCPU whose turn
    ends completes its last exit then (KVM_RUN with immediate_exit). When no vCPU can
    run, guest time jumps to the earliest timer expiry of a halted vCPU that the timer can
    wake; if there is none the machine stops (all halted). Exits are handled between KVM_RUNs
    as for one vCPU; a turn resumes the same vCPU after them.

    Instruction counts (``instructions``, ``max_instructions``, ``save_at``) are the sum over
    all vCPUs: each KVM_RUN's budget is cut so the total is exact. Guest time is one clock for
    the machine (:class:`cetvm.vmm.irq.GuestClock`): every vCPU's instructions advance it, so
    each run is bounded by the earliest timer expiry of any APIC.
    ``instructions_done`` is the count before this loop started (restored machines);
    ``retired`` reads the sum of the vCPUs' instruction counters.
    """

    slots: list[VcpuSlot]
    pio: PioBus
    mmio: MmioBus
    retired: Callable[[], int]
    instructions_done: int = 0
    clock: Callable[[], float] = time.monotonic
    #: KVM_EXIT_EXCEPTION (intercepted exceptions, cetvm extension): called with the exit, the
    #: instruction count and the vCPU's index, then the exception is re-injected unchanged.
    on_exception: Callable[[KvmRun, int, int], None] | None = None
    #: Called as ``progress(instructions, seconds)`` at most every PROGRESS_PERIOD seconds of a
    #: long run (the CLI shows it on a terminal); never called for runs shorter than that.
    progress: Callable[[int, float], None] | None = None
    #: True once after the running vCPU sent an IPI to another CPU (ends its turn).
    kick: Callable[[], bool] | None = None
    #: Host console input (:class:`cetvm.vmm.console_input.HostConsoleInput`): ``poll(block)``
    #: between runs, and blocking when nothing can run; True when input arrived.
    host_input: Callable[[bool], bool] | None = None
    #: Empties the VM's coalesced-write ring (KVM's coalesced MMIO/PIO), called after every
    #: KVM_RUN before its exit is handled: the buffered writes reach the devices first.
    take_coalesced: Callable[[], list[CoalescedWrite]] | None = None
    #: The vCPU whose turn it is, and the instructions it has run in this turn.
    current: int = 0
    turn_used: int = 0
    #: Consecutive timer skips that woke no vCPU (see MAX_IDLE_SKIPS).
    idle_skips: int = 0

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

    @property
    def smp(self) -> bool:
        return len(self.slots) > 1

    def get_state(self) -> dict:
        """The scheduler's state for a snapshot (the turn and every vCPU's run state)."""
        return {"current": self.current, "turn_used": self.turn_used,
                "vcpus": [slot.get_state() for slot in self.slots]}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise InputError("snapshot run.scheduler must be an object")
        current, used, vcpus = state.get("current"), state.get("turn_used"), state.get("vcpus")
        if isinstance(current, bool) or not isinstance(current, int) or not 0 <= current < len(self.slots):
            raise InputError(f"snapshot run.scheduler.current must be a vCPU index, got {current!r}")
        if isinstance(used, bool) or not isinstance(used, int) or used < 0:
            raise InputError(f"snapshot run.scheduler.turn_used must be a non-negative integer, got {used!r}")
        if not isinstance(vcpus, list) or len(vcpus) != len(self.slots):
            raise InputError(f"snapshot run.scheduler.vcpus must list {len(self.slots)} vCPUs")
        for slot, slot_state in zip(self.slots, vcpus):
            slot.set_state(slot_state)
        self.current, self.turn_used = current, used

    # ------------------------------------------------------------------ scheduling
    def _wakes(self, slot: VcpuSlot) -> bool:
        """Can this vCPU run now? (Waiting for INIT/SIPI: no; halted: only with an interrupt
        its APIC presents and IF = 1 at the HLT, or an SMI or NMI pending — whatever IF says, as
        KVM's kvm_vcpu_has_events; the vCPU enters SMM after its HLT and RSM returns there, the
        NMI handler returns after the HLT.)"""
        vcpu = slot.vcpu
        if vcpu.waiting_for_sipi:
            slot.halted = False  # INIT/SIPI ends a halt
            return False
        if not slot.halted:
            return True
        smi = vcpu.get_vcpu_events_smi()
        if (smi.pending and not smi.smm) or vcpu.nmi_pending:
            slot.halted = False
            return True
        if slot.halt_if and slot.irq is not None and slot.irq.has_interrupt():
            slot.halted = False
            return True
        return False

    def _pick(self) -> VcpuSlot | None:
        """The vCPU to run next (round-robin, see the class docstring), or None."""
        n = len(self.slots)
        if n == 1:
            return self.slots[0] if self._wakes(self.slots[0]) else None
        if self.turn_used < SMP_SLICE and self._wakes(self.slots[self.current]):
            return self.slots[self.current]
        for k in range(1, n + 1):
            index = (self.current + k) % n
            if self._wakes(self.slots[index]):
                self._switch_to(index)
                return self.slots[index]
        return None

    def _switch_to(self, index: int) -> None:
        """Start vCPU ``index``'s turn; the vCPU whose turn ended first completes its last exit,
        so that only the running vCPU ever has one pending (a snapshot, which completes them
        all, then changes no vCPU's timing relative to the others)."""
        old = self.slots[self.current]
        if index != self.current and old.pending_exit:
            old.complete_exit()
        self.current, self.turn_used = index, 0

    def complete_exits(self) -> None:
        """Before a snapshot: every vCPU finishes its last exit and accepts latched INIT/SIPI
        (KVM_RUN with immediate_exit); the running vCPU's completion counts in its turn, as it
        would have at its next KVM_RUN."""
        for index, slot in enumerate(self.slots):
            retired = slot.complete_exit()
            if index == self.current:
                self.turn_used += retired

    def _end_turn(self) -> None:
        self.turn_used = SMP_SLICE

    def _wake_by_timer(self) -> bool:
        """Nothing can run: let guest time jump to the earliest timer expiry that may wake a
        halted vCPU (IF = 1 at its HLT). False if no timer can wake anyone, or if
        MAX_IDLE_SKIPS events in a row woke nobody (their interrupts are masked)."""
        expiries = [slot.irq.next_event() for slot in self.slots
                    if slot.halted and slot.halt_if and slot.irq is not None]
        expiries = [e for e in expiries if e is not None]
        if not expiries or self.idle_skips >= MAX_IDLE_SKIPS:
            return False
        self.idle_skips += 1
        self.slots[0].irq.clock.skip_to(min(expiries))
        return True

    def _wait_for_host_input(self) -> bool:
        """Nothing can run and no timer can wake a vCPU: wait for console input if a vCPU that
        input can wake (halted with IF = 1) exists; False at end of input or without one."""
        if self.host_input is None or not any(slot.halted and slot.halt_if for slot in self.slots):
            return False
        return self.host_input(True)

    def _slice(self, limits: RunLimits, slot: VcpuSlot) -> int:
        budget = slot.window_budget(RUN_SLICE if limits.timeout is None else TIMEOUT_SLICE)
        if self.smp:
            budget = min(budget, SMP_SLICE - self.turn_used)
        for cap in (limits.max_instructions, limits.save_at):
            if cap is not None:
                budget = min(budget, max(0, cap - self.instructions))
        if budget:
            for slot in self.slots:
                until_timer = slot.irq.instructions_to_next_event() if slot.irq is not None else None
                if until_timer is not None:
                    budget = min(budget, until_timer)
        return max(budget, 0)

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

    def _all_halted(self, rip: int) -> RunResult:
        if self.smp:
            message = "every vCPU halted or waits for SIPI with no interrupt source"
        else:
            message = "HLT with no interrupt source (no in-kernel irqchip)"
        return RunResult(0, StopReason.HALTED, message, self.instructions, rip)

    def run(self, limits: RunLimits = RunLimits()) -> RunResult:
        """KVM_RUN until the machine stops."""
        started = self.clock()
        rip = self.slots[self.current].vcpu.get_regs().rip
        last_progress = [started]
        while True:
            self._report_progress(started, last_progress)
            stop = self._limit_result(limits, rip, started)
            if stop is not None:
                return stop
            if self.host_input is not None:
                self.host_input(False)
            slot = self._pick()
            if slot is None:
                if self._wake_by_timer() or self._wait_for_host_input():
                    continue
                return self._all_halted(rip)
            self.idle_skips = 0
            if slot.enter is not None:
                slot.enter()
            if slot.irq is not None:
                slot.irq.route(slot.vcpu, slot.ready)
            before = self.retired()
            run = slot.vcpu.run(budget=self._slice(limits, slot))
            if slot.irq is not None:
                slot.irq.take_cr8(run)
            self.turn_used += self.retired() - before
            rip, slot.ready = run.rip, run.ready_for_interrupt_injection
            slot.pending_exit = run.exit_reason not in _NOTHING_TO_COMPLETE
            try:
                self._flush_coalesced()
                stop = self._dispatch(slot, run)
            except GuestFaultRequest as fault:
                slot.vcpu.queue_exception(int(fault.vector), fault.error_code
                                          if int(fault.vector) in VECTORS_WITH_ERROR_CODE else None)
                continue
            except MachineRequest as request:
                return request_result(request, self.instructions, rip)
            finally:
                if self.kick is not None and self.kick():
                    self._end_turn()
            if stop is not None:
                return stop

    def _flush_coalesced(self) -> None:
        """kvm_flush_coalesced_mmio_buffer(): the writes KVM kept instead of exiting, in order."""
        if self.take_coalesced is None:
            return
        for write in self.take_coalesced():
            if write.pio:
                self.pio.write(write.phys_addr, write.len, write.data)
            else:
                self.mmio.write(write.phys_addr, write.len, write.data)

    def _dispatch(self, slot: VcpuSlot, run: KvmRun) -> RunResult | None:
        if run.exit_reason is KvmExitReason.IO:
            complete_io(run, self.pio)
            return None
        if run.exit_reason is KvmExitReason.MMIO:
            complete_mmio(run, self.mmio)
            return None
        if run.exit_reason in _NOTHING_TO_COMPLETE:  # SET_TPR: take_cr8 gave the APIC its TPR
            return None
        if run.exit_reason is KvmExitReason.HLT:
            # QEMU: the vCPU halts; it runs again when an interrupt can wake it (_wakes), or
            # guest time jumps to its timer when nothing else can run (_wake_by_timer). An
            # interrupt can wake it with IF = 1, or when KVM is ready to take one whatever IF
            # says (a halted L2 whose L1 exits on external interrupts: kvm_vcpu_has_events).
            slot.halted, slot.halt_if = True, run.if_flag or run.ready_for_interrupt_injection
            self._end_turn()
            return None
        if run.exit_reason in (KvmExitReason.X86_RDMSR, KvmExitReason.X86_WRMSR):
            complete_msr(run, slot.msr)
            return None
        if run.exit_reason is KvmExitReason.EXCEPTION and run.exception is not None:
            self._reinject(slot, run)
            return None
        return exit_result(run, self.instructions)

    def _reinject(self, slot: VcpuSlot, run: KvmRun) -> None:
        """Show the intercepted exception to the VMM, then let the guest take it unchanged.
        #PF is not re-injectable this way (KVM_SET_VCPU_EVENTS carries no CR2 here)."""
        exc = run.exception
        assert exc is not None
        if exc.vector == Vector.PF:
            raise NotSupportedError("re-injecting an intercepted #PF (its CR2) is not supported")
        if self.on_exception is not None:
            self.on_exception(run, self.instructions, self.slots.index(slot))
        slot.vcpu.queue_exception(*reinjectable(exc.vector, exc.error_code))
