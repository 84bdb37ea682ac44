"""CMPXCHG8B and CMPXCHG16B see the flags the instructions before them set: a repair of the
engine's lazy flags.

CMPXCHG8B/CMPXCHG16B set or clear ZF and leave CF, PF, AF, SF and OF alone [SDM Vol. 2A
"CMPXCHG8B/CMPXCHG16B", Flags Affected]. The engine (Unicorn 2.1.4, QEMU 5.0's TCG) keeps the
arithmetic flags lazily — the last flag-setting operation and its operands, the operation stored
to the CPU state only when something needs it — and its CMPXCHG8B/16B helpers build RFLAGS from
the *stored* operation without the translator storing the pending one first (every other helper
that reads the flags gets it stored). Within a block that another one led into, the stored
operation is that block's last: CF, PF, AF, SF and OF come out wrong. At the start of every
engine run, and after every RFLAGS write through the engine's API (a SYSCALL the native events
deliver, every event Python delivers), it is "the flags are the first operand word"; an ADD or
SUB before the CMPXCHG16B in the same block puts its source operand there, and the helper takes
that operand for RFLAGS — any bit, RFLAGS.VM included, which the end of the run makes the CPU's
own. Debian's Linux 6.12 guest met it in its slab allocator (ADD; ...; CMPXCHG16B at the top of
an engine run): RFLAGS.VM came on and the next PUSHF raised #GP ("RFLAGS 0x2264246").

:class:`FlagSync` puts an engine code hook on every CMPXCHG8B/CMPXCHG16B that block
classification finds (:meth:`cetvm.cpu.block_hook.BlockHook.classify_block`). A code hook makes
the translator store the pending operation in front of the instruction (it does whenever an
instruction of the block before the hook set the flags), so RFLAGS reads right in the hook;
writing it back stores "the flags are this word" with the right word, which the helper then
reads. On the native CET path the hook is C (cetfast.c, "CMPXCHG8B / CMPXCHG16B flags"), on the
Python paths a Python callback. guests/tests/lazy_flags.c is the test.

Limits: a hook never goes (a rewritten instruction keeps a harmless one); at most
:data:`MAX_HOOKS` addresses get one (the engine looks its code hooks up in a list at every
translated instruction), after that a CMPXCHG8B/16B runs unrepaired.
"""

from __future__ import annotations

from collections.abc import Iterable

from iced_x86 import Instruction, Mnemonic
from unicorn import UC_HOOK_CODE, Uc
from unicorn import x86_const as X

from cetvm.cpu.native import NativeCet

#: The instructions whose engine helpers read stale lazy flags.
STALE_FLAG_READERS = frozenset({Mnemonic.CMPXCHG8B, Mnemonic.CMPXCHG16B})
#: The most addresses given a hook (the engine's code hooks are a list it walks per translated
#: instruction and per hooked instruction run).
MAX_HOOKS = 4096


def reads_stale_flags(instr: Instruction) -> bool:
    """``instr`` is one whose engine helper builds RFLAGS from the stored lazy flag state."""
    return instr.mnemonic in STALE_FLAG_READERS


class FlagSync:
    """The code hooks in front of CMPXCHG8B/CMPXCHG16B of one engine (see the module docstring):
    C ones through ``native`` when the native CET path is in use, else Python ones."""

    def __init__(self, uc: Uc, native: NativeCet | None) -> None:
        self._uc = uc
        self._native = native
        self._hooks: dict[int, object] = {}

    def claim(self, instrs: Iterable[Instruction]) -> bool:
        """Hook every CMPXCHG8B/16B in a newly classified block; True if a hook is new (hooks act
        when code is translated: the block must be translated again)."""
        new = False
        for instr in instrs:
            if reads_stale_flags(instr) and instr.ip not in self._hooks and len(self._hooks) < MAX_HOOKS:
                self._hooks[instr.ip] = self._add_hook(instr.ip)
                new = True
        return new

    @property
    def hooked(self) -> frozenset[int]:
        """The linear addresses with a hook."""
        return frozenset(self._hooks)

    def _add_hook(self, linear: int) -> object:
        if self._native is not None:
            return self._native.add_flags_hook(linear)
        return self._uc.hook_add(UC_HOOK_CODE, self._store_flags, begin=linear, end=linear)

    @staticmethod
    def _store_flags(uc: Uc, _address: int, _size: int, _user_data: object) -> None:
        uc.reg_write(X.UC_X86_REG_RFLAGS, uc.reg_read(X.UC_X86_REG_RFLAGS))
