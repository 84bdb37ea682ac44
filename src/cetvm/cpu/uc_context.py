"""Privileged state Unicorn 2.1.4 does not let us write: segment caches, CPL, old_exception.

``reg_write`` of CS/SS in 64-bit mode sets only the selector; CPL lives in QEMU's ``hflags``.
We therefore save Unicorn's context, patch the CPUX86State blob and restore it (measured on
Unicorn 2.1.4). The offsets are those of Unicorn 2.1.4's x86_64 CPUX86State; they are
self-checked by :func:`check_unicorn` before the first vCPU is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
from dataclasses import dataclass
from typing import Iterator

import unicorn
from unicorn import Uc
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_REG_CR2, UC_X86_REG_CS, UC_X86_REG_RAX

from cetvm import CetvmError
from cetvm.cpu.state import DPL_SHIFT, Segment, SegAttr

REQUIRED_UNICORN = "2.1.4"

#: Offset of the CPUX86State copy inside a ``uc_context`` allocation.
CONTEXT_DATA_OFFSET = 40
#: Size of the saved CPUX86State in 2.1.4 (x86_64).
CONTEXT_DATA_SIZE = 5568
HFLAGS_OFFSET = 176
HFLAGS2_OFFSET = 180
#: env->v_tpr (uint8_t): the CR8 the engine's MOV to/from CR8 write and read while hflags2 has
#: HF2_VINTR (measured: the byte a guest MOV to CR8 changes; without HF2_VINTR the engine's MOV
#: from CR8 reads its absent APIC as 0).
V_TPR_OFFSET = 5556
SEGS_OFFSET = 184  # segs[ES, CS, SS, DS, FS, GS], 24 bytes each: selector u32, pad, base u64, limit u32, flags u32
SEGMENT_CACHE_SIZE = 24
ERROR_CODE_OFFSET = 5384
OLD_EXCEPTION_OFFSET = 5496

#: QEMU segment indexes in segs[].
SEG_INDEX = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}


class HFlags2:
    """QEMU's x86 HF2_* hflags2 bits cetvm sets."""

    #: HF2_VINTR_MASK (SVM's V_INTR_MASKING): the engine's MOV to/from CR8 use env->v_tpr
    #: instead of its (absent) local APIC — cetvm's CR8 (:attr:`cetvm.cpu.registers.Registers.cr8`)
    VINTR = 1 << 3


class HFlags:
    """QEMU's x86 HF_* hflags bits that depend on segment state."""

    CPL_MASK = 3
    INHIBIT_IRQ = 1 << 3  # HF_INHIBIT_IRQ_MASK: the STI / MOV SS interrupt shadow (measured)
    CS32 = 1 << 4
    SS32 = 1 << 5
    ADDSEG = 1 << 6
    PE = 1 << 7
    LMA = 1 << 14
    CS64 = 1 << 15


def check_unicorn(uc: Uc) -> None:
    """Fail with a clear message unless the installed Unicorn has the 2.1.4 layout we patch."""
    if unicorn.__version__ != REQUIRED_UNICORN:
        raise CetvmError(f"cetvm needs unicorn=={REQUIRED_UNICORN} (installed: {unicorn.__version__}); "
                         f"run: pip install unicorn=={REQUIRED_UNICORN}")
    saved_rax = uc.reg_read(UC_X86_REG_RAX)
    saved_cs = uc.reg_read(UC_X86_REG_CS)
    uc.reg_write(UC_X86_REG_RAX, 0x5A5A_1234_8765_A5A5)
    uc.reg_write(UC_X86_REG_CS, 0x4B)
    blob = ContextBlob.save(uc)
    ok = (blob.size == CONTEXT_DATA_SIZE and blob.u64(0) == 0x5A5A_1234_8765_A5A5
          and blob.u32(SEGS_OFFSET + SEGMENT_CACHE_SIZE * SEG_INDEX["cs"]) == 0x4B
          and blob.u32(HFLAGS_OFFSET) & (HFlags.LMA | HFlags.CS64) == HFlags.LMA | HFlags.CS64)
    uc.reg_write(UC_X86_REG_RAX, saved_rax)
    uc.reg_write(UC_X86_REG_CS, saved_cs)
    if not ok:
        raise CetvmError("the installed unicorn's CPU context layout is not the 2.1.4 one cetvm patches; "
                         f"reinstall unicorn=={REQUIRED_UNICORN}")


@dataclass
class CpuStateView:
    """Typed access to the CPUX86State fields cetvm patches, at ``address`` (a saved copy or the
    engine's own)."""

    address: int

    def u32(self, offset: int) -> int:
        return ctypes.c_uint32.from_address(self.address + offset).value

    def set_u32(self, offset: int, value: int) -> None:
        ctypes.c_uint32.from_address(self.address + offset).value = value & 0xFFFF_FFFF

    def u64(self, offset: int) -> int:
        return ctypes.c_uint64.from_address(self.address + offset).value

    def segment(self, name: str) -> Segment:
        off = SEGS_OFFSET + SEGMENT_CACHE_SIZE * SEG_INDEX[name]
        sel, _pad, base, limit, flags = struct.unpack(
            "<IIQII", ctypes.string_at(self.address + off, SEGMENT_CACHE_SIZE))
        return Segment(sel & 0xFFFF, base, limit, flags)

    def set_segment(self, name: str, seg: Segment) -> None:
        off = SEGS_OFFSET + SEGMENT_CACHE_SIZE * SEG_INDEX[name]
        ctypes.memmove(self.address + off,
                       struct.pack("<IIQII", seg.selector & 0xFFFF, 0, seg.base & 0xFFFF_FFFF_FFFF_FFFF,
                                   seg.limit & 0xFFFF_FFFF, seg.attributes & 0xFFFF_FFFF),
                       SEGMENT_CACHE_SIZE)

    @property
    def hflags(self) -> int:
        return self.u32(HFLAGS_OFFSET)

    @hflags.setter
    def hflags(self, value: int) -> None:
        self.set_u32(HFLAGS_OFFSET, value)

    @property
    def hflags2(self) -> int:
        return self.u32(HFLAGS2_OFFSET)

    @hflags2.setter
    def hflags2(self, value: int) -> None:
        self.set_u32(HFLAGS2_OFFSET, value)

    @property
    def v_tpr(self) -> int:
        return ctypes.c_uint8.from_address(self.address + V_TPR_OFFSET).value

    @v_tpr.setter
    def v_tpr(self, value: int) -> None:
        ctypes.c_uint8.from_address(self.address + V_TPR_OFFSET).value = value & 0xFF

    def reset_old_exception(self) -> None:
        """old_exception = -1, so the next fault is not promoted to #DF."""
        ctypes.c_int32.from_address(self.address + OLD_EXCEPTION_OFFSET).value = -1


@dataclass
class ContextBlob(CpuStateView):
    """A saved Unicorn context: a copy of the CPUX86State, written back by :meth:`restore`."""

    context: object  # unicorn UcContext
    size: int

    @classmethod
    def save(cls, uc: Uc) -> "ContextBlob":
        ctx = uc.context_save()
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value
        size = ctypes.c_size_t.from_address(base).value
        return cls(base + CONTEXT_DATA_OFFSET, ctx, size)

    def restore(self, uc: Uc) -> None:
        uc.context_restore(self.context)


#: Offset of ``cpu`` (the CPUState) in Unicorn 2.1.4's ``struct uc_struct`` (x86-64): three
#: 4-byte enums padded to 16 bytes, two 56-byte AddressSpace structures, 39 function pointers.
UC_STRUCT_CPU_OFFSET = 16 + 2 * 56 + 39 * 8
#: CPUState.env_ptr lies in the structure's first bytes (before tb_jmp_cache); the CPUX86State
#: it points at follows the CPUState in the same X86CPU object.
_ENV_PTR_SEARCH_BYTES = 2048
_ENV_SEARCH_SPAN = 1 << 16


def live_env(uc: Uc) -> CpuStateView:
    """The engine's own CPUX86State (uc->cpu->env_ptr), read and written in place: what a
    :class:`ContextBlob` save/patch/restore does, without copying 5.5 KiB twice — the fields
    cetvm reads at every exit (hflags' interrupt shadow, old_exception, XCR0).

    Found by a probe: the pointer in the CPUState's first bytes whose target holds exactly
    what a saved context holds (with RAX set to a marker); CetvmError if none does."""
    handle = uc._uch.value
    cs = ctypes.c_void_p.from_address(handle + UC_STRUCT_CPU_OFFSET).value
    saved_rax = uc.reg_read(UC_X86_REG_RAX)
    uc.reg_write(UC_X86_REG_RAX, 0xC37F_E0E1_5EED_0A55)
    try:
        blob = ContextBlob.save(uc)
        expected = ctypes.string_at(blob.address, blob.size)
        if cs:
            words = struct.unpack(f"<{_ENV_PTR_SEARCH_BYTES // 8}Q", ctypes.string_at(cs, _ENV_PTR_SEARCH_BYTES))
            for pointer in words:
                if cs < pointer < cs + _ENV_SEARCH_SPAN and ctypes.string_at(pointer, blob.size) == expected:
                    return CpuStateView(pointer)
    finally:
        uc.reg_write(UC_X86_REG_RAX, saved_rax)
    raise CetvmError("cannot find the engine's CPU state (not Unicorn 2.1.4's layout); "
                     f"reinstall unicorn=={REQUIRED_UNICORN}")


#: Offsets in Unicorn 2.1.4's CPUState (QEMU 5.0's struct CPUState, x86-64): nr_cores and
#: nr_threads (both 1 in every engine: the layout check), cflags_next_tb after the thread
#: pointer and seven bools.
_CPUSTATE_NR_CORES, _CPUSTATE_NR_THREADS, _CPUSTATE_CFLAGS_NEXT_TB = 0, 4, 24
#: cflags_next_tb when no request is pending (cpu_common_reset: -1).
_NO_CFLAGS_REQUEST = 0xFFFF_FFFF
#: QEMU 5.0's CF_COUNT_MASK: the largest instruction count a translation block may be asked for.
CF_COUNT_MASK = 0x7FFF


class EngineCpu:
    """Two services of the engine's CPU that Unicorn's API lacks, taken from its CPUState:

    - :meth:`next_block_instructions`: QEMU's ``cflags_next_tb`` — the next translation block
      the engine looks up holds at most ``n`` instructions (a block of its own in the
      translation cache: the block's usual translation stays), as QEMU's icount and precise-SMC
      code ask. cetvm runs exactly the first instructions of a block this way (budget fences,
      single steps) instead of moving a Unicorn exit and translating the block twice around it.
    - :meth:`flush_tlb_page`: QEMU's ``tlb_flush_page`` (exported by libunicorn), what the
      engine's own INVLPG does.

    :meth:`find` checks the layout (nr_cores = nr_threads = 1, no request pending) and gives
    None when it does not match: the callers then use the exits as before."""

    def __init__(self, address: int) -> None:
        self._cflags = ctypes.c_uint32.from_address(address + _CPUSTATE_CFLAGS_NEXT_TB)
        self._address = ctypes.c_void_p(address)
        self._flush_page = uclib.tlb_flush_page_x86_64
        self._flush_page.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        self._flush_page.restype = None

    @classmethod
    def find(cls, uc: Uc) -> "EngineCpu | None":
        cs = ctypes.c_void_p.from_address(uc._uch.value + UC_STRUCT_CPU_OFFSET).value
        if not cs or not hasattr(uclib, "tlb_flush_page_x86_64"):
            return None
        words = [ctypes.c_uint32.from_address(cs + offset).value
                 for offset in (_CPUSTATE_NR_CORES, _CPUSTATE_NR_THREADS, _CPUSTATE_CFLAGS_NEXT_TB)]
        return cls(cs) if words == [1, 1, _NO_CFLAGS_REQUEST] else None

    def next_block_instructions(self, n: int | None) -> None:
        """The next translation block holds at most ``n`` (1..CF_COUNT_MASK) instructions; None
        withdraws a request the engine did not take."""
        if n is None:
            self._cflags.value = _NO_CFLAGS_REQUEST
            return
        if not 1 <= n <= CF_COUNT_MASK:
            raise CetvmError(f"a translation block holds 1..{CF_COUNT_MASK} instructions, not {n}")
        self._cflags.value = n

    @contextlib.contextmanager
    def first_instructions(self, n: int) -> Iterator[None]:
        """Within: the next translation block holds at most ``n`` instructions; the request is
        withdrawn on the way out whether the engine took it or not."""
        self.next_block_instructions(n)
        try:
            yield
        finally:
            self.next_block_instructions(None)

    def flush_tlb_page(self, linear: int) -> None:
        """Drop the engine's TLB entries for the page of ``linear`` (all of them if it lies in a
        large page the engine cached)."""
        self._flush_page(self._address, linear & 0xFFFF_FFFF_FFFF_FFFF)


def segment_hflags(hflags: int, cs: Segment, ss: Segment, ds: Segment, es: Segment, cr0_pe: bool) -> int:
    """Recompute the segment-dependent hflags the way QEMU's cpu_x86_load_seg_cache does.

    CS64/CS32/SS32 from CS.L (with LMA) and the D/B bits, CPL from SS.DPL (QEMU keeps CPL =
    SS.DPL), ADDSEG when a legacy-mode data base is non-zero.
    """
    hflags &= ~(HFlags.CPL_MASK | HFlags.CS32 | HFlags.SS32 | HFlags.CS64 | HFlags.ADDSEG)
    if hflags & HFlags.LMA and cs.attributes & SegAttr.L:
        hflags |= HFlags.CS32 | HFlags.SS32 | HFlags.CS64
    else:
        if cs.attributes & SegAttr.DB:
            hflags |= HFlags.CS32
        if ss.attributes & SegAttr.DB:
            hflags |= HFlags.SS32
        if not cr0_pe or not hflags & HFlags.CS32:
            hflags |= HFlags.ADDSEG
        elif ds.base | es.base | ss.base:
            hflags |= HFlags.ADDSEG
    hflags |= (ss.attributes >> DPL_SHIFT) & 3
    return hflags


@contextlib.contextmanager
def cr2_kept(uc: Uc) -> Iterator[None]:
    """Put the guest's CR2 back after engine work. CR2 changes architecturally only when a #PF
    is delivered (:func:`cetvm.cpu.events.deliver` writes the pending #PF's own CR2, read by the
    interrupt hook) or by MOV to CR2 (emulated), but Unicorn also writes it on events that are
    no #PF for the guest: MMIO and unmapped accesses, mapping and unmapping a scratch page, the
    re-translation of a stale block after a paging change. (Found by a 2-vCPU snapshot: the
    continued machine's AP had CR2 = 0x14, the restored one 0.)"""
    cr2 = ctypes.c_uint64()  # through the C API: every engine run passes here
    if uclib.uc_reg_read(uc._uch, UC_X86_REG_CR2, ctypes.byref(cr2)) != 0:
        raise CetvmError("cannot read CR2 from the engine")
    try:
        yield
    finally:
        uclib.uc_reg_write(uc._uch, UC_X86_REG_CR2, ctypes.byref(cr2))
