"""The engine's exit points: the linear addresses where Unicorn stops in front of an instruction.

cetvm emulates some instructions itself (:mod:`cetvm.cpu.decode`: the CET instructions, MSR and
CR writes, IRET...). When the block hook classifies a block holding one, its address becomes a
Unicorn exit (``uc_ctl_set_exits``): the engine stops in front of it and the vCPU emulates it.
Single steps and budget fences add and remove exits around one run. Unicorn's exits act when a
block is translated, so whoever changes them drops the affected translations
(:meth:`ExitPoints.drop_translations`).
"""

from __future__ import annotations

from collections.abc import Iterable

from unicorn import Uc


class ExitPoints:
    """The set of exit addresses of one engine, kept in step with Unicorn's exit list."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._addresses: set[int] = set()

    def __contains__(self, linear: int) -> bool:
        return linear in self._addresses

    def add(self, linear: int) -> None:
        """Make ``linear`` an exit (takes effect at :meth:`sync`)."""
        self._addresses.add(linear)

    def discard(self, linear: int) -> None:
        """``linear`` stops being an exit (takes effect at :meth:`sync`)."""
        self._addresses.discard(linear)

    def update(self, addresses: Iterable[int]) -> None:
        self._addresses.update(addresses)

    def clear(self) -> None:
        self._addresses.clear()

    def sync(self) -> None:
        """Give the engine the current exit list."""
        self._uc.ctl_set_exits(sorted(self._addresses))

    def drop_translations(self, start: int, end: int, *, block_before: bool = False) -> None:
        """Drop the engine's translation blocks that cover linear [start, end) — and, with
        ``block_before`` (``start`` stops being an exit), the one ending right before ``start``,
        which Unicorn translated to stop there: they are translated anew with the current exits.
        Requests are two bytes or more: the native path filters Unicorn's own one-byte drops
        after each run (:meth:`cetvm.cpu.native.NativeCet.filter_exit_invalidation`). Unicorn
        finds the blocks through the physical page of the first byte, so the byte before
        ``start`` (maybe on another page) is a request of its own."""
        self._uc.ctl_remove_cache(start, max(end, start + 2))
        if block_before and start:
            self._uc.ctl_remove_cache(start - 1, start + 1)
