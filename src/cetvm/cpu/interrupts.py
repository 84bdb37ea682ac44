"""The vCPU's pending events: the next exception to deliver, the pending external interrupt,
RFLAGS.IF, the STI / MOV SS shadow, HLT wake-up.

[SDM Vol. 3 §6.8.1 (masking maskable interrupts: IF), §6.8.3 (STI and MOV SS shadow), §6.9
(priority: exceptions before external interrupts); SDM Vol. 2 HLT ("an enabled interrupt ...
resumes execution"); KVM: kvm_cpu_has_extint / vmx_interrupt_allowed / vmx_inject_irq.]

Decisions (engine-driven, documented and tested):

- One external interrupt can be pending (KVM's ``pending_external_vector`` without an
  in-kernel irqchip). It is delivered through the IDT as a hardware event (EXT = 1, no error
  code; CET: the same SSP switching as any event, :func:`cetvm.cpu.events.deliver_64`).
- Recognition points: interrupts are checked where the engine stops — at run entry and after
  each exit — and, while one waits with RFLAGS.IF = 0 or a shadow blocking it, at every block
  start (:meth:`cetvm.cpu.block_hook.BlockHook.watch_interrupt_window`: the engine stops in
  front of the first block that starts with the window open; QEMU ends a block after STI, after
  the instruction in its shadow and after POPF), so ``sti; nop; cli`` takes it at the CLI. With
  no interrupt waiting the fast paths cost nothing. ``sti; hlt`` does not lose the wake-up: the
  HLT is an exit.
- The shadow is read from QEMU's ``HF_INHIBIT_IRQ`` flag (set by STI and MOV/POP SS, cleared
  after the next instruction; measured). An exiting instruction whose completion ran (RIP past
  HLT/IN/OUT/CPUID...) has retired, which ends any shadow; the engine's flag is cleared then
  (QEMU would clear it at the end of the next block).
- An interrupt taken where the engine stopped right after a CALL or RET (in front of an
  instruction cetvm emulates) first completes that branch's shadow-stack push or pop, which the
  block hook had not applied yet (:meth:`cetvm.cpu.engine_stops.EngineStops.complete_terminator_before_interrupt`).
- HLT with IF = 1 and an interrupt pending: the HLT retires and the interrupt is delivered at
  once (return address after the HLT) instead of an HLT exit.
- At most one exception (or software interrupt) is pending: the engine stops at the first one,
  and :func:`cetvm.cpu.events.deliver` turns a second one during delivery into #DF itself.
- Blocking by NMI [SDM Vol. 3 §6.7.1, §25.4.2 Table 25-3]: set when an NMI is delivered, cleared
  by IRET (:func:`cetvm.cpu.emulate.iret`, also when it faults: VMX's "NMI unblocking due to
  IRET"); the CPU holds it while it runs and VM entry / VM exit load it from and save it to the
  VMCS's GUEST_INTERRUPTIBILITY_INFO (bit 3), where the hypervisor reads and writes it
  (vmx_get_nmi_mask / vmx_set_nmi_mask). An NMI is not blocked by RFLAGS.IF.
"""

from __future__ import annotations

from unicorn import Uc

from cetvm import InputError
from cetvm.arch.regs import RFLAGS_IF
from cetvm.cpu.completion import ExitCompletion
from cetvm.cpu.events import PendingEvent
from cetvm.cpu.registers import Registers
from cetvm.cpu.uc_context import HFlags

#: External interrupt vectors the CPU accepts (KVM_NR_INTERRUPTS = 256).
NR_INTERRUPTS = 256


class PendingEvents:
    """The event a vCPU delivers next (an exception, a software interrupt, an injected event)
    and its pending external interrupt vector."""

    def __init__(self, uc: Uc, registers: Registers, completion: ExitCompletion) -> None:
        self._uc = uc
        self._registers = registers
        self._completion = completion
        self._event: PendingEvent | None = None
        self._irq_vector: int | None = None
        #: blocking by NMI (see the module docstring)
        self.nmi_blocked = False

    # ------------------------------------------------------------------ the next event
    @property
    def has_event(self) -> bool:
        """An event waits for delivery (the engine must not run before it is delivered)."""
        return self._event is not None

    def queue(self, event: PendingEvent) -> None:
        """Make ``event`` the next one to deliver (replaces one not yet delivered)."""
        self._event = event

    def take(self) -> PendingEvent | None:
        """The event to deliver now, once."""
        event, self._event = self._event, None
        return event

    # ------------------------------------------------------------------ external interrupts
    def inject_interrupt(self, vector: int) -> None:
        """Queue external interrupt ``vector`` (replaces one not yet delivered); it is delivered
        at the next recognition point where :attr:`interrupt_window_open` (see module doc)."""
        if not 0 <= vector < NR_INTERRUPTS:
            raise InputError(f"interrupt vector must be 0..255, got {vector}")
        self._irq_vector = vector

    @property
    def pending_interrupt(self) -> int | None:
        """The external interrupt vector waiting for delivery, or None."""
        return self._irq_vector

    def cancel_interrupt(self) -> None:
        """Drop a pending external interrupt (vCPU reset, state restore)."""
        self._irq_vector = None

    @property
    def if_flag(self) -> bool:
        """RFLAGS.IF."""
        return bool(self._registers.read("rflags") & RFLAGS_IF)

    @property
    def interrupt_shadow(self) -> bool:
        """True while the instruction after STI / MOV SS / POP SS has not retired [SDM §6.8.3]."""
        if self._completion.pending:
            return False  # the exiting instruction retires before anything else: shadow over
        return bool(self._registers.env.hflags & HFlags.INHIBIT_IRQ)

    @property
    def interrupt_window_open(self) -> bool:
        """A maskable interrupt would be taken now: IF = 1 and no STI / MOV SS shadow
        (vmx_interrupt_allowed without nested or NMI state)."""
        return self.if_flag and not self.interrupt_shadow

    @property
    def nmi_window_open(self) -> bool:
        """An NMI would be taken now: no blocking by NMI and no STI / MOV SS shadow (the
        blocking KVM's vmx_nmi_blocked reads) [SDM Vol. 3 §26.7.6 "NMI-window exiting"]."""
        return not self.nmi_blocked and not self.interrupt_shadow

    def begin_interrupt_shadow(self) -> None:
        """Block interrupts until the next instruction retires (MOV SS / POP SS / STI)."""
        env = self._registers.env
        env.hflags = env.hflags | HFlags.INHIBIT_IRQ

    def end_interrupt_shadow(self) -> None:
        """Clear the engine's shadow flag (an instruction retired, or an event was delivered)."""
        env = self._registers.env
        if env.hflags & HFlags.INHIBIT_IRQ:
            env.hflags = env.hflags & ~HFlags.INHIBIT_IRQ

    def take_deliverable_interrupt(self) -> bool:
        """At a recognition point: make the pending interrupt the event to deliver if it can be
        taken now (exceptions already pending go first, SDM §6.9)."""
        if self._irq_vector is None or self._event is not None or not self.interrupt_window_open:
            return False
        self.end_interrupt_shadow()
        self._event = PendingEvent(self._irq_vector, None, None, injected=True)
        self._irq_vector = None
        return True

    def wakes_halt(self) -> bool:
        """HLT with IF = 1 and an interrupt pending: the HLT retires and the CPU goes on (the
        interrupt is taken at the run loop's next recognition point) instead of exiting."""
        return self._irq_vector is not None and self.if_flag
