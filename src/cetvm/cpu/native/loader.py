"""Python side of the native CET fast path (``libcetfast.so``, built from ``cetfast.c``).

:class:`NativeCet` installs the C UC_HOOK_BLOCK callback on a Unicorn instance through
Unicorn's C API, handing it the binding's own ``uc_reg_write``/``uc_mem_read``/``uc_mem_write``/
``uc_emu_stop`` pointers (so the same libunicorn instance is used) and a ctypes classifier that
runs once per new block. Three small adapters let the engine use it where it used Python objects:

- :class:`NativeCetState` — the vCPU's CET registers (``ssp``, ``u_cet``, ``s_cet`` live in the
  native shared state, ``pl_ssp`` and ``int_ssp_tab`` stay in Python), duck-typing
  :class:`cetvm.cpu.state.CetState`;
- :class:`NativeBlockTracker` — the classification cache and pending terminator, the interface
  of :class:`cetvm.cpu.blocks.BlockTracker`;
- :meth:`NativeCet.take_handover` — a block start the native code left to Python (see
  ``cetfast.c``): the engine runs :func:`cetvm.cpu.cet.transfer.on_block_start` for it.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cetvm import CetvmError, NotSupportedError
from cetvm.cpu.blocks import BlockInfo
from cetvm.cpu.cet.transfer import Terminator, TerminatorInfo
from cetvm.cpu.uc_context import UC_STRUCT_CPU_OFFSET

#: Must equal CETFAST_ABI in cetfast.c.
ABI_VERSION = 20
LIBRARY_PATH = Path(__file__).resolve().parent / "libcetfast.so"
_UC_HOOK_BLOCK = 1 << 3
_UC_HOOK_CODE = 1 << 2
_UC_HOOK_INSN_INVALID = 1 << 14


class Handover(enum.IntEnum):
    """Why the native hook left a block start to Python (values of cetfast.c's H_*)."""

    NONE = 0
    SHADOW_STACK_ACCESS = 1
    RET_MISMATCH = 2
    ENDBRANCH = 3


class PagingKind(enum.IntEnum):
    """What the native shadow-stack walker does: identity, 4-level walk, or hand over."""

    OFF = 0
    FOUR_LEVEL = 1
    OTHER = 2


class TermStruct(ctypes.Structure):
    _fields_ = [("insn_addr", ctypes.c_uint64), ("kind", ctypes.c_uint8), ("insn_len", ctypes.c_uint8),
                ("imm16", ctypes.c_uint16), ("pad", ctypes.c_uint32)]


class BlockStruct(ctypes.Structure):
    """Mirror of ``cet_block_t`` (``ret`` = the terminator's address + length)."""

    _fields_ = [("addr", ctypes.c_uint64), ("ret", ctypes.c_uint64),
                ("size", ctypes.c_uint16), ("icount", ctypes.c_uint16),
                ("kbit", ctypes.c_uint16), ("no_endbr64", ctypes.c_uint16),
                ("imm16", ctypes.c_uint16), ("insn_len", ctypes.c_uint8), ("first_len", ctypes.c_uint8),
                ("first", ctypes.c_uint8 * 4)]

    @property
    def kind(self) -> int:
        return self.kbit.bit_length() - 1


class SharedState(ctypes.Structure):
    """Mirror of ``cet_shared_t`` (checked against the library's sizeof at load time).

    Read freely; write ``ssp`` freely, everything else only through :class:`NativeCet` and
    :class:`NativeCetState` (the hook's short-path masks are recomputed from the mode, U_CET and
    S_CET by ``cetfast_refresh`` after each such write).
    """

    _fields_ = [
        ("ssp", ctypes.c_uint64), ("_pend", ctypes.c_void_p),
        ("_act_kinds", ctypes.c_uint32), ("_arm_kinds", ctypes.c_uint32),
        ("_push_kinds", ctypes.c_uint32), ("_pop_kinds", ctypes.c_uint32),
        ("_ss_tag", ctypes.c_uint64), ("_ss_delta", ctypes.c_uint64),
        ("budget_left", ctypes.c_int64), ("budget_stop", ctypes.c_uint64),
        ("u_cet", ctypes.c_uint64), ("s_cet", ctypes.c_uint64),
        ("cpl", ctypes.c_uint8), ("long_mode", ctypes.c_uint8), ("cr4_cet", ctypes.c_uint8),
        ("enabled", ctypes.c_uint8), ("handover", ctypes.c_uint32),
        ("_table", ctypes.c_void_p), ("_table_mask", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64), ("paging", ctypes.c_uint32), ("cs_base", ctypes.c_uint32),
        ("abi", ctypes.c_uint64),
        ("handover_term", TermStruct), ("handover_addr", ctypes.c_uint64),
        ("misses", ctypes.c_uint64), ("handovers", ctypes.c_uint64), ("tlb_fills", ctypes.c_uint64),
        ("slow_mem", ctypes.c_uint64), ("callback_errors", ctypes.c_uint64),
    ]


_CLASSIFY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32)
_VP = ctypes.c_void_p
_U64 = ctypes.c_uint64
_U32 = ctypes.c_uint32


class InsnCounter(ctypes.Structure):
    """cet_insn_counter_t: the exact instruction-budget counter shared with ``cetfast_count_insn``."""

    _fields_ = [("budget_left", ctypes.c_int64), ("retired", ctypes.c_uint64),
                ("hit", ctypes.c_int32), ("pad", ctypes.c_int32), ("emu_stop", _VP)]


#: int hook(uc_engine *, void *user_data): the RDTSC/RDTSCP instruction-hook signature.
INSN_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, _VP, _VP)


class TscStruct(ctypes.Structure):
    """cet_tsc_t: the state of the native RDTSC/RDTSCP hooks (``cetfast_rdtsc``)."""

    _fields_ = [("base_tsc", _U64), ("base_left", ctypes.c_int64), ("ticks_per_insn", _U64), ("budget_left", _VP), ("last", _U64),
                ("reg_write", _VP), ("reg_read", _VP), ("slow_rdtsc", _VP), ("slow_rdtscp", _VP)]


def _native_functions(*names: str) -> tuple[int, ...] | None:
    """Addresses of the library's functions ``names``, or None when the library is not built
    (or does not match this cetvm)."""
    if not is_built():
        return None
    try:
        lib = load_library()
    except CetvmError:
        return None
    return tuple(ctypes.cast(getattr(lib, name), _VP).value for name in names)


def native_tsc_hooks() -> tuple[int, ...] | None:
    """Addresses of ``cetfast_rdtsc`` and ``cetfast_rdtscp``, or None when the library is not built."""
    return _native_functions("cetfast_rdtsc", "cetfast_rdtscp")


def native_count_hook() -> int | None:
    """Address of the native UC_HOOK_CODE budget counter, or None when the library is not built."""
    functions = _native_functions("cetfast_count_insn")
    return None if functions is None else functions[0]


#: ``first_len`` of cet_block_t: the byte count in bits 3:0, BLOCK_GLOBAL in bit 7.
_FIRST_LEN_MASK, _BLOCK_GLOBAL = 0x0F, 0x80
#: Offset of ``uc_invalidate_tb`` in Unicorn 2.1.4's ``struct uc_struct`` (x86-64): three 4-byte
#: enums padded to 16 bytes, two 56-byte AddressSpace structures, then 31 function pointers.
UC_INVALIDATE_TB_OFFSET = 16 + 2 * 56 + 31 * 8
#: Where the probe of :meth:`NativeCet.filter_exit_invalidation` asks to drop translations
#: (unmapped when the vCPU is created: nothing is dropped).
_FILTER_PROBE = 0xFFFF_F000


def is_built() -> bool:
    """True if ``libcetfast.so`` exists (built by ``python -m cetvm.cpu.native.build``)."""
    return LIBRARY_PATH.is_file()


@functools.cache
def load_library() -> ctypes.CDLL:
    """Load the library once per process and check its ABI (NotSupportedError if not built)."""
    if not is_built():
        raise NotSupportedError("the native CET fast path is not built; run: python -m cetvm.cpu.native.build")
    lib = ctypes.CDLL(str(LIBRARY_PATH))
    lib.cetfast_abi.restype = _U64
    lib.cetfast_shared_size.restype = _U64
    lib.cetfast_block_size.restype = _U64
    lib.cetfast_insn_counter_size.restype = _U64
    lib.cetfast_tsc_size.restype = _U64
    if (lib.cetfast_abi() != ABI_VERSION or lib.cetfast_tsc_size() != ctypes.sizeof(TscStruct) or lib.cetfast_shared_size() != ctypes.sizeof(SharedState)
            or lib.cetfast_block_size() != ctypes.sizeof(BlockStruct)
            or lib.cetfast_insn_counter_size() != ctypes.sizeof(InsnCounter)):
        raise CetvmError(f"{LIBRARY_PATH.name} does not match this cetvm (ABI {lib.cetfast_abi()}); "
                         "rebuild it: python -m cetvm.cpu.native.build --force")
    lib.cetfast_new.restype = _VP
    lib.cetfast_new.argtypes = [_VP, _VP, _VP, _VP, _VP, _VP]
    lib.cetfast_free.argtypes = [_VP]
    lib.cetfast_flush_tlb.argtypes = [_VP]
    lib.cetfast_add_ram.argtypes = [_VP, _U64, _U64, _VP]
    lib.cetfast_clear_ram.argtypes = [_VP]
    lib.cetfast_store.argtypes = [_VP, _U64, _U32, _U32, _U32, _U64, _U32, _U32, ctypes.c_char_p, _U32, _U32]
    lib.cetfast_last_block.argtypes = [_VP, ctypes.POINTER(_U64), ctypes.POINTER(_U32), ctypes.POINTER(_U32)]
    lib.cetfast_close_last.argtypes = [_VP]
    lib.cetfast_lookup.argtypes = [_VP, _U64, _U32, ctypes.POINTER(BlockStruct)]
    lib.cetfast_block_count.restype = _U64
    lib.cetfast_block_count.argtypes = [_VP]
    lib.cetfast_invalidate_blocks.argtypes = [_VP]
    lib.cetfast_invalidate_local_blocks.argtypes = [_VP]
    lib.cetfast_invalidate_block_range.argtypes = [_VP, _U64, _U64]
    lib.cetfast_refresh.argtypes = [_VP]
    lib.cetfast_get_pending.restype = _U64
    lib.cetfast_get_pending.argtypes = [_VP, ctypes.POINTER(TermStruct)]
    lib.cetfast_set_pending.argtypes = [_VP, _U32, _U64, _U32, _U32, _U64]
    lib.cetfast_enable_tlb_fill.argtypes = [_VP]
    lib.cetfast_reset_fetched.argtypes = [_VP]
    lib.cetfast_split_tlb.restype = ctypes.c_int
    lib.cetfast_split_tlb.argtypes = [_VP] * 7
    lib.cetfast_code_pages.restype = _U64
    lib.cetfast_code_pages.argtypes = [_VP]
    lib.cetfast_filter_exit_invalidation.restype = ctypes.c_int
    lib.cetfast_filter_exit_invalidation.argtypes = [_VP, _U64]
    lib.cetfast_unfilter_exit_invalidation.argtypes = [_VP, _U64]
    lib.cetfast_enable_serialize.argtypes = [_VP, _VP]
    lib.cetfast_serialized.restype = _U64
    lib.cetfast_serialized.argtypes = [_VP]
    lib.cetfast_filter_probe.argtypes = [ctypes.POINTER(_U64), ctypes.POINTER(_U64)]
    lib.cetfast_set_irq_watch.argtypes = [_VP, _VP]
    lib.cetfast_take_irq_window_stop.restype = ctypes.c_int
    lib.cetfast_take_irq_window_stop.argtypes = [_VP]
    lib.cetfast_set_env.argtypes = [_VP, _VP]
    lib.cetfast_set_plain_classify.argtypes = [_VP, _U32]
    lib.cetfast_classify_stats.argtypes = [_VP, ctypes.POINTER(_U64)]
    lib.cetfast_decode_plain64.restype = ctypes.c_int
    lib.cetfast_decode_plain64.argtypes = [ctypes.c_char_p, _U32, ctypes.POINTER(_U32)]
    return lib


def decode_plain64(code: bytes) -> tuple[int, Terminator, int] | None:
    """cetfast.c's decoder of plain instructions (for the agreement tests): the length of the
    64-bit instruction at the start of ``code``, the terminator it makes and RET's imm16, or
    None if it is not plain."""
    out = (_U32 * 3)()
    if not load_library().cetfast_decode_plain64(code, len(code), out):
        return None
    return out[0], Terminator(out[1]), out[2]


def _unicorn_api():
    from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

    return uclib, uc_hook_h


def _fnptr(f) -> int:
    return ctypes.cast(f, ctypes.c_void_p).value


def add_native_hook(uc, kind: int, callback, user_data: int, begin: int = 1, end: int = 0, *extra: int):
    """Register a C function of the library as a Unicorn hook of ``kind`` (``uc_hook_add``
    through the C API) with ``user_data`` its state; the handle (keep it: Unicorn owns no
    reference). ``extra``: the instruction id of a UC_HOOK_INSN hook."""
    uclib, hook_type = _unicorn_api()
    hook = hook_type()
    err = uclib.uc_hook_add(uc._uch, ctypes.byref(hook), kind, ctypes.c_void_p(_fnptr(callback)),
                            ctypes.c_void_p(user_data), ctypes.c_uint64(begin), ctypes.c_uint64(end),
                            *(ctypes.c_int(x) for x in extra))
    if err != 0:
        raise CetvmError(f"native fast path: uc_hook_add of {getattr(callback, '__name__', 'a hook')} failed "
                         f"(unicorn error {err})")
    return hook


def _release(lib: ctypes.CDLL, ptr: int) -> None:
    """Free the native state once its Unicorn instance is gone (its hooks point at the state)."""
    lib.cetfast_free(ptr)


@dataclass(frozen=True)
class HandoverRequest:
    """A block start left to Python: apply ``terminator`` (None = none) at ``block_addr``."""

    reason: Handover
    terminator: TerminatorInfo | None
    block_addr: int


def _term_info(t: TermStruct) -> TerminatorInfo | None:
    if t.kind == Terminator.FALLTHROUGH:
        return None
    return TerminatorInfo(Terminator(t.kind), t.insn_addr, t.insn_len, t.imm16)


def _term_fields(info: TerminatorInfo | None) -> tuple[int, int, int, int]:
    """(kind, insn_addr, insn_len, imm16) of ``info`` as the library stores them."""
    if info is None or info.kind == Terminator.FALLTHROUGH:
        return 0, 0, 0, 0
    return int(info.kind), info.insn_addr & 0xFFFF_FFFF_FFFF_FFFF, info.insn_len, info.imm16


class NativeCet:
    """The native block hook on one Unicorn instance.

    ``classify(address, size) -> bool``: called once for each new (address, size) block; it
    must store the block's :class:`BlockInfo` through :attr:`blocks` and return True, or return
    False after stopping emulation (e.g. it made some of the block's addresses exits). An
    exception inside it stops emulation and is re-raised by :meth:`raise_callback_error`.
    """

    def __init__(self, uc, classify: Callable[[int, int], bool]) -> None:
        self._lib = load_library()
        uclib, _ = _unicorn_api()
        self._uclib = uclib
        self._uc = uc
        self._classify = classify
        self._callback_error: BaseException | None = None
        self._c_classify = _CLASSIFY(self._classify_trampoline)
        ptr = self._lib.cetfast_new(_fnptr(uclib.uc_reg_read), _fnptr(uclib.uc_reg_write), _fnptr(uclib.uc_mem_read),
                                    _fnptr(uclib.uc_mem_write), _fnptr(uclib.uc_emu_stop),
                                    _fnptr(self._c_classify))
        if not ptr:
            raise CetvmError("native CET fast path: out of memory")
        self._ptr = ptr
        self.shared = SharedState.from_address(ptr)  # cet_shared_t is the first member
        self._hook = None
        self._tlb_hook = None
        self._serialize_hook = None
        # The hooks registered on ``uc`` point at the state: it lives exactly as long as ``uc``.
        # (The finalizer must not reference ``uc`` or this object, or neither is ever collected.)
        weakref.finalize(uc, _release, self._lib, ptr)
        self.blocks = NativeBlockTracker(self)
        self.cet_state = NativeCetState(self.shared, functools.partial(self._lib.cetfast_refresh, ptr))

    # ---------------------------------------------------------------- installation
    def install(self) -> None:
        """Register the C callback as the (single) UC_HOOK_BLOCK hook of the engine."""
        if self._hook is not None:
            return
        self._hook = add_native_hook(self._uc, _UC_HOOK_BLOCK, self._lib.cetfast_block_hook, self._ptr)

    def install_tlb_fill(self, *, set_mode: bool = True) -> None:
        """Paging-off guests: UC_TLB_VIRTUAL with a native TLB-fill hook (identity mapping) that
        keeps pages never fetched from non-executable, so stores stay on the engine's fast path.

        The hook only acts in UC_TLB_VIRTUAL mode, valid while the guest runs with CR0.PG=0
        (Unicorn then ignores guest page tables). ``set_mode=False``: register the hook only;
        the engine switches ``ctl_set_tlb_mode`` itself as paging is turned off and on.
        """
        if self._tlb_hook is not None:
            return
        if self._lib.cetfast_enable_tlb_fill(self._ptr) != 0:
            raise CetvmError("native CET fast path: out of memory for the TLB-fill bitmap")
        from unicorn import UC_HOOK_TLB_FILL, UC_TLB_VIRTUAL

        if set_mode:
            self._uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        self._tlb_hook = add_native_hook(self._uc, UC_HOOK_TLB_FILL, self._lib.cetfast_tlb_fill, self._ptr)

    def remove_tlb_fill(self) -> None:
        """Back to the CPU's own page-table walk (the guest enabled paging)."""
        if self._tlb_hook is None:
            return
        from unicorn import UC_TLB_CPU

        self._uclib.uc_hook_del(self._uc._uch, self._tlb_hook)
        self._tlb_hook = None
        self._uc.ctl_set_tlb_mode(UC_TLB_CPU)

    def split_tlb(self) -> bool:
        """Split the engine's TLB entries into instruction and data ones while paging is on (see
        cetfast.c, "split ITLB/DTLB"): stores to writable, executable pages never fetched from
        stay on the engine's fast path. Needs :meth:`install_tlb_fill` first (the fetched-page
        bitmap). True if the split is in; False if Unicorn's layout is not 2.1.4's (the engine
        then keeps one entry per page: slower stores to RWX pages, same results)."""
        uclib = self._uclib
        handle = self._uc._uch.value
        cs = ctypes.c_void_p.from_address(handle + UC_STRUCT_CPU_OFFSET).value
        try:
            functions = [_fnptr(getattr(uclib, name)) for name in (
                "x86_cpu_tlb_fill_x86_64", "unicorn_fill_tlb_x86_64", "tlb_set_page_with_attrs_x86_64",
                "tlb_flush_x86_64")]
        except AttributeError:
            return False
        return self._lib.cetfast_split_tlb(self._ptr, handle, cs, *functions) == 0

    @property
    def code_pages(self) -> int:
        """Physical pages the split TLB has seen fetched from (each flushed the engine's TLB once)."""
        return self._lib.cetfast_code_pages(self._ptr)

    def install_serialize(self) -> None:
        """Register the C UC_HOOK_INSN_INVALID hook that retires SERIALIZE in the engine (see
        cetfast.c "SERIALIZE"); before any other #UD hook of the engine."""
        self._lib.cetfast_enable_serialize(self._ptr, _fnptr(self._uclib.uc_vmem_read))
        self._serialize_hook = add_native_hook(self._uc, _UC_HOOK_INSN_INVALID, self._lib.cetfast_invalid_insn,
                                               self._ptr)

    def add_flags_hook(self, linear: int):
        """The C UC_HOOK_CODE that makes the flags whole in front of the CMPXCHG8B/16B at
        ``linear`` (cetfast.c "CMPXCHG8B / CMPXCHG16B flags"; :class:`cetvm.cpu.flag_sync.FlagSync`
        decides where); its handle."""
        return add_native_hook(self._uc, _UC_HOOK_CODE, self._lib.cetfast_flags_hook, self._ptr, linear, linear)

    @property
    def serialized(self) -> int:
        """SERIALIZE instructions the C hook retired."""
        return self._lib.cetfast_serialized(self._ptr)

    def filter_exit_invalidation(self) -> bool:
        """Stop Unicorn from dropping the translation in front of every exit address at the end
        of every run (see cetfast.c, "Unicorn's exit translations"); True if the filter is in.

        The filter goes into Unicorn 2.1.4's ``uc->uc_invalidate_tb`` (at
        :data:`UC_INVALIDATE_TB_OFFSET`); a probe — a cache removal of three bytes that must
        reach the filter unchanged — confirms the field before cetvm relies on it, and a failed
        probe puts the original back (the engine then keeps Unicorn's behaviour: slower exits,
        same results). The vCPU drops translations in ranges of two bytes or more only
        (:meth:`cetvm.cpu.vcpu.Vcpu.drop_translations`)."""
        handle, offset = self._uc._uch, UC_INVALIDATE_TB_OFFSET
        if self._lib.cetfast_filter_exit_invalidation(handle, offset) != 0:
            return False
        start, length = _U64(), _U64()
        self._uc.ctl_remove_cache(_FILTER_PROBE, _FILTER_PROBE + 3)
        self._lib.cetfast_filter_probe(ctypes.byref(start), ctypes.byref(length))
        if (start.value, length.value) != (_FILTER_PROBE, 3):
            self._lib.cetfast_unfilter_exit_invalidation(handle, offset)
            return False
        return True

    # ---------------------------------------------------------------- state the engine syncs
    def sync_mode(self, *, cpl: int, long_mode: bool, cr4_cet: bool, paging: PagingKind, cr3: int,
                  cs_base: int = 0) -> None:
        """Mode-defining state (call on every mode change: CPL, CS, CR0/CR3/CR4, EFER). ``cs_base``:
        the engine's CS.base (a descriptor's 32 bits), which the hook subtracts from a block's
        linear address when it sets RIP.

        A CR3 change also invalidates the shadow-stack translation cache (entries are tagged
        with CR3).
        """
        s = self.shared
        cr3 &= 0xFFFF_FFFF_FFFF_FFFF
        if s.cr3 != cr3 or s.paging != int(paging):
            self._lib.cetfast_flush_tlb(self._ptr)
        s.cpl, s.long_mode, s.cr4_cet = cpl, int(long_mode), int(cr4_cet)
        s.paging, s.cr3, s.cs_base = int(paging), cr3, cs_base & 0xFFFF_FFFF
        self._lib.cetfast_refresh(self._ptr)

    def set_enabled(self, enabled: bool) -> None:
        """Disable the hook entirely (e.g. while single-stepping an exit instruction)."""
        self.shared.enabled = int(enabled)
        self._lib.cetfast_refresh(self._ptr)

    def flush_translations(self) -> None:
        """Forget cached shadow-stack translations (INVLPG, page-table-affecting emulation...)."""
        self._lib.cetfast_flush_tlb(self._ptr)

    def set_irq_window_watch(self, env_address: int | None) -> None:
        """Stop in front of the first block that starts with the interrupt window open (the
        engine's CPUX86State at ``env_address``: RFLAGS.IF = 1, no STI / MOV SS shadow), or
        no more (None); cetfast.c "Interrupt window"."""
        self._lib.cetfast_set_irq_watch(self._ptr, env_address)

    def classify_plain_blocks(self, env_address: int) -> None:
        """Classify plain 64-bit blocks in the hook (cetfast.c "plain blocks") from now on; the
        engine's CPUX86State at ``env_address`` tells the code's mode. The Python classifier
        still gets every other block."""
        self._lib.cetfast_set_env(self._ptr, env_address)
        self._lib.cetfast_set_plain_classify(self._ptr, 1)

    @property
    def classify_stats(self) -> tuple[int, int]:
        """(blocks classified in the hook, blocks it left to Python as not plain)."""
        out = (_U64 * 2)()
        self._lib.cetfast_classify_stats(self._ptr, out)
        return out[0], out[1]

    def take_irq_window_stop(self) -> bool:
        """The watch stopped the engine in front of a block since the last call."""
        return bool(self._lib.cetfast_take_irq_window_stop(self._ptr))

    def add_ram(self, gpa: int, size: int, host_address: int) -> None:
        """Let the native code access guest RAM [gpa, gpa+size) directly at ``host_address``.

        Only for memory mapped with ``uc.mem_map_ptr`` (the engine's own buffer). Other RAM is
        reached through ``uc_mem_read``/``uc_mem_write`` (correct, slower).
        """
        if self._lib.cetfast_add_ram(self._ptr, gpa, size, host_address) != 0:
            raise NotSupportedError("native CET fast path: more than 32 directly accessed RAM regions")

    # ---------------------------------------------------------------- hand-over
    def take_handover(self) -> HandoverRequest | None:
        """The block start left to Python since the last call, if any (clears it)."""
        s = self.shared
        if not s.handover:
            return None
        request = HandoverRequest(Handover(s.handover), _term_info(s.handover_term), s.handover_addr)
        s.handover = 0
        self._lib.cetfast_refresh(self._ptr)
        return request

    def raise_callback_error(self) -> None:
        """Re-raise an exception that happened in the classifier during the last run."""
        err, self._callback_error = self._callback_error, None
        if err is not None:
            raise err

    def stop_at_block(self, blocks: int) -> None:
        """While the hook is disabled (a single step): stop the engine in front of the
        ``blocks``-th block that starts from now (0: no such stop)."""
        self._lib.cetfast_stop_at_block.argtypes = [_VP, _U32]
        self._lib.cetfast_stop_at_block(self._ptr, blocks)

    def note_callback_error(self) -> None:
        """A Python callback of this engine failed (the error is kept for after the run): the
        native run loop must not start the engine again."""
        self.shared.callback_errors += 1

    def _classify_trampoline(self, address: int, size: int) -> int:
        try:
            return 1 if self._classify(address, size) else 0
        except BaseException as err:  # never unwind through C
            self.note_callback_error()
            self._callback_error = err
            self._uc.emu_stop()
            return 0

    @property
    def stats(self) -> dict[str, int]:
        s = self.shared
        return {name: getattr(s, name) for name in
                ("misses", "handovers", "tlb_fills", "slow_mem")}


class NativeBlockTracker:
    """:class:`cetvm.cpu.blocks.BlockTracker`'s interface over the native block table."""

    def __init__(self, native: NativeCet) -> None:
        self._native = native
        self._lib = native._lib
        self._ptr = native._ptr
        self._shared = native.shared

    def _pending(self) -> tuple[TerminatorInfo | None, int]:
        term = TermStruct()
        block_start = self._lib.cetfast_get_pending(self._ptr, ctypes.byref(term))
        return _term_info(term), block_start

    def _set_pending(self, terminator: TerminatorInfo | None, block_start: int) -> None:
        self._lib.cetfast_set_pending(self._ptr, *_term_fields(terminator), block_start & 0xFFFF_FFFF_FFFF_FFFF)

    @property
    def prev(self) -> TerminatorInfo | None:
        return self._pending()[0]

    @prev.setter
    def prev(self, value: TerminatorInfo | None) -> None:
        self._set_pending(value, self._pending()[1])

    @property
    def prev_block_start(self) -> int:
        """Start address of the block whose terminator is :attr:`prev`."""
        return self._pending()[1]

    @prev_block_start.setter
    def prev_block_start(self, value: int) -> None:
        self._set_pending(self._pending()[0], value)

    def lookup(self, address: int, size: int) -> BlockInfo | None:
        out = BlockStruct()
        if not self._lib.cetfast_lookup(self._ptr, address, size, ctypes.byref(out)):
            return None
        first = bytes(out.first[:out.first_len & _FIRST_LEN_MASK])
        insn_addr = (out.ret - out.insn_len) & 0xFFFF_FFFF_FFFF_FFFF
        term = TerminatorInfo(Terminator(out.kind), insn_addr, out.insn_len, out.imm16)
        return BlockInfo(out.addr, out.size, term, first, out.icount, bool(out.first_len & _BLOCK_GLOBAL))

    def store(self, info: BlockInfo) -> None:
        kind, insn_addr, insn_len, imm16 = _term_fields(info.terminator)
        first = bytes(info.first_bytes[:4])
        status = self._lib.cetfast_store(self._ptr, info.address, info.size, info.icount, kind, insn_addr, insn_len,
                                         imm16, first, len(first), int(info.global_page))
        if status == -2:
            raise CetvmError(f"native CET fast path: block {info.address:#x} (size {info.size}) cannot be stored")
        if status != 0:
            raise CetvmError("native CET fast path: out of memory for the block table")

    def invalidate(self) -> None:
        self._lib.cetfast_invalidate_blocks(self._ptr)

    def invalidate_local(self) -> None:
        """MOV to CR3: forget the blocks not on global pages (see BlockTracker.invalidate_local)."""
        self._lib.cetfast_invalidate_local_blocks(self._ptr)

    def invalidate_range(self, start: int, end: int) -> None:
        """INVLPG: forget the blocks overlapping linear [start, end)."""
        self._lib.cetfast_invalidate_block_range(self._ptr, start & 0xFFFF_FFFF_FFFF_FFFF, end & 0xFFFF_FFFF_FFFF_FFFF)

    @property
    def last(self) -> tuple[int, int, int] | None:
        """(address, size, instruction count) of the block that ran last, if the engine may have
        stopped inside it (its instructions were retired when it started); else None."""
        addr, size, icount = _U64(), _U32(), _U32()
        if not self._lib.cetfast_last_block(self._ptr, ctypes.byref(addr), ctypes.byref(size), ctypes.byref(icount)):
            return None
        return addr.value, size.value, icount.value

    def close_last(self) -> None:
        """No block is under way any more (see :attr:`last`)."""
        self._lib.cetfast_close_last(self._ptr)

    def take_prev(self, terminator: TerminatorInfo | None) -> TerminatorInfo | None:
        prev, block_start = self._pending()
        self._set_pending(terminator, block_start)
        return prev

    def __len__(self) -> int:
        return int(self._lib.cetfast_block_count(self._ptr))


class NativeCetState:
    """The vCPU's CET registers with SSP, U_CET and S_CET kept in the native shared state.

    Same attributes as :class:`cetvm.cpu.state.CetState`; the native hook reads and updates
    ``ssp`` and the TRACKER/SUPPRESS bits in place, so there is one copy of each. Writing
    ``u_cet``/``s_cet`` calls ``refresh`` (the hook's short-path masks depend on them).
    """

    def __init__(self, shared: SharedState, refresh: Callable[[], None]) -> None:
        self._shared = shared
        self._refresh = refresh
        self.pl_ssp: list[int] = [0, 0, 0, 0]
        self.int_ssp_tab = 0

    @property
    def ssp(self) -> int:
        return self._shared.ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self._shared.ssp = value & 0xFFFF_FFFF_FFFF_FFFF

    @property
    def u_cet(self) -> int:
        return self._shared.u_cet

    @u_cet.setter
    def u_cet(self, value: int) -> None:
        self._shared.u_cet = value & 0xFFFF_FFFF_FFFF_FFFF
        self._refresh()

    @property
    def s_cet(self) -> int:
        return self._shared.s_cet

    @s_cet.setter
    def s_cet(self, value: int) -> None:
        self._shared.s_cet = value & 0xFFFF_FFFF_FFFF_FFFF
        self._refresh()

    def __repr__(self) -> str:
        return (f"NativeCetState(u_cet={self.u_cet:#x}, s_cet={self.s_cet:#x}, pl_ssp={[hex(v) for v in self.pl_ssp]}, "
                f"int_ssp_tab={self.int_ssp_tab:#x}, ssp={self.ssp:#x})")


#: Saved CPUX86State offsets cetfast.c's event hooks patch (checked in :class:`NativeEvents`).
_EVENT_MSRS = (0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0084)  # EFER, STAR, LSTAR, FMASK
_UC_HOOK_INSN = 1 << 1
_UC_HOOK_INTR = 1 << 0
#: void hook(uc_engine *, uint32_t intno, void *user_data): UC_HOOK_INTR
_INTR_HOOK = ctypes.CFUNCTYPE(None, _VP, ctypes.c_uint32, _VP)
_UC_X86_INS_SYSCALL = 699


class EventsState(ctypes.Structure):
    """Mirror of ``cet_events_t``'s public part (checked against the library's sizeof)."""

    _fields_ = [("pl_ssp", _U64 * 4), ("handover_rip", _U64), ("handover", _U32), ("enabled", _U32),
                ("mode_changes", _U64), ("syscalls", _U64), ("sysrets", _U64), ("irets", _U64), ("handovers", _U64),
                ("irq_pending", _U32), ("exception_bitmap", _U32), ("faults", _U64), ("pf_cr2", _U64),
                ("pf_delivered", _U64), ("nmi_blocked", _U32), ("_reserved", _U32),
                ("_slow_intr", _VP), ("_bounds_pool", _VP), ("_bounds_used", _U32), ("_bounds_count", _U32),
                ("_bounds", _VP),
                ("_f", _VP), ("_reg_read", _VP), ("_reg_write", _VP), ("_ctx_save", _VP), ("_ctx_restore", _VP),
                ("_ctx_free", _VP), ("_ctx", _VP), ("slow_calls", _U64), ("_exit_insns", _VP)]


#: Coalesced PIO zones, published port values and buffered writes ``cet_exit_insns_t`` holds.
EXIT_PIO_ZONES, EXIT_PIO_READS, EXIT_PIO_WRITES = 8, 8, 169


class ExitInsnState(ctypes.Structure):
    """Mirror of ``cet_exit_insns_t`` (checked against the library's sizeof)."""

    _fields_ = [("enabled", _U32), ("cpu_based", _U32), ("tpr_threshold", _U32), ("zone_count", _U32),
                ("read_count", _U32),
                ("zone_lo", ctypes.c_uint16 * EXIT_PIO_ZONES), ("zone_hi", _U32 * EXIT_PIO_ZONES),
                ("read_port", ctypes.c_uint16 * EXIT_PIO_READS), ("read_value", ctypes.c_uint8 * EXIT_PIO_READS),
                ("room", _U32), ("write_count", _U32),
                ("write_port", _U32 * EXIT_PIO_WRITES), ("write_data", _U32 * EXIT_PIO_WRITES),
                ("pio_exits", _U64), ("cr3_writes", _U64), ("runs", _U64), ("cr8_writes", _U64), ("env", _VP),
                ("fastpath_enabled", _U32), ("exit_charge", _U32), ("cpuid_exits", _U64), ("vmcall_exits", _U64),
                ("cpuid", _VP), ("vmcall", _VP),
                ("_cr3_write", _VP), ("_emu_start", _VP), ("_vmem_read", _VP)]


#: int cr3_write(uint64_t value): 0 when the CR3 load is done
_CR3_WRITE = ctypes.CFUNCTYPE(ctypes.c_int, _U64)
#: int cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]): 0 with EAX..EDX in out
_CPUID = ctypes.CFUNCTYPE(ctypes.c_int, _U32, _U32, ctypes.POINTER(_U32))
#: int vmcall(uint64_t nr, uint64_t *rax): 0 with the hypercall's result in *rax
_VMCALL = ctypes.CFUNCTYPE(ctypes.c_int, _U64, ctypes.POINTER(_U64))


class NativeExitInsns:
    """The exit-point instructions ``cetfast_run`` does without leaving C (see its section in
    cetfast.c): byte OUTs to coalesced PIO ports, byte INs from ports with a published value,
    MOV to CR3 through ``cr3_write`` (the vCPU's one CR3 load), MOV to CR8 into the engine's
    CPUX86State (:meth:`set_env`). The vCPU's KVM sets the ports; :meth:`take_writes` gives the
    OUTs done here, in order."""

    def __init__(self, lib, events_ptr: int, cr3_write: Callable[[int], int]) -> None:
        if lib.cetfast_exit_insns_size() != ctypes.sizeof(ExitInsnState):
            raise CetvmError(f"{LIBRARY_PATH.name} does not match this cetvm (exit instructions); "
                             "rebuild it: python -m cetvm.cpu.native.build --force")
        uclib, _ = _unicorn_api()
        self.state = ExitInsnState()
        self.state.room = EXIT_PIO_WRITES
        self._cr3_write = _CR3_WRITE(cr3_write)
        lib.cetfast_events_set_exit_insns.argtypes = [_VP, _VP, _VP, _VP, _VP]
        lib.cetfast_events_set_exit_insns(events_ptr, ctypes.addressof(self.state), _fnptr(uclib.uc_emu_start),
                                          _fnptr(uclib.uc_vmem_read), _fnptr(self._cr3_write))
        self._seen_pio_exits = 0
        self._fastpath: tuple[object, object] | None = None
        self._seen_fastpath_exits = 0
        self._seen_charged_exits = 0

    def set_exit_fastpath(self, *, cpuid: Callable[[int, int], tuple[int, int, int, int]],
                          hypercall: Callable[[int], int | None], exit_charge: int) -> None:
        """CPUID and VMCALL answered here (the hypervisor's exit fastpath, cetfast.c
        exit_fastpath): ``cpuid(leaf, subleaf)`` gives EAX..EDX, ``hypercall(nr)`` the new RAX or
        None for an exit (a hypercall for userspace) — the same answers as its exit handlers;
        each is an exit that costs ``exit_charge`` budget instructions of guest time. An
        exception in a callback leaves that instruction to the exit path, which raises it there."""
        if not 0 <= exit_charge <= 0xFFFF_FFFF:
            raise CetvmError(f"an exit's charge must be 0..2**32-1 budget instructions, not {exit_charge}")

        def answer_cpuid(leaf: int, subleaf: int, out) -> int:
            try:
                regs = cpuid(leaf, subleaf)
            except Exception:  # noqa: BLE001 - never unwind through C; the exit path raises it
                return 1
            for i, value in enumerate(regs):
                out[i] = value & 0xFFFF_FFFF
            return 0

        def answer_vmcall(nr: int, rax) -> int:
            try:
                result = hypercall(nr)
            except Exception:  # noqa: BLE001 - as above
                return 1
            if result is None:
                return 1
            rax[0] = result & 0xFFFF_FFFF_FFFF_FFFF
            return 0

        self._fastpath = (_CPUID(answer_cpuid), _VMCALL(answer_vmcall))
        self.state.cpuid, self.state.vmcall = (_fnptr(f) for f in self._fastpath)
        self.state.exit_charge = exit_charge

    def set_fastpath_enabled(self, enabled: bool) -> None:
        """Whether CPUID and VMCALL may be answered here now (KVM: not while L2 runs; L1
        intercepts them)."""
        self.state.fastpath_enabled = int(enabled and self._fastpath is not None)

    def take_fastpath_exits(self) -> int:
        """CPUIDs and VMCALLs answered here since the last call (exits KVM handled, each costs
        guest time)."""
        total = self._fastpath_total
        new, self._seen_fastpath_exits = total - self._seen_fastpath_exits, total
        return new

    @property
    def _fastpath_total(self) -> int:
        return self.state.cpuid_exits + self.state.vmcall_exits

    def take_exit_charges(self) -> int:
        """Budget instructions the exits answered here since the last call were charged (their
        guest time: the vCPU takes them back from its retired count)."""
        total = self._fastpath_total
        new, self._seen_charged_exits = total - self._seen_charged_exits, total
        return new * self.state.exit_charge

    def set_env(self, address: int) -> None:
        """The engine's CPUX86State, where a MOV to CR8 done here writes CR8
        (:attr:`cetvm.cpu.registers.Registers.cr8`); 0: MOV to CR8 stays Python's."""
        self.state.env = address or None

    def set_port_io(self, enabled: bool) -> None:
        """Whether port I/O may be done here at all (KVM: not while L2 runs; L1 may intercept it)."""
        self.state.enabled = int(enabled)

    def set_tpr_threshold(self, threshold: int) -> None:
        """The VMCS's TPR threshold: a MOV to CR8 below it is Python's (its trap-like exit)."""
        self.state.tpr_threshold = threshold & 0xFFFF_FFFF

    def set_cpu_based_controls(self, controls: int) -> None:
        """The VMCS's primary processor-based controls (CR3-load exiting: MOV to CR3 exits;
        interrupt/NMI-window exiting: no instruction is done here, each is a VM entry)."""
        self.state.cpu_based = controls & 0xFFFF_FFFF

    def set_coalesced_ports(self, zones: list[tuple[int, int]]) -> None:
        """The coalesced PIO zones as [first, end) port ranges (the first EXIT_PIO_ZONES)."""
        s = self.state
        zones = zones[:EXIT_PIO_ZONES]
        for i, (lo, hi) in enumerate(zones):
            s.zone_lo[i], s.zone_hi[i] = lo & 0xFFFF, min(hi, 0x10000)
        s.zone_count = len(zones)

    def set_read_values(self, values: dict[int, int]) -> None:
        """Byte reads of each port give its value (the first EXIT_PIO_READS ports); other
        ports exit."""
        s = self.state
        items = list(values.items())[:EXIT_PIO_READS]
        for i, (port, value) in enumerate(items):
            s.read_port[i], s.read_value[i] = port & 0xFFFF, value & 0xFF
        s.read_count = len(items)

    def take_pio_exits(self) -> int:
        """Port I/O instructions done here since the last call."""
        total = self.state.pio_exits
        new, self._seen_pio_exits = total - self._seen_pio_exits, total
        return new

    def set_room(self, room: int) -> None:
        """Writes the KVM ring can still take (this many OUTs at most are done here)."""
        self.state.room = max(0, min(room, EXIT_PIO_WRITES))

    def take_writes(self) -> list[tuple[int, int]]:
        """(port, byte) of the OUTs done here since the last call, in order (empties the buffer)."""
        s = self.state
        n = s.write_count
        if not n:
            return []
        writes = list(zip(s.write_port[:n], s.write_data[:n]))
        s.write_count = 0
        return writes

    @property
    def stats(self) -> dict[str, int]:
        s = self.state
        return {"pio_exits": s.pio_exits, "cr3_writes": s.cr3_writes, "cr8_writes": s.cr8_writes,
                "cpuid_exits": s.cpuid_exits, "vmcall_exits": s.vmcall_exits, "engine_restarts": s.runs}


class NativeEvents:
    """SYSCALL, SYSRETQ and IRETQ delivered inside the engine by ``cetfast.c`` (see its "Native events"
    section), next to the native block hook ``native`` on the same engine.

    The vCPU enables it only with block-granular budgets. It owns IA32_PL0..3_SSP
    (:attr:`pl_ssp`, read and written by the hooks). After every engine run the vCPU calls
    :meth:`mode_moved` (re-read CPL and mode if True) and :meth:`take_handover` (an instruction
    the hooks left to Python: its RIP)."""

    def __init__(self, uc, native: NativeCet) -> None:
        lib = native._lib
        uclib, hook_type = _unicorn_api()
        self._lib, self._uclib, self._uc, self._hook_type = lib, uclib, uc, hook_type
        lib.cetfast_events_size.restype = _U64
        if lib.cetfast_events_size() != ctypes.sizeof(EventsState):
            raise CetvmError(f"{LIBRARY_PATH.name} does not match this cetvm (events state); "
                             "rebuild it: python -m cetvm.cpu.native.build --force")
        lib.cetfast_events_new.restype = _VP
        lib.cetfast_events_new.argtypes = [_VP, _VP, _VP, _VP, _VP, _VP, _VP, _VP]
        lib.cetfast_events_free.argtypes = [_VP]
        lib.cetfast_events_read_msrs.argtypes = [_VP, _VP, ctypes.POINTER(_U64 * 4)]
        ptr = lib.cetfast_events_new(native._ptr, uc._uch, _fnptr(uclib.uc_reg_read), _fnptr(uclib.uc_reg_write),
                                     _fnptr(uclib.uc_context_alloc), _fnptr(uclib.uc_context_save),
                                     _fnptr(uclib.uc_context_restore), _fnptr(uclib.uc_context_free))
        if not ptr:
            raise CetvmError("native events: cannot allocate the engine context")
        self._ptr = ptr
        weakref.finalize(uc, lib.cetfast_events_free, ptr)
        self.state = EventsState.from_address(ptr)
        self._check_layout()
        self._seen_mode_changes = 0
        self._return_hooks: dict[int, object] = {}
        self._add_hook(_UC_HOOK_INSN, lib.cetfast_syscall_hook, 1, 0, _UC_X86_INS_SYSCALL)

    @property
    def pl_ssp(self):
        """IA32_PL0_SSP..IA32_PL3_SSP (a ctypes array: index, slice, assign)."""
        return self.state.pl_ssp

    def _check_layout(self) -> None:
        """The hooks read EFER/STAR/LSTAR/FMASK at fixed offsets of the saved context: check them."""
        uc = self._uc
        saved = [uc.msr_read(index) for index in _EVENT_MSRS[1:]]
        probe = [0x0023_0010_0008_0000, 0xFFFF_8000_1234_5670, 0x4_7700]
        for index, value in zip(_EVENT_MSRS[1:], probe):
            uc.msr_write(index, value)
        out = (_U64 * 4)()
        ok = self._lib.cetfast_events_read_msrs(self._ptr, uc._uch, ctypes.byref(out)) == 0
        ok = ok and list(out) == [uc.msr_read(_EVENT_MSRS[0]), *probe]
        for index, value in zip(_EVENT_MSRS[1:], saved):
            uc.msr_write(index, value)
        if not ok:
            raise CetvmError("the installed unicorn's CPU context layout is not the 2.1.4 one the native events "
                             "patch; reinstall unicorn==2.1.4")

    def _add_hook(self, kind: int, callback, begin: int, end: int, *extra: int):
        return add_native_hook(self._uc, kind, callback, self._ptr, begin, end, *extra)

    def set_enabled(self, enabled: bool) -> None:
        self.state.enabled = int(enabled)

    @property
    def enabled(self) -> bool:
        return bool(self.state.enabled)

    def hook_return(self, linear: int, *, iret: bool) -> bool:
        """Deliver the SYSRETQ (``iret`` False) or IRETQ at ``linear`` natively; True if its hook
        is new (the block holding it must be translated again to call it)."""
        if linear in self._return_hooks:
            return False
        callback = self._lib.cetfast_iret_hook if iret else self._lib.cetfast_sysret_hook
        self._return_hooks[linear] = self._add_hook(_UC_HOOK_CODE, callback, linear, linear)
        return True

    def unhook_return(self, linear: int) -> None:
        """The code at ``linear`` is no SYSRETQ/IRETQ any more (rewritten): drop its hook."""
        hook = self._return_hooks.pop(linear, None)
        if hook is not None:
            self._uclib.uc_hook_del(self._uc._uch, hook)

    def before_run(self, interrupt_pending: bool, exception_bitmap: int, nmi_blocked: bool = False) -> None:
        """Before each engine run: whether an external interrupt waits (then a SYSRETQ/IRETQ that
        sets RFLAGS.IF is left to Python, whose run loop takes the interrupt right after it, as
        after every emulated instruction), the VMCS exception bitmap (exceptions that exit
        are left to Python) and whether blocking by NMI is set (then every IRETQ is left to
        Python, whose IRETQ ends it: :func:`cetvm.cpu.emulate.iret`)."""
        s = self.state
        s.irq_pending = int(interrupt_pending)
        s.exception_bitmap = exception_bitmap & 0xFFFF_FFFF
        s.nmi_blocked = int(nmi_blocked)

    def install_page_faults(self, slow_handler: Callable[[int, int, int], None]) -> None:
        """Take over the engine's UC_HOOK_INTR: #PF delivered natively where it can be, every
        other interrupt and #PF to ``slow_handler(uc_handle, intno, user_data)`` (the vCPU's
        Python handler, which the caller unregistered)."""
        self._slow_intr = _INTR_HOOK(slow_handler)
        self._lib.cetfast_events_set_slow_intr.argtypes = [_VP, _VP]
        self._lib.cetfast_events_set_slow_intr(self._ptr, _fnptr(self._slow_intr))
        self._lib.cetfast_events_store_bounds.argtypes = [_VP, _U64, _U32, ctypes.c_char_p, _U32]
        self._lib.cetfast_events_store_bounds.restype = ctypes.c_int
        self._add_hook(_UC_HOOK_INTR, self._lib.cetfast_intr_hook, 1, 0)

    def store_bounds(self, address: int, size: int, lengths: bytes) -> None:
        """The instruction lengths of a block (the native #PF takes back the instructions from
        the faulting one on; without them it leaves the #PF to Python)."""
        if self._lib.cetfast_events_store_bounds(self._ptr, address, size, lengths, len(lengths)) != 0:
            raise CetvmError("native events: out of memory for instruction boundaries")

    def take_delivered_cr2(self) -> int | None:
        """CR2 of the last #PF delivered natively during the run that ended, if any (clears it)."""
        s = self.state
        if not s.pf_delivered:
            return None
        s.pf_delivered = 0
        return int(s.pf_cr2)

    def mode_moved(self) -> bool:
        """True once after the hooks changed the CPL (the vCPU re-reads its cached mode)."""
        changes = self.state.mode_changes
        if changes == self._seen_mode_changes:
            return False
        self._seen_mode_changes = changes
        return True

    def take_handover(self) -> int | None:
        """RIP of the instruction the hooks left to Python since the last call, if any (clears it)."""
        s = self.state
        if not s.handover:
            return None
        s.handover = 0
        return int(s.handover_rip)

    def install_exit_insns(self, cr3_write: Callable[[int], int]) -> NativeExitInsns:
        """Let :meth:`run` do the plain exit-point instructions in C (:class:`NativeExitInsns`)."""
        self._lib.cetfast_exit_insns_size.restype = _U64
        self.exit_insns = NativeExitInsns(self._lib, self._ptr, cr3_write)
        self._lib.cetfast_run.argtypes = [_VP, _VP, _U64]
        self._lib.cetfast_run.restype = ctypes.c_int
        self._run = self._lib.cetfast_run
        return self.exit_insns

    def run(self, rip: int) -> int:
        """One engine run from ``rip`` (as ``Uc.emu_start(rip, 0)``) that goes on past the
        exit-point instructions done in C; Unicorn's status of the last run."""
        return self._run(self._ptr, self._uc._uch, rip)

    @property
    def stats(self) -> dict[str, int]:
        s = self.state
        return {"syscalls": s.syscalls, "sysrets": s.sysrets, "irets": s.irets, "page_faults": s.faults,
                "event_handovers": s.handovers}
