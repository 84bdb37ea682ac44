"""Guest-physical memory of a vCPU: RAM/MMIO regions, physical and virtual access, translation.

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change):

- the region list (RAM backed by our own anonymous mmaps handed to Unicorn with
  ``mem_map_ptr``, MMIO declared only — accesses to it, or to nothing, exit as in KVM);
- physical access (through Unicorn, or straight into our RAM backing on the hot paths);
- virtual access and the translation cache (a TLB keyed by (page, access kind) for the current
  :class:`~cetvm.cpu.paging.PagingMode`; flushed on every mode change, MOV to CR0/CR3/CR4,
  INVLPG/INVPCID [SDM Vol. 3 §4.10.4]).

The vCPU sets :attr:`GuestMemory.mode` (``set_mode``) whenever it re-reads the paging state.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

from unicorn import UC_PROT_ALL, Uc, UcError

from cetvm import InputError
from cetvm.cpu.faults import GuestFault, NoRamAccess
from cetvm.cpu.paging import Access, PagingMode, translate
from cetvm.arch.regs import U64_MASK

PAGE = 0x1000
#: Little-endian unsigned codecs for the hot-path RAM accesses (shadow stack, page walks).
LE_UINT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


@dataclass(frozen=True)
class MemoryRegion:
    gpa: int
    size: int
    kind: str  # "ram" or "mmio"


class GuestMemory:
    """The guest-physical address space of one vCPU and its guest-virtual view."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._regions: list[MemoryRegion] = []
        self._ram: list[tuple[int, int, memoryview, mmap.mmap]] = []
        self.mode = PagingMode(0, 0, 0, 0)
        self._tlb: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ regions
    def map_ram(self, gpa: int, size: int, backing: mmap.mmap | None = None) -> int:
        """Back guest-physical [gpa, gpa+size) with zero-filled RAM; returns its host address.

        The host memory is ours (an anonymous mmap handed to Unicorn with mem_map_ptr), so the
        hot paths read and write it directly instead of through uc_mem_read/write. ``backing``:
        an existing mapping of ``size`` bytes to use instead (another vCPU's RAM, see
        :meth:`ram_backing`): several engines then share one guest RAM (SMP).
        """
        self._check_region(gpa, size)
        if backing is None:
            backing = mmap.mmap(-1, size)
        elif len(backing) != size:
            raise InputError(f"RAM backing of {len(backing):#x} bytes for a region of {size:#x}")
        address = ctypes.addressof(ctypes.c_char.from_buffer(backing))
        self._uc.mem_map_ptr(gpa, size, UC_PROT_ALL, address)
        self._regions.append(MemoryRegion(gpa, size, "ram"))
        self._ram.append((gpa, gpa + size, memoryview(backing), backing))
        return address

    def map_mmio(self, gpa: int, size: int) -> None:
        """Declare [gpa, gpa+size) MMIO (guest accesses exit with ExitReason.MMIO)."""
        self._check_region(gpa, size)
        self._regions.append(MemoryRegion(gpa, size, "mmio"))

    def _check_region(self, gpa: int, size: int) -> None:
        """Regions are page-aligned and never overlap (KVM_SET_USER_MEMORY_REGION's checks)."""
        if gpa % PAGE or size % PAGE or size <= 0:
            raise InputError(f"memory region {gpa:#x}+{size:#x} is not page-aligned")
        for region in self._regions:
            if gpa < region.gpa + region.size and region.gpa < gpa + size:
                raise InputError(f"memory region {gpa:#x}+{size:#x} overlaps {region.kind} {region.gpa:#x}+{region.size:#x}")

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def ram_backing(self, gpa: int) -> mmap.mmap:
        """The host mapping of the RAM region that starts at ``gpa`` (to share it)."""
        for start, _end, _view, backing in self._ram:
            if start == gpa:
                return backing
        raise InputError(f"no RAM region starts at {gpa:#x}")

    # ------------------------------------------------------------------ physical access
    def read_phys(self, gpa: int, size: int) -> bytes:
        return bytes(self._uc.mem_read(gpa, size))

    def write_phys(self, gpa: int, data: bytes) -> None:
        self._uc.mem_write(gpa, bytes(data))

    def is_ram(self, gpa: int, size: int) -> bool:
        """[gpa, gpa+size) lies entirely in one RAM region (else an access is MMIO: a device
        region or nothing)."""
        return any(start <= gpa and gpa + size <= end for start, end, _view, _backing in self._ram)

    def ram_view(self, gpa: int, size: int) -> tuple[memoryview, int]:
        """The host view of our RAM holding [gpa, gpa+size) and the offset in it."""
        for start, end, view, _backing in self._ram:
            if start <= gpa and gpa + size <= end:
                return view, gpa - start
        raise NoRamAccess(gpa, size)

    def phys_read_int(self, gpa: int, size: int) -> int:
        """Hot-path physical read of our own RAM backing (no call into Unicorn)."""
        view, off = self.ram_view(gpa, size)
        codec = LE_UINT.get(size)
        if codec is None:
            return int.from_bytes(view[off:off + size], "little")
        return codec.unpack_from(view, off)[0]

    def phys_write_int(self, gpa: int, value: int, size: int) -> None:
        view, off = self.ram_view(gpa, size)
        value &= (1 << (8 * size)) - 1
        codec = LE_UINT.get(size)
        if codec is None:
            view[off:off + size] = value.to_bytes(size, "little")
        else:
            codec.pack_into(view, off, value)

    def read_phys_u64(self, gpa: int) -> int:
        """A page-table entry (the walker's physical read)."""
        return self.phys_read_int(gpa, 8)

    # ------------------------------------------------------------------ translation
    def set_mode(self, mode: PagingMode) -> None:
        """A new paging mode: cached translations belong to the old one (flushed)."""
        self.mode = mode
        self._tlb.clear()

    def translate(self, linear: int, access: Access = Access.READ) -> int:
        """Guest-virtual → guest-physical with the current paging mode (raises GuestFault).

        Successful translations are cached per (page, access kind) like a TLB: architecturally
        a TLB may keep them until MOV to CR0/CR3/CR4, INVLPG/INVPCID or a mode change, which
        all flush this cache (``flush``).
        """
        key = (linear >> 12, access)
        page = self._tlb.get(key)
        if page is None:
            page = translate(self.read_phys_u64, self.mode, linear, Access(access)) & ~0xFFF
            self._tlb[key] = page
        return page | (linear & 0xFFF)

    def walk(self, linear: int, access: Access) -> int:
        """An uncached page walk (no TLB fill): for diagnosing a fault after the fact."""
        return translate(self.read_phys_u64, self.mode, linear, access)

    def flush(self) -> None:
        """Forget every cached translation."""
        self._tlb.clear()

    # ------------------------------------------------------------------ virtual access
    def read_virt(self, linear: int, size: int, access: Access = Access.READ) -> bytes:
        """Read guest-virtual memory page by page (raises GuestFault on a translation fault)."""
        out = bytearray()
        while size > 0:
            chunk = min(size, PAGE - (linear & (PAGE - 1)))
            gpa = self.translate(linear, access)
            self._require_ram(gpa, chunk, "read")
            out += self._uc.mem_read(gpa, chunk)
            linear, size = (linear + chunk) & U64_MASK, size - chunk
        return bytes(out)

    def _require_ram(self, gpa: int, size: int, what: str) -> None:
        if not self.is_ram(gpa, size):
            raise NoRamAccess(gpa, size, what)

    def write_virt(self, linear: int, data: bytes, access: Access = Access.WRITE) -> None:
        """Write guest-virtual memory (all pages are translated before anything is written)."""
        pieces = []
        offset = 0
        while offset < len(data):
            chunk = min(len(data) - offset, PAGE - ((linear + offset) & (PAGE - 1)))
            pieces.append((self.translate((linear + offset) & U64_MASK, access | Access.WRITE), data[offset:offset + chunk]))
            offset += chunk
        for gpa, piece in pieces:
            self._require_ram(gpa, len(piece), "write")
        for gpa, piece in pieces:
            self._uc.mem_write(gpa, bytes(piece))

    def read_code(self, linear: int, size: int, access: Access) -> bytes:
        """Instruction bytes; stops early at an untranslatable page (fewer bytes, no fault)."""
        out = bytearray()
        while size > 0:
            chunk = min(size, PAGE - (linear & (PAGE - 1)))
            try:
                out += self._uc.mem_read(self.translate(linear, access), chunk)
            except (GuestFault, UcError):
                if not out:
                    raise
                break
            linear, size = (linear + chunk) & U64_MASK, size - chunk
        return bytes(out)
