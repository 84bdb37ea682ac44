"""The vCPU's emulation part: instructions cetvm runs itself at exit points, and single steps.

:class:`ExitEmulation` (a part of :class:`cetvm.cpu.vcpu.Vcpu`) runs :mod:`cetvm.cpu.emulate` at
an exit point (after applying the previous block's pending CET terminator), drops an exit point
whose instruction the guest rewrote, and single-steps one instruction through Unicorn
(:meth:`ExitEmulation.step_in_engine`) for instructions whose CET effects cetvm adds around the
engine's own execution. Instructions are emulated through the vCPU's public interface.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from unicorn import UC_ERR_INSN_INVALID, Uc, UcError
from unicorn import x86_const as X

from cetvm import CetvmError
from cetvm.arch import Vector
from cetvm.cpu import decode, emulate
from cetvm.cpu.block_hook import BlockHook
from cetvm.cpu.blocks import BlockTable
from cetvm.cpu.budget import InstructionBudget
from cetvm.cpu.exit_points import ExitPoints
from cetvm.cpu.exits import ExitReason, VmExit
from cetvm.cpu.faults import GuestFault, NoRamAccess
from cetvm.cpu.interrupts import PendingEvents
from cetvm.cpu.mode import CpuMode, InstructionFetch
from cetvm.cpu.native import NativeCet
from cetvm.cpu.registers import Registers
from cetvm.cpu.uc_context import EngineCpu

if TYPE_CHECKING:
    from cetvm.cpu.vcpu import Vcpu


class ExitEmulation:
    """Emulation at exit points and single steps in the engine for one vCPU."""

    def __init__(self, vcpu: "Vcpu", uc: Uc, *, mode: CpuMode, exits: ExitPoints, blocks: BlockTable,
                 hook: BlockHook, events: PendingEvents, fetch: InstructionFetch, budget: InstructionBudget,
                 registers: Registers, native: NativeCet | None, engine_cpu: EngineCpu | None) -> None:
        self._vcpu = vcpu
        self._engine_cpu = engine_cpu
        self._uc = uc
        self._mode = mode
        self._exits = exits
        self._blocks = blocks
        self._hook = hook
        self._events = events
        self._fetch = fetch
        self._budget = budget
        self._registers = registers
        self._native = native

    def emulate_at(self, rip: int) -> VmExit | None:
        """The engine stopped at the exit point ``rip``: apply the pending terminator, then
        emulate the instruction there (or drop the exit point if it is no longer one to emulate)."""
        self._hook.apply_pending_terminator(self._mode.linear(rip))
        if self._events.has_event:
            return None
        vcpu = self._vcpu
        try:
            instr = self._fetch.fetch_instruction(rip)
            if not decode.needs_emulation(instr):
                self._drop_stale_exit(rip)
                return None
            result = emulate.emulate(vcpu, instr)
        except GuestFault as fault:
            vcpu.raise_fault(fault)
            return None
        except NoRamAccess as err:
            return VmExit(ExitReason.EMULATION_FAILED, rip, detail=f"cannot emulate the instruction at {rip:#x}: {err}")
        self._blocks.prev = None
        return result

    def _drop_stale_exit(self, rip: int) -> None:
        """The guest rewrote the code at an exit address (self-modifying code, a trampoline copied
        over old code): the instruction there is no longer one cetvm emulates, so ``rip`` stops
        being an exit and the engine runs it (Unicorn drops its own stale translations itself)."""
        pc = self._mode.linear(rip)
        self._exits.discard(pc)
        self._exits.sync()
        self._exits.drop_translations(pc, pc + 1, block_before=True)

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
        runs with the count hook. Far transfers are rare; INVLPG and MMIO take the cheap path,
        which runs uncounted: Unicorn deletes its count hook at the next uncounted run and then
        flushes every translation (about 1,900 times in a Linux boot before this was known).
        """
        uc, mode, native = self._uc, self._mode, self._native
        pc, next_pc = mode.linear(rip), None if next_ip is None else mode.linear(next_ip)
        was_exit = pc in self._exits
        # A one-instruction block of its own (EngineCpu) and the native hook's stop in front of
        # the block after it: no exit moves, no translation is dropped (an MMIO completion). Not
        # at instruction granularity: the block after it would be translated without the count
        # hook the next run adds, and run uncounted from the cache.
        one_block = (native is not None and self._engine_cpu is not None and next_pc is not None and not was_exit
                     and not self._budget.per_instruction)
        temporary_exit = not one_block and next_pc is not None and next_pc not in self._exits
        if not one_block:
            self._set_step_exits(pc, next_pc, was_exit, temporary_exit, stepping=True)
        mode.stepping = True
        if native is not None:
            native.set_enabled(False)
        cr2 = uc.reg_read(X.UC_X86_REG_CR2)
        # The step retires (below) whatever a count hook made of it: a per-instruction hook
        # counts it only while a run has a budget, so an MMIO write completed inside a run was
        # counted twice, one completed outside it once.
        store = self._budget.store
        left = store.budget_left
        try:
            # Unicorn's count installs a code hook, and the next uncounted run deletes it and
            # flushes every translation: only a branch, whose successor is unknown, pays that.
            if one_block:
                native.stop_at_block(2)  # the one-instruction block's start, then the next one's
            with self._engine_cpu.first_instructions(1) if one_block else contextlib.nullcontext():
                uc.emu_start(rip, 0, count=0 if one_block or temporary_exit or next_pc in self._exits else 1)
        except UcError as err:
            if err.errno == UC_ERR_INSN_INVALID:
                self._vcpu.raise_fault(GuestFault(Vector.UD))
            else:
                raise CetvmError(f"engine error at RIP {rip:#x}: {err}") from None
        finally:
            store.budget_left = left
            mode.stepping = False
            if native is not None:
                native.set_enabled(True)
            if one_block:
                native.stop_at_block(0)
            else:
                self._set_step_exits(pc, next_pc, was_exit, temporary_exit, stepping=False)
        self._blocks.prev = None
        if not self._events.has_event and retire:
            self._budget.retire()
            # Dropping the stepped TB translates ``rip`` in the *new* mode; after a privilege
            # change that is a phantom #PF that sets CR2 and old_exception: undo both.
            uc.reg_write(X.UC_X86_REG_CR2, cr2)
            self._registers.clear_stale_old_exception()

    def _set_step_exits(self, pc: int, next_pc: int | None, was_exit: bool, temporary_exit: bool, *,
                        stepping: bool) -> None:
        """Around a step: ``pc`` stops being an exit and ``next_pc`` becomes one (``stepping``),
        then the reverse; the affected blocks are retranslated. Without ``next_pc`` the whole
        translation cache is flushed instead (before: so every block gets the count hook; after:
        so none keeps it). Linear addresses (:meth:`cetvm.cpu.mode.CpuMode.linear`)."""
        exits = self._exits
        if was_exit:
            (exits.discard if stepping else exits.add)(pc)
        if temporary_exit:
            assert next_pc is not None
            (exits.add if stepping else exits.discard)(next_pc)
        if was_exit or temporary_exit:
            exits.sync()
            exits.drop_translations(pc, pc + 1)
            if temporary_exit:
                exits.drop_translations(next_pc, next_pc + 1, block_before=not stepping)
        if next_pc is None:
            self._uc.ctl_flush_tb()
