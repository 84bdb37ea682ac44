"""The exact instruction budget of a vCPU run (``Vcpu.run(budget=N)`` → ExitReason.BUDGET).

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change): the counter struct shared
with the native code (:class:`cetvm.cpu.native.loader.InsnCounter`: retired, budget left, hit),
the UC_HOOK_CODE count hook (native ``cetfast_count_insn`` when built, else the Python twin),
and retire/unretire for instructions emulated in Python or faulting instead of retiring.
"""

from __future__ import annotations

import ctypes

from unicorn import UC_HOOK_CODE, Uc
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError
from cetvm.cpu.native.loader import InsnCounter, native_count_hook

#: (kind, handle) of an installed count hook: kind is "python" or "native".
CountHook = tuple[str, object]
#: Count hooks deleted between two flushes of Unicorn's translation cache. Unicorn 2.1.4 frees a
#: deleted UC_HOOK_CODE hook only when no translated block refers to it any more, i.e. after a
#: flush: without one, every budgeted run (every KVM_RUN of the VMM, so every port I/O exit) left
#: ~0.7 KB of native memory behind (issue 9). One flush per this many runs bounds it (~170 KB).
DELETED_HOOKS_PER_FLUSH = 256


class InstructionBudget:
    """Instructions retired by a vCPU and the budget left in the current run (if any)."""

    def __init__(self) -> None:
        self.counter = InsnCounter()
        self.counter.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        self._budgeting = False
        #: the Python count hook, installed once for the engine's lifetime (see add_count_hook)
        self._python_hook: CountHook | None = None
        #: Count hooks deleted since the last translation-cache flush (see DELETED_HOOKS_PER_FLUSH).
        self.deleted_hooks = 0

    @property
    def retired(self) -> int:
        return self.counter.retired

    @retired.setter
    def retired(self, value: int) -> None:
        self.counter.retired = value

    @property
    def left(self) -> int | None:
        """Instructions the current run may still retire; None when the run has no budget."""
        return self.counter.budget_left if self._budgeting else None

    @left.setter
    def left(self, value: int | None) -> None:
        self._budgeting = value is not None
        if value is not None:
            self.counter.budget_left = value

    @property
    def hit(self) -> bool:
        """The count hook stopped the engine because the budget ran out."""
        return bool(self.counter.hit)

    @hit.setter
    def hit(self, value: bool) -> None:
        self.counter.hit = int(value)

    def retire(self) -> None:
        """An instruction emulated in Python retired (counts against the budget)."""
        counter = self.counter
        counter.retired += 1
        if self._budgeting:
            counter.budget_left -= 1

    def unretire(self) -> None:
        """The last counted instruction faulted instead of retiring."""
        if self._budgeting:
            counter = self.counter
            counter.budget_left += 1
            counter.retired -= 1

    def add_count_hook(self, uc: Uc, python_only: bool) -> CountHook:
        """A UC_HOOK_CODE counter for the budget: the native one (``cetfast_count_insn``; the bench
        loop with CET on runs 88–106 MIPS under it) when the library is built, else
        :meth:`count_instruction` (about 1.2 MIPS on the Python CET path). A vCPU on the
        Python CET path (``python_only``) uses no native code at all, so both counters stay
        tested."""
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
        if not self._budgeting:
            return
        counter = self.counter
        if counter.budget_left <= 0:
            counter.hit = 1
            uc.emu_stop()
            return
        counter.budget_left -= 1
        counter.retired += 1
