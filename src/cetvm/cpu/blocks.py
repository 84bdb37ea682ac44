"""Per-block state of the CET layer: the block classification cache and the previous terminator.

The native block hook (:mod:`cetvm.cpu.native`) replaces it with its own table; both have the
interface :class:`BlockTable`: ``lookup(address, size)``, ``store(info)``, ``prev`` (the
terminator of the block that ran last, or None; FALLTHROUGH blocks store None),
``prev_block_start``, ``take_prev``, ``invalidate()`` (everything), ``invalidate_local()`` (MOV to
CR3: blocks not on global pages) and ``invalidate_range()`` (INVLPG). The Python hot path reads
:class:`BlockTracker`'s ``cache`` (address → :class:`BlockInfo`; a hit also needs the same
size) and ``prev`` directly; nothing else touches the tracker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cetvm.cpu.cet.transfer import Terminator, TerminatorInfo


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """A classified translation block: where it is, how it ends, its first bytes (for ENDBR)."""

    address: int
    size: int
    terminator: TerminatorInfo | None
    first_bytes: bytes
    #: instructions in the block: what it retires when it runs to its end (cetvm.cpu.budget)
    icount: int = 0
    #: its code is on global pages (CR4.PGE, PTE.G): the classification survives a MOV to CR3
    #: as the TLB entries do [SDM Vol. 3 §4.10.4.1]
    global_page: bool = False


class BlockTable(Protocol):
    """What the vCPU needs of a block table: :class:`BlockTracker`, or the native hook's table
    (:class:`cetvm.cpu.native.loader.NativeBlockTracker`). The Python fast path also reads
    :attr:`BlockTracker.cache` directly (it runs only with a :class:`BlockTracker`)."""

    prev: TerminatorInfo | None
    prev_block_start: int

    def lookup(self, address: int, size: int) -> BlockInfo | None: ...

    def store(self, info: BlockInfo) -> None: ...

    def invalidate(self) -> None: ...

    def invalidate_local(self) -> None: ...

    def invalidate_range(self, start: int, end: int) -> None: ...

    def take_prev(self, terminator: TerminatorInfo | None) -> TerminatorInfo | None: ...

    def __len__(self) -> int: ...


@dataclass
class BlockTracker:
    """Block classification cache keyed by linear address, plus the pending terminator."""

    prev: TerminatorInfo | None = None
    #: start address of the block whose terminator ``prev`` is (to tell a fault inside that
    #: block — the terminator never ran — from a fault at its target)
    prev_block_start: int = 0
    cache: dict[int, BlockInfo] = field(default_factory=dict)
    #: the block that ran last, counted when it started: an engine stop inside it retires only
    #: the instructions before the stop (None: no block is under way)
    last_run: BlockInfo | None = None

    def lookup(self, address: int, size: int) -> BlockInfo | None:
        info = self.cache.get(address)
        if info is None or info.size != size:
            return None
        return info

    def store(self, info: BlockInfo) -> None:
        self.cache[info.address] = info

    @property
    def last(self) -> tuple[int, int, int] | None:
        """(address, size, instruction count) of :attr:`last_run`, or None."""
        info = self.last_run
        return None if info is None or not info.icount else (info.address, info.size, info.icount)

    def close_last(self) -> None:
        """No block is under way any more (the engine stops in front of the next one)."""
        self.last_run = None

    def invalidate(self) -> None:
        """Forget all classifications (page tables changed: the same address may hold other code)."""
        self.cache.clear()

    def invalidate_local(self) -> None:
        """MOV to CR3: forget the classifications of blocks on non-global pages (another address
        space may hold other code there); global ones stay, as their TLB entries do. In place:
        the Python fast path holds :attr:`cache`."""
        for address in [a for a, info in self.cache.items() if not info.global_page]:
            del self.cache[address]

    def invalidate_range(self, start: int, end: int) -> None:
        """INVLPG / INVPCID of an address: forget the blocks overlapping linear [start, end)."""
        for address in [a for a, info in self.cache.items() if a < end and a + info.size > start]:
            del self.cache[address]

    def take_prev(self, terminator: TerminatorInfo | None) -> TerminatorInfo | None:
        """Return the pending terminator and make ``terminator`` the new pending one."""
        prev = self.prev
        self.prev = terminator if terminator is not None and terminator.kind != Terminator.FALLTHROUGH else None
        return prev

    def __len__(self) -> int:
        return len(self.cache)
