"""The exact instruction budget of a vCPU run (``Vcpu.run(budget=N)`` → ExitReason.BUDGET).

Two granularities, with the same results (the agreement tests compare them):

- ``block`` (the default of a traced vCPU): the block hook retires a translation block's
  instructions when the block starts — its instruction count is known from its classification —
  and stops the engine in front of a block that has more instructions than the budget has left;
  the vCPU then runs exactly the instructions left (a temporary Unicorn exit inside the block,
  :meth:`cetvm.cpu.block_hook.BlockHook.run_fenced`). An engine stop inside the block that ran last (a
  fault, an MMIO access, an invalid instruction) retires only the instructions before it
  (:meth:`cetvm.cpu.block_hook.BlockHook.retire_before`). Nothing is paid per instruction: the native
  hook's count is one subtraction per block (``cetfast_block_hook``).
- ``instruction`` (the reference, and untraced vCPUs, which have no block hook): a UC_HOOK_CODE
  hook counts every instruction as it starts and stops the engine before the first one past the
  budget (native ``cetfast_count_insn`` when built, else :meth:`InstructionBudget.count_instruction`);
  an instruction that faults instead of retiring is taken back (:meth:`InstructionBudget.unretire`).
  A code hook makes every translated instruction call out and recompute EFLAGS: about a third of
  the block-granularity speed.

Instructions emulated in Python retire through :meth:`InstructionBudget.retire` in both.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Protocol

from unicorn import UC_HOOK_CODE, Uc
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError, InputError
from cetvm.cpu.native.loader import InsnCounter, native_count_hook

#: (kind, handle) of an installed count hook: kind is "python" or "native".
CountHook = tuple[str, object]
#: Count hooks deleted between two flushes of Unicorn's translation cache. Unicorn 2.1.4 frees a
#: deleted UC_HOOK_CODE hook only when no translated block refers to it any more, i.e. after a
#: flush: without one, every budgeted run (every KVM_RUN of the VMM, so every port I/O exit) left
#: ~0.7 KB of native memory behind (issue 9). One flush per this many runs bounds it (~170 KB).
DELETED_HOOKS_PER_FLUSH = 256
#: ``budget_left`` while no budget applies: never reached (2**62 instructions; the native
#: library uses the same value, BUDGET_UNLIMITED).
UNLIMITED = 1 << 62
#: Accepted values of ``Vcpu(budget_granularity=...)`` and ``$CETVM_BUDGET_GRANULARITY``.
GRANULARITIES = ("block", "instruction")


def select_granularity(requested: str | None) -> str:
    """``requested`` or ``$CETVM_BUDGET_GRANULARITY`` or "block" (InputError if unknown)."""
    value = requested or os.environ.get("CETVM_BUDGET_GRANULARITY") or "block"
    if value not in GRANULARITIES:
        raise InputError(f"budget granularity must be one of {', '.join(GRANULARITIES)}, not {value!r}")
    return value


class BudgetStore(Protocol):
    """Where the block hook finds the budget: ``budget_left`` (instructions the run may still
    retire) and ``budget_stop`` (size of the block it stopped in front of, 0 if none)."""

    budget_left: int
    budget_stop: int


@dataclass(slots=True)
class PythonBudgetStore:
    """The budget fields of the Python CET path (the native path keeps the same two fields in its
    shared state, :class:`cetvm.cpu.native.loader.SharedState`)."""

    budget_left: int = UNLIMITED
    budget_stop: int = 0


class InstructionBudget:
    """Instructions retired by a vCPU and the budget left in the current run (if any).

    ``retired`` is derived from one counter the hooks decrement (``budget_left``): retired =
    ``_base`` + (``_start`` − ``budget_left``); setting a run's budget folds what was retired
    into ``_base`` and restarts the counter.
    """

    def __init__(self, granularity: str = "block") -> None:
        if granularity not in GRANULARITIES:
            raise InputError(f"budget granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
        self.per_instruction = granularity == "instruction"
        self.counter = InsnCounter()
        self.counter.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        self.counter.budget_left = UNLIMITED
        #: where budget_left lives: the per-instruction counter, the Python block hook's store, or
        #: the native block hook's shared state (:meth:`attach`)
        self.store: BudgetStore | InsnCounter = self.counter if self.per_instruction else PythonBudgetStore()
        self._limited = False
        self._base = 0
        self._start = UNLIMITED
        #: the Python count hook, installed once for the engine's lifetime (see add_count_hook)
        self._python_hook: CountHook | None = None
        #: Count hooks deleted since the last translation-cache flush (see DELETED_HOOKS_PER_FLUSH).
        self.deleted_hooks = 0

    @property
    def block_store(self) -> BudgetStore | None:
        """The store the block hook counts into; None at instruction granularity."""
        return None if self.per_instruction else self.store  # type: ignore[return-value]

    def attach(self, store: BudgetStore) -> None:
        """Count into ``store`` (the native hook's shared state) from now on (block granularity)."""
        if self.per_instruction:
            return
        store.budget_left = self.store.budget_left
        store.budget_stop = 0
        self.store = store

    def counter_address(self) -> int | None:
        """Address of the int64 ``budget_left`` the hooks decrement now (the per-instruction
        counter or the native block hook's shared state); None for the Python block hook's."""
        store = self.store
        if isinstance(store, ctypes.Structure):
            return ctypes.addressof(store) + type(store).budget_left.offset
        return None

    @property
    def retired(self) -> int:
        return self._base + (self._start - self.store.budget_left)

    @retired.setter
    def retired(self, value: int) -> None:
        self._base = value - (self._start - self.store.budget_left)

    @property
    def left(self) -> int | None:
        """Instructions the current run may still retire; None when the run has no budget."""
        return self.store.budget_left if self._limited else None

    @left.setter
    def left(self, value: int | None) -> None:
        self._base = self.retired
        self._limited = value is not None
        self._start = UNLIMITED if value is None else value
        self.store.budget_left = self._start

    @property
    def hit(self) -> bool:
        """The per-instruction count hook stopped the engine because the budget ran out."""
        return bool(self.counter.hit)

    @hit.setter
    def hit(self, value: bool) -> None:
        self.counter.hit = int(value)

    def take_stop(self) -> int:
        """Size of the block the block hook stopped in front of for want of budget (0: none); clears it."""
        store = self.store
        if self.per_instruction or not store.budget_stop:
            return 0
        size, store.budget_stop = store.budget_stop, 0
        return size

    def retire(self) -> None:
        """An instruction emulated in Python retired (counts against the budget)."""
        self.store.budget_left -= 1

    def unretire(self) -> None:
        """Instruction granularity: the last counted instruction faulted instead of retiring."""
        if self.per_instruction and self._limited:
            self.store.budget_left += 1

    def uncount(self, instructions: int) -> None:
        """Block granularity: ``instructions`` counted when their block started did not run."""
        self.store.budget_left += instructions

    def add_count_hook(self, uc: Uc, python_only: bool) -> CountHook:
        """A UC_HOOK_CODE counter for the budget at instruction granularity: the native one
        (``cetfast_count_insn``) when the library is built, else :meth:`count_instruction`
        (about 1.2 MIPS on the Python CET path). A vCPU on the Python CET path (``python_only``)
        uses no native code at all, so both counters stay tested."""
        address = None if python_only else native_count_hook()
        if address is None:
            # Installed once and kept: deleting a Python UC_HOOK_CODE hook after a run and adding a
            # new one before the next crashed Unicorn 2.1.4 (a freed ctypes closure called from
            # the engine; reproduced by single-instruction runs at CPL 3 on the Python CET path).
            # The kept hook counts only while a run has a budget (count_instruction).
            if self._python_hook is None:
                self._python_hook = ("python", uc.hook_add(UC_HOOK_CODE, self.count_instruction))
            return self._python_hook
        handle = uc_hook_h()
        status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_CODE, ctypes.c_void_p(address),
                                   ctypes.c_void_p(ctypes.addressof(self.counter)),
                                   ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise CetvmError(f"cannot install the instruction counter (unicorn error {status})")
        return "native", handle

    def del_count_hook(self, uc: Uc, hook: CountHook) -> None:
        """Remove a native count hook after a run (the Python one stays installed)."""
        kind, handle = hook
        if kind != "native":
            return
        uclib.uc_hook_del(uc._uch, handle)
        self.deleted_hooks += 1
        if self.deleted_hooks >= DELETED_HOOKS_PER_FLUSH:
            uc.ctl_flush_tb()  # lets Unicorn free the deleted hooks (see DELETED_HOOKS_PER_FLUSH)
            self.deleted_hooks = 0

    def count_instruction(self, uc: Uc, address: int, size: int, _data: object) -> None:
        """Python twin of ``cetfast_count_insn`` (used when the native library is not built)."""
        if not self._limited:
            return
        counter = self.counter
        if counter.budget_left <= 0:
            counter.hit = 1
            uc.emu_stop()
            return
        counter.budget_left -= 1
