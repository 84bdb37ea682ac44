"""Emulation plumbing of a vCPU: instructions cetvm runs itself at exit addresses, and exit completion.

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change): fetching and decoding an
instruction for emulation, running :mod:`cetvm.cpu.emulate` at an exit address (after applying
the previous block's pending CET terminator), single-stepping one instruction through Unicorn
(:meth:`EmulationPlumbingMixin.step_in_engine`), queuing a guest fault, and the completion of the
last exit's instruction (KVM's complete_userspace_io()).

A mixin of :class:`~cetvm.cpu.vcpu.Vcpu`: it works on the vCPU's exit set, block tracker and
pending event in place.
"""

from __future__ import annotations

from unicorn import UC_ERR_INSN_INVALID, UcError
from unicorn import x86_const as X

from cetvm import CetvmError
from cetvm.arch import Vector
from cetvm.cpu import decode
from cetvm.cpu.events import PendingEvent
from cetvm.cpu.completion import Completion
from cetvm.cpu.exits import ExitReason, VmExit
from cetvm.cpu.faults import GuestFault, NoRamAccess
from cetvm.cpu.paging import Access


class EmulationPlumbingMixin:
    """Emulation at exit addresses, single steps in the engine and exit completion for the vCPU."""

    def fetch_instruction(self, rip: int):
        """Decode the instruction at offset ``rip`` of the code segment (fetched at its linear
        address, ``ip`` = ``rip``: what emulation reports and writes to RIP; raises GuestFault)."""
        code = self._read_code(self._linear(rip), decode.MAX_INSTRUCTION_LENGTH)
        return decode.decode_one(code, rip, self._code_bits)

    def _read_code(self, linear: int, size: int) -> bytes:
        """Instruction bytes; stops early at an untranslatable page (fewer bytes, no fault)."""
        return self._memory.read_code(linear, size, Access.FETCH | self._user_access())

    def _emulate_at(self, rip: int, emulate) -> VmExit | None:
        self._apply_pending_terminator(self._linear(rip))
        if self._pending is not None:
            return None
        try:
            instr = self.fetch_instruction(rip)
            if not decode.needs_emulation(instr):
                self._drop_stale_exit(rip)
                return None
            result = emulate.emulate(self, instr)
        except GuestFault as fault:
            self._raise_event(fault)
            return None
        except NoRamAccess as err:
            return VmExit(ExitReason.EMULATION_FAILED, rip, detail=f"cannot emulate the instruction at {rip:#x}: {err}")
        self._blocks.prev = None
        return result

    def _drop_stale_exit(self, rip: int) -> None:
        """The guest rewrote the code at an exit address (self-modifying code, a trampoline copied
        over old code): the instruction there is no longer one cetvm emulates, so ``rip`` stops
        being an exit and the engine runs it (Unicorn drops its own stale translations itself)."""
        pc = self._linear(rip)
        self._exits.discard(pc)
        self._uc.ctl_set_exits(sorted(self._exits))
        self.drop_translations(pc, pc + 1, block_before=True)

    def step_in_engine(self, rip: int, next_ip: int | None = None, *, retire: bool = True) -> None:
        """Let Unicorn execute the one instruction at ``rip`` although it is an exit address;
        it retires (counts against the budget) unless ``retire`` is False (the caller retires it).

        Used for instructions whose CET effects cetvm adds around Unicorn's own execution (far
        CALL/RET/JMP, INVLPG, MMIO completion); not for privilege changes (IRETQ, SYSRET are
        emulated: see :func:`cetvm.cpu.emulate.iret`).

        Exactly one instruction must run: the block hook is off while stepping, so anything
        Unicorn ran past it would escape the CET checks. Unicorn's ``count`` is enforced by a code
        hook that translation blocks already in the cache do not contain, so it cannot be relied
        on alone. With ``next_ip`` (an instruction that does not branch) a temporary exit there
        stops Unicorn before the next instruction; for a branch (far transfers: the target is not
        known here) the translation cache is flushed around a counted step so that every block
        runs with the count hook. Far transfers are rare; INVLPG and MMIO take the cheap path.
        """
        uc = self._uc
        pc, next_pc = self._linear(rip), None if next_ip is None else self._linear(next_ip)
        was_exit = pc in self._exits
        temporary_exit = next_pc is not None and next_pc not in self._exits
        self._set_step_exits(pc, next_pc, was_exit, temporary_exit, stepping=True)
        self.stepping = True
        if self._native is not None:
            self._native.set_enabled(False)
        cr2 = uc.reg_read(X.UC_X86_REG_CR2)
        # The step retires (below) whatever a count hook made of it: a per-instruction hook
        # counts it only while a run has a budget, so an MMIO write completed inside a run was
        # counted twice, one completed outside it once.
        left = self._budget.store.budget_left
        try:
            uc.emu_start(rip, 0, count=1)
        except UcError as err:
            if err.errno == UC_ERR_INSN_INVALID:
                self._raise_event(GuestFault(Vector.UD))
            else:
                raise CetvmError(f"engine error at RIP {rip:#x}: {err}") from None
        finally:
            self._budget.store.budget_left = left
            self.stepping = False
            if self._native is not None:
                self._native.set_enabled(True)
            self._set_step_exits(pc, next_pc, was_exit, temporary_exit, stepping=False)
        self._blocks.prev = None
        if self._pending is None and retire:
            self._budget.retire()
            # Dropping the stepped TB translates ``rip`` in the *new* mode; after a privilege
            # change that is a phantom #PF that sets CR2 and old_exception: undo both.
            uc.reg_write(X.UC_X86_REG_CR2, cr2)
            self._clear_stale_old_exception()

    def _set_step_exits(self, pc: int, next_pc: int | None, was_exit: bool, temporary_exit: bool, *,
                        stepping: bool) -> None:
        """Around a step: ``pc`` stops being an exit and ``next_pc`` becomes one (``stepping``),
        then the reverse; the affected blocks are retranslated. Without ``next_pc`` the whole
        translation cache is flushed instead (before: so every block gets the count hook; after:
        so none keeps it). Linear addresses (:meth:`cetvm.cpu.vcpu.Vcpu._linear`)."""
        uc = self._uc
        if was_exit:
            (self._exits.discard if stepping else self._exits.add)(pc)
        if temporary_exit:
            assert next_pc is not None
            (self._exits.add if stepping else self._exits.discard)(next_pc)
        if was_exit or temporary_exit:
            uc.ctl_set_exits(sorted(self._exits))
            self.drop_translations(pc, pc + 1)
            if temporary_exit:
                self.drop_translations(next_pc, next_pc + 1, block_before=not stepping)
        if next_pc is None:
            uc.ctl_flush_tb()

    def add_completion(self, completion: Completion) -> None:
        """Run ``completion`` at the start of the next ``run`` (finishes an exiting instruction).
        A completion may return a further exit (a multi-access MMIO instruction): ``run`` then
        returns it before executing anything."""
        self.completion.set(completion)

    @property
    def exit_pending_completion(self) -> bool:
        """True while the instruction of the last exit still has to be finished (IN/MMIO-read
        data, RIP past HLT/VMCALL/CPUID/...): by :meth:`complete_pending_exit` or the next run."""
        return self.completion.pending

    def complete_pending_exit(self) -> None:
        """Finish the instruction of the last exit now, without running guest code and without
        delivering pending events (KVM's complete_userspace_io(), which runs before anything
        else changes the vCPU). The hypervisor must have stored its results first (IN data in
        the exit's ``io.data``, MMIO read data, RAX of a VMCALL...). Nothing pending: no-op.
        A fault raised by the completion (e.g. an MMIO write re-executed into a #PF) is
        delivered at the next run."""
        if self.completion.complete():
            self._end_interrupt_shadow()  # the instruction retired (cetvm.cpu.interrupts)

    def cancel_pending_exit(self) -> None:
        """Forget the completion of the last exit: the exiting instruction is not finished and
        RIP stays at it (e.g. the vCPU is reset, or its registers are replaced wholesale, so
        re-executing the instruction is what should happen). Nothing pending: no-op."""
        self.completion.forget()

    def raise_fault(self, fault: GuestFault) -> None:
        """Queue an architectural fault of the instruction at RIP (emulation code outside the
        engine uses this; KVM's injections use ``inject_exception``)."""
        self._raise_event(fault)

    def _raise_event(self, fault: GuestFault) -> None:
        """Queue a fault for delivery (RIP must already be at the faulting instruction)."""
        self._blocks.prev = None
        self._pending = PendingEvent(fault.vector, fault.error_code, fault.cr2)
