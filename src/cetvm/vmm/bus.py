"""Port-I/O and MMIO buses: address ranges mapped to devices (rust-vmm ``vm-device`` style).

The run loop turns a vCPU exit (``KVM_EXIT_IO``/``KVM_EXIT_MMIO``) into ``bus.read(...)`` or
``bus.write(...)``. A device sees the offset of the access inside the range it registered, the
access size in bytes and, for writes, the value (already truncated to the size).

Unclaimed accesses behave like a PC with nothing decoding the address: reads return all ones of
the access size, writes are dropped (QEMU ``unassigned_io_ops``; a PCI master abort on MMIO).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from cetvm import CetvmError

PIO_SIZES = (1, 2, 4)
MMIO_SIZES = (1, 2, 4, 8)


@runtime_checkable
class PioDevice(Protocol):
    """A device reached through IN/OUT."""

    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class MmioDevice(Protocol):
    """A device reached through loads and stores to guest-physical addresses."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class SnapshotDevice(Protocol):
    """A device whose registers go into a snapshot (JSON-able dict in, dict out)."""

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class BusConflictError(CetvmError):
    """Two devices claim overlapping ranges, or a range is empty/out of the address space."""


D = TypeVar("D")


@dataclass(frozen=True)
class BusRange(Generic[D]):
    """``[base, base + length)`` claimed by ``device``."""

    base: int
    length: int
    device: D
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.end


def all_ones(size: int) -> int:
    """What an undecoded read of ``size`` bytes returns on a PC."""
    return (1 << (8 * size)) - 1


class _RangeMap(Generic[D]):
    """Sorted, non-overlapping ranges with O(log n) lookup."""

    def __init__(self, limit: int, kind: str) -> None:
        self._limit = limit
        self._kind = kind
        self._bases: list[int] = []
        self._ranges: list[BusRange[D]] = []

    def insert(self, base: int, length: int, device: D, name: str) -> BusRange[D]:
        if length <= 0:
            raise BusConflictError(f"{self._kind} range for {name} has length {length}")
        if base < 0 or base + length > self._limit:
            raise BusConflictError(
                f"{self._kind} range {base:#x}+{length:#x} for {name} is outside 0..{self._limit:#x}"
            )
        new = BusRange(base, length, device, name)
        i = bisect.bisect_left(self._bases, base)
        for neighbour in self._ranges[max(i - 1, 0) : i + 1]:
            if neighbour.base < new.end and base < neighbour.end:
                raise BusConflictError(
                    f"{self._kind} range {base:#x}-{new.end - 1:#x} for {name} overlaps "
                    f"{neighbour.name} at {neighbour.base:#x}-{neighbour.end - 1:#x}"
                )
        self._bases.insert(i, base)
        self._ranges.insert(i, new)
        return new

    def remove(self, base: int) -> BusRange[D]:
        i = bisect.bisect_left(self._bases, base)
        if i == len(self._bases) or self._bases[i] != base:
            raise BusConflictError(f"no {self._kind} range starts at {base:#x}")
        del self._bases[i]
        return self._ranges.pop(i)

    def find(self, addr: int) -> BusRange[D] | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr in self._ranges[i]:
            return self._ranges[i]
        return None

    def __iter__(self):
        return iter(tuple(self._ranges))


def _check_size(size: int, allowed: tuple[int, ...], kind: str) -> None:
    if size not in allowed:
        raise CetvmError(f"{kind} access of {size} bytes: the size must be one of {allowed}")


class PioBus:
    """The 64 KiB x86 I/O port space."""

    def __init__(self) -> None:
        self._map: _RangeMap[PioDevice] = _RangeMap(0x10000, "port")

    def register(self, base: int, length: int, device: PioDevice, name: str | None = None) -> None:
        """Claim ports ``[base, base + length)`` for ``device``; overlaps raise BusConflictError."""
        self._map.insert(base, length, device, name or type(device).__name__)

    def unregister(self, base: int) -> PioDevice:
        return self._map.remove(base).device

    def ranges(self) -> tuple[BusRange[PioDevice], ...]:
        return tuple(self._map)

    def device_at(self, port: int) -> PioDevice | None:
        found = self._map.find(port)
        return found.device if found else None

    def read(self, port: int, size: int) -> int:
        """IN of ``size`` bytes; the device owning ``port`` answers, else all ones."""
        _check_size(size, PIO_SIZES, "port I/O")
        found = self._map.find(port)
        if found is None:
            return all_ones(size)
        return found.device.pio_read(port - found.base, size) & all_ones(size)

    def write(self, port: int, size: int, value: int) -> None:
        """OUT of ``size`` bytes; dropped when no device owns ``port``."""
        _check_size(size, PIO_SIZES, "port I/O")
        found = self._map.find(port)
        if found is not None:
            found.device.pio_write(port - found.base, size, value & all_ones(size))


class MmioBus:
    """Guest-physical MMIO ranges (52-bit physical address space)."""

    def __init__(self) -> None:
        self._map: _RangeMap[MmioDevice] = _RangeMap(1 << 52, "MMIO")

    def register(self, base: int, length: int, device: MmioDevice, name: str | None = None) -> None:
        self._map.insert(base, length, device, name or type(device).__name__)

    def unregister(self, base: int) -> MmioDevice:
        return self._map.remove(base).device

    def ranges(self) -> tuple[BusRange[MmioDevice], ...]:
        return tuple(self._map)

    def is_claimed(self, addr: int) -> bool:
        return self._map.find(addr) is not None

    def read(self, addr: int, size: int) -> int:
        _check_size(size, MMIO_SIZES, "MMIO")
        found = self._map.find(addr)
        if found is None:
            return all_ones(size)
        return found.device.mmio_read(addr - found.base, size) & all_ones(size)

    def write(self, addr: int, size: int, value: int) -> None:
        _check_size(size, MMIO_SIZES, "MMIO")
        found = self._map.find(addr)
        if found is not None:
            found.device.mmio_write(addr - found.base, size, value & all_ones(size))
