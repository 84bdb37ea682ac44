"""The vCPU: Unicorn executes guest code, cetvm adds CET, event delivery and VMX-like exits.

Execution model (DESIGN.md "The CPU engine", engine-notes.md):

- *Traced mode* (the default, ``trace=True``): one Python
  UC_HOOK_BLOCK hook. On a block's first execution it is decoded (iced-x86); instructions cetvm
  must emulate (:mod:`cetvm.cpu.decode`) become Unicorn exits, the block is dropped from the TB
  cache and restarted, so Unicorn stops in front of them and :mod:`cetvm.cpu.emulate` runs
  them. At every block start the CET state machine (:mod:`cetvm.cpu.cet.transfer`) applies the
  previous block's terminator.
- *Untraced mode* (``trace=False``): no block hook, raw Unicorn speed. Only HLT, SYSCALL
  (emulated after a UC_HOOK_INSN stop), #UD-emulated instructions (VMCALL, XSAVES...) and
  exceptions stop the engine; CPUID, IN/OUT, RDMSR/WRMSR and MOV CR run inside Unicorn without
  exits (so no MSR intercepts, CET MSRs or CR4.CET checks) and CET is not enforced. For
  benchmarks and guests that need none of these.

Exceptions are caught (UC_HOOK_INTR / UC_HOOK_INSN_INVALID), emulation stops, and
:mod:`cetvm.cpu.events` delivers them through the guest IDT.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable

from iced_x86 import InstructionInfoFactory, MemorySizeExt, Mnemonic, OpAccess, Register
from unicorn import (
    UC_ARCH_X86, UC_ERR_FETCH_UNMAPPED, UC_ERR_INSN_INVALID, UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MEM_FETCH, UC_MODE_64,
    UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_CPU, UC_TLB_VIRTUAL, Uc, UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError, InputError, NotSupportedError
from cetvm.arch import Cr0, Cr4, Msr, PfErr, Vector
from cetvm.arch.msr import CetCtl, Efer
from cetvm.cpu import decode
from cetvm.cpu.blocks import BlockInfo, BlockTracker
from cetvm.cpu.fastpath import ShadowStackWindow, make_block_hook
from cetvm.cpu.cet.transfer import BlockAction, Terminator, apply_terminator, classify_terminator, on_block_start
from cetvm.cpu.native import NativeCet, PagingKind, select_cet_path
from cetvm.cpu.native.loader import InsnCounter, native_count_hook
from cetvm.cpu.exits import Direction, ExceptionExit, ExitReason, MmioExit, VmExit
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access, PagingMode, translate
from cetvm.cpu.state import CetState, DescriptorTable, FpuState, GPR_NAMES, Regs, Segment, Sregs
from cetvm.cpu.uc_context import OLD_EXCEPTION_OFFSET, ContextBlob, HFlags, check_unicorn, segment_hflags

if TYPE_CHECKING:
    from cetvm.cpuid import CpuidModel

PAGE = 0x1000
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_GPR_IDS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
_REG_IDS = {**_GPR_IDS, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_RFLAGS}
#: Blob offset of env->xcr0 in Unicorn 2.1.4 (measured; XCR0 has no reg id in the binding).
XCR0_OFFSET = 4904
#: Blob offset of env->efer in Unicorn 2.1.4 (measured: the bytes a WRMSR to EFER changes).
EFER_OFFSET = 592
#: Vectors that are faults: RIP reported by Unicorn is the faulting instruction (engine-notes).
_TRAP_VECTORS = frozenset({Vector.BP, Vector.OF})
_TRACKER = int(CetCtl.TRACKER)
_SS_READ, _SS_READ_USER = int(Access.SHADOW_STACK), int(Access.SHADOW_STACK | Access.USER)
_SS_WRITE, _SS_WRITE_USER = _SS_READ | int(Access.WRITE), _SS_READ_USER | int(Access.WRITE)
_CET_ENABLES = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)
#: Little-endian unsigned codecs for the hot-path RAM accesses (shadow stack, page walks).
_LE_UINT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
#: void hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
_BLOCK_HOOK_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


_U128 = (1 << 128) - 1
_FP_IDS = tuple(getattr(X, f"UC_X86_REG_FP{i}") for i in range(8))
_YMM_IDS = tuple(getattr(X, f"UC_X86_REG_YMM{i}") for i in range(16))
#: FpuState field → (bits per value, number of values or None for a scalar).
_FPU_FIELD_WIDTHS = {"fcw": (16, None), "fsw": (16, None), "ftw": (8, None), "fop": (11, None), "fip": (64, None),
                     "fdp": (64, None), "mxcsr": (32, None), "st": (80, 8), "xmm": (128, 16), "ymm_hi": (128, 16)}


def _check_fpu_widths(fpu: FpuState) -> None:
    """InputError naming the first FpuState field whose value (or list length) does not fit."""
    for name, (bits, count) in _FPU_FIELD_WIDTHS.items():
        value = getattr(fpu, name)
        values = [value] if count is None else list(value)
        if count is not None and len(values) != count:
            raise InputError(f"FPU state: {name} must have {count} entries, got {len(values)}")
        for i, v in enumerate(values):
            if not isinstance(v, int) or not 0 <= v < 1 << bits:
                where = name if count is None else f"{name}[{i}]"
                raise InputError(f"FPU state: {where} must be an unsigned {bits}-bit integer, got {v!r}")


def _memory_size_bytes(instr) -> int:
    return MemorySizeExt.size(instr.memory_size)


@dataclass
class PendingEvent:
    """An exception or interrupt waiting for delivery through the IDT."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None
    software: bool = False  # INT n / INT3 / INTO: gate DPL check, RIP already past the instruction
    injected: bool = False  # by the hypervisor: not subject to the exception bitmap (VM entry)


@dataclass(frozen=True)
class MemoryRegion:
    gpa: int
    size: int
    kind: str  # "ram" or "mmio"


class Vcpu:
    """One virtual CPU with its guest-physical memory (a VM of one CPU, as the hardware sees it).

    ``model``: the :class:`cetvm.cpuid.CpuidModel` it emulates (which CET features exist, the
    XSAVE layout). ``trace``: see the module docstring (False only for benchmarks and guests
    that need no exits but HLT). ``cet_path`` (traced mode): which block hook enforces CET —
    "native" (the C fast path, :mod:`cetvm.cpu.native`), "python" (the readable reference
    hook below) or "auto" (native when built, else python with a one-line notice on stderr);
    None means ``$CETVM_CET_PATH`` or "auto". Both paths give the same architectural results.
    ``python_fast_path`` (the "python" path only): put the flat common-case hook of
    :mod:`cetvm.cpu.fastpath` in front of the reference hook (default; None means True unless
    ``$CETVM_PYTHON_FAST_PATH`` is "0"); False runs the reference alone (same results, slower).
    Hypervisor controls: ``msr_intercepts`` (set of MSR indices whose RDMSR/WRMSR exit),
    ``exception_bitmap`` (vectors that exit before delivery).
    """

    def __init__(self, model: "CpuidModel", *, trace: bool = True, cet_path: str | None = None,
                 python_fast_path: bool | None = None) -> None:
        self.model = model
        self.has_shstk = bool(model.has("shstk"))
        self.has_ibt = bool(model.has("ibt"))
        self.traced = trace
        self.msr_intercepts: set[int] = set()
        self.exception_bitmap = 0
        self.cet = CetState()
        self.xss = 0
        self._counter = InsnCounter()
        self._counter.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        self._budgeting = False
        self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        check_unicorn(self._uc)
        self._regions: list[MemoryRegion] = []
        self._ram: list[tuple[int, int, memoryview, mmap.mmap]] = []
        self._blocks = BlockTracker()
        self._exits: set[int] = set()
        self._pending: PendingEvent | None = None
        self._completion: Callable[[], None] | None = None
        self._info_factory = InstructionInfoFactory()
        self._stepping = False
        self._mode = PagingMode(0, 0, 0, 0)
        self._tlb: dict[tuple[int, int], int] = {}
        self._cpl = 0
        self._long_mode = True
        self._cr4_cet = False
        self._cet_active = False
        self._ss_window = ShadowStackWindow()
        if python_fast_path is None:
            python_fast_path = os.environ.get("CETVM_PYTHON_FAST_PATH", "1") != "0"
        self.python_fast_path = python_fast_path
        uc = self._uc
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid_instruction)
        self._hook_error: BaseException | None = None
        self._reg_buf = ctypes.c_uint64()
        self._mem_buf = ctypes.create_string_buffer(8)
        self._block_hook_cb = None
        self._tlb_virtual = False
        self._syscall_at: int | None = None
        if not self.traced:
            uc.hook_add(UC_HOOK_INSN, self._on_untraced_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        self._native = None
        self.cet_path = "off"
        if self.traced:
            self.cet_path = select_cet_path(cet_path or os.environ.get("CETVM_CET_PATH") or "auto")
            if self.cet_path == "native":
                self._install_native_path()
            else:
                self._install_block_hook()
                uc.hook_add(UC_HOOK_TLB_FILL, self._on_tlb_fill)
        self.refresh_mode()

    # ------------------------------------------------------------------ memory
    def map_ram(self, gpa: int, size: int) -> None:
        """Back guest-physical [gpa, gpa+size) with RAM (page-aligned, zero-filled).

        The host memory is ours (an anonymous mmap handed to Unicorn with mem_map_ptr), so the
        hot paths read and write it directly instead of through uc_mem_read/write.
        """
        self._check_region(gpa, size)
        backing = mmap.mmap(-1, size)
        address = ctypes.addressof(ctypes.c_char.from_buffer(backing))
        self._uc.mem_map_ptr(gpa, size, UC_PROT_ALL, address)
        if self._native is not None:
            self._native.add_ram(gpa, size, address)
        self._regions.append(MemoryRegion(gpa, size, "ram"))
        self._ram.append((gpa, gpa + size, memoryview(backing), backing))

    def map_mmio(self, gpa: int, size: int) -> None:
        """Declare [gpa, gpa+size) MMIO: guest accesses exit with ExitReason.MMIO.

        Accesses to guest-physical addresses backed by nothing exit the same way (as in KVM).
        """
        self._check_region(gpa, size)
        self._regions.append(MemoryRegion(gpa, size, "mmio"))

    def _check_region(self, gpa: int, size: int) -> None:
        if gpa % PAGE or size % PAGE or size <= 0:
            raise InputError(f"memory region {gpa:#x}+{size:#x} is not page-aligned")
        for region in self._regions:
            if gpa < region.gpa + region.size and region.gpa < gpa + size:
                raise InputError(f"memory region {gpa:#x}+{size:#x} overlaps {region.kind} {region.gpa:#x}+{region.size:#x}")

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def read_phys(self, gpa: int, size: int) -> bytes:
        return bytes(self._uc.mem_read(gpa, size))

    def write_phys(self, gpa: int, data: bytes) -> None:
        self._uc.mem_write(gpa, bytes(data))

    def _read_phys_u64(self, gpa: int) -> int:
        return self._phys_read_int(gpa, 8)

    def translate(self, linear: int, access: Access = Access.READ) -> int:
        """Guest-virtual → guest-physical with the current paging mode (raises GuestFault).

        Successful translations are cached per (page, access kind) like a TLB: architecturally
        a TLB may keep them until MOV to CR0/CR3/CR4, INVLPG/INVPCID or a mode change, which
        all flush this cache (``flush_tlb``).
        """
        key = (linear >> 12, access)
        page = self._tlb.get(key)
        if page is None:
            page = translate(self._read_phys_u64, self._mode, linear, Access(access)) & ~0xFFF
            self._tlb[key] = page
        return page | (linear & 0xFFF)

    def flush_tlb(self) -> None:
        self._tlb.clear()
        self._ss_window.forget()
        if self._native is not None:
            self._native.flush_translations()

    def read_virt(self, linear: int, size: int, access: Access = Access.READ) -> bytes:
        """Read guest-virtual memory page by page (raises GuestFault on a translation fault)."""
        out = bytearray()
        while size > 0:
            chunk = min(size, PAGE - (linear & (PAGE - 1)))
            out += self._uc.mem_read(self.translate(linear, access), chunk)
            linear, size = (linear + chunk) & _U64, size - chunk
        return bytes(out)

    def write_virt(self, linear: int, data: bytes, access: Access = Access.WRITE) -> None:
        """Write guest-virtual memory (all pages are translated before anything is written)."""
        pieces = []
        offset = 0
        while offset < len(data):
            chunk = min(len(data) - offset, PAGE - ((linear + offset) & (PAGE - 1)))
            pieces.append((self.translate((linear + offset) & _U64, access | Access.WRITE), data[offset:offset + chunk]))
            offset += chunk
        for gpa, piece in pieces:
            self._uc.mem_write(gpa, bytes(piece))

    def _user_access(self) -> Access:
        return Access.USER if self._cpl == 3 else Access.READ

    # ------------------------------------------------------------------ CetMachine protocol
    @property
    def cpl(self) -> int:
        return self._cpl

    @property
    def long_mode(self) -> bool:
        return self._long_mode

    @property
    def cr4_cet(self) -> bool:
        return self._cr4_cet

    @property
    def ssp(self) -> int:
        return self.cet.ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self.cet.ssp = value & _U64

    def cet_msr(self, msr: Msr) -> int:
        """The MSR value as a plain int (the CET code tests it against plain-int bit constants,
        see :mod:`cetvm.cpu.cet.policy`; S_CET and U_CET are the hot ones)."""
        if msr == 0x6A2:  # IA32_S_CET
            return self.cet.s_cet
        if msr == 0x6A0:  # IA32_U_CET
            return self.cet.u_cet
        return self._cet_msr_value(int(msr))

    def set_cet_msr(self, msr: Msr, value: int) -> None:
        self._set_cet_msr_value(int(msr), value)

    def ss_read(self, linear: int, size: int, *, user: bool) -> int:
        """Shadow-stack read of 4 or 8 bytes (the hot path of every RET: one cached translation,
        one RAM view lookup, one struct unpack)."""
        view, off = self._ram_view(self.translate(linear, _SS_READ_USER if user else _SS_READ), size)
        return _LE_UINT[size].unpack_from(view, off)[0]

    def ss_write(self, linear: int, value: int, size: int, *, user: bool) -> None:
        """Shadow-stack write of 4 or 8 bytes (the hot path of every CALL, as :meth:`ss_read`)."""
        view, off = self._ram_view(self.translate(linear, _SS_WRITE_USER if user else _SS_WRITE), size)
        _LE_UINT[size].pack_into(view, off, value & ((1 << (8 * size)) - 1))

    def _ram_view(self, gpa: int, size: int) -> tuple[memoryview, int]:
        for start, end, view, _backing in self._ram:
            if start <= gpa and gpa + size <= end:
                return view, gpa - start
        raise CetvmError(f"guest-physical access of {size} bytes at {gpa:#x} is not in RAM")

    def _phys_read_int(self, gpa: int, size: int) -> int:
        """Hot-path physical read of our own RAM backing (no call into Unicorn)."""
        view, off = self._ram_view(gpa, size)
        codec = _LE_UINT.get(size)
        if codec is None:
            return int.from_bytes(view[off:off + size], "little")
        return codec.unpack_from(view, off)[0]

    def _phys_write_int(self, gpa: int, value: int, size: int) -> None:
        view, off = self._ram_view(gpa, size)
        value &= (1 << (8 * size)) - 1
        codec = _LE_UINT.get(size)
        if codec is None:
            view[off:off + size] = value.to_bytes(size, "little")
        else:
            codec.pack_into(view, off, value)

    def ss_cmpxchg(self, linear: int, expected: int, new: int, *, user: bool) -> tuple[bool, int]:
        access = Access.SHADOW_STACK | Access.WRITE | (Access.USER if user else Access.READ)
        gpa = self.translate(linear, access)
        old = int.from_bytes(self._uc.mem_read(gpa, 8), "little")
        if old == expected & _U64:
            self._uc.mem_write(gpa, (new & _U64).to_bytes(8, "little"))
            return True, old
        return False, old

    def mem_read(self, linear: int, size: int) -> int:
        return int.from_bytes(self.read_virt(linear, size, self._user_access()), "little")

    # ------------------------------------------------------------------ CET MSRs
    def _cet_msr_value(self, index: int) -> int:
        cet = self.cet
        if index == Msr.IA32_U_CET:
            return cet.u_cet
        if index == Msr.IA32_S_CET:
            return cet.s_cet
        if Msr.IA32_PL0_SSP <= index <= Msr.IA32_PL3_SSP:
            return cet.pl_ssp[index - Msr.IA32_PL0_SSP]
        if index == Msr.IA32_INT_SSP_TAB:
            return cet.int_ssp_tab
        raise CetvmError(f"internal error: MSR {index:#x} is not a CET MSR")

    def _set_cet_msr_value(self, index: int, value: int) -> None:
        value &= _U64
        cet = self.cet
        if index == Msr.IA32_U_CET:
            cet.u_cet = value
        elif index == Msr.IA32_S_CET:
            cet.s_cet = value
        elif Msr.IA32_PL0_SSP <= index <= Msr.IA32_PL3_SSP:
            cet.pl_ssp[index - Msr.IA32_PL0_SSP] = value
        elif index == Msr.IA32_INT_SSP_TAB:
            cet.int_ssp_tab = value
        else:
            raise CetvmError(f"internal error: MSR {index:#x} is not a CET MSR")
        self._update_cet_active()

    def _update_cet_active(self) -> None:
        self._cet_active = self._cr4_cet and bool((self.cet.u_cet | self.cet.s_cet) & _CET_ENABLES)

    # ------------------------------------------------------------------ registers
    def reg(self, name: str) -> int:
        """A general-purpose register, ``rip`` or ``rflags`` by name."""
        return self._uc.reg_read(_REG_IDS[name])

    def set_reg(self, name: str, value: int) -> None:
        self._uc.reg_write(_REG_IDS[name], value & _U64)

    @property
    def rip(self) -> int:
        return self._uc.reg_read(X.UC_X86_REG_RIP)

    @rip.setter
    def rip(self, value: int) -> None:
        self._uc.reg_write(X.UC_X86_REG_RIP, value & _U64)

    def get_regs(self) -> Regs:
        return Regs(**{f.name: self._uc.reg_read(_REG_IDS[f.name]) for f in fields(Regs)})

    def set_regs(self, regs: Regs) -> None:
        for f in fields(Regs):
            self._uc.reg_write(_REG_IDS[f.name], getattr(regs, f.name) & _U64)

    def get_sregs(self) -> Sregs:
        blob = ContextBlob.save(self._uc)
        uc = self._uc
        tr = uc.reg_read(X.UC_X86_REG_TR)
        ldt = uc.reg_read(X.UC_X86_REG_LDTR)
        gdt = uc.reg_read(X.UC_X86_REG_GDTR)
        idt = uc.reg_read(X.UC_X86_REG_IDTR)
        return Sregs(
            cs=blob.segment("cs"), ds=blob.segment("ds"), es=blob.segment("es"),
            fs=blob.segment("fs"), gs=blob.segment("gs"), ss=blob.segment("ss"),
            tr=Segment(tr[0], tr[1], tr[2], tr[3]), ldt=Segment(ldt[0], ldt[1], ldt[2], ldt[3]),
            gdt=DescriptorTable(gdt[1], gdt[2]), idt=DescriptorTable(idt[1], idt[2]),
            cr0=uc.reg_read(X.UC_X86_REG_CR0), cr2=uc.reg_read(X.UC_X86_REG_CR2),
            cr3=uc.reg_read(X.UC_X86_REG_CR3), cr4=uc.reg_read(X.UC_X86_REG_CR4),
            efer=uc.msr_read(Msr.IA32_EFER))

    def get_fpu(self) -> FpuState:
        """x87, SSE and AVX registers (KVM_GET_FPU plus the YMM upper halves).

        Unicorn keeps the x87 registers by physical number (FP0-7) with TOP in FSW[13:11] and a
        full 2-bit tag word; ST(i) is FP((TOP + i) mod 8), and bit i of the abridged tag word is
        set unless physical register i is tagged empty (11b) [SDM Vol. 1 §8.1.7; FXSAVE].
        """
        read = self._raw_reg_read
        fsw = read(X.UC_X86_REG_FPSW, 2)
        top = (fsw >> 11) & 7
        tags = read(X.UC_X86_REG_FPTAG, 2)
        physical = [read(reg, 10) for reg in _FP_IDS]
        ymm = [read(reg, 32) for reg in _YMM_IDS]
        return FpuState(
            fcw=read(X.UC_X86_REG_FPCW, 2), fsw=fsw,
            ftw=sum(1 << i for i in range(8) if (tags >> 2 * i) & 3 != 3),
            fop=read(X.UC_X86_REG_FOP, 2), fip=read(X.UC_X86_REG_FIP, 8), fdp=read(X.UC_X86_REG_FDP, 8),
            mxcsr=read(X.UC_X86_REG_MXCSR, 4), st=[physical[(top + i) % 8] for i in range(8)],
            xmm=[y & _U128 for y in ymm], ymm_hi=[y >> 128 for y in ymm])

    def set_fpu(self, fpu: FpuState) -> None:
        """Load x87, SSE and AVX registers (KVM_SET_FPU plus the YMM upper halves; no
        architectural checks beyond field widths: InputError if a value does not fit).

        The abridged tag word is expanded as FXRSTOR does: a clear bit → empty (11b), a set bit
        → valid (the engine derives zero/special from the value itself).
        """
        _check_fpu_widths(fpu)
        write = self._raw_reg_write
        write(X.UC_X86_REG_FPCW, fpu.fcw, 2)
        write(X.UC_X86_REG_FPSW, fpu.fsw, 2)  # also sets TOP
        write(X.UC_X86_REG_FPTAG, sum(0 if fpu.ftw >> i & 1 else 3 << 2 * i for i in range(8)), 2)
        top = (fpu.fsw >> 11) & 7
        for i, value in enumerate(fpu.st):
            write(_FP_IDS[(top + i) % 8], value, 10)
        write(X.UC_X86_REG_FOP, fpu.fop, 2)
        write(X.UC_X86_REG_FIP, fpu.fip, 8)
        write(X.UC_X86_REG_FDP, fpu.fdp, 8)
        write(X.UC_X86_REG_MXCSR, fpu.mxcsr, 4)
        for reg, low, high in zip(_YMM_IDS, fpu.xmm, fpu.ymm_hi):
            write(reg, low | high << 128, 32)

    def _raw_reg_read(self, reg_id: int, size: int) -> int:
        """A register as a little-endian integer of ``size`` bytes, through Unicorn's C API (the
        binding's reg_read costs ~3 µs per register; this ~10x less)."""
        buf = ctypes.create_string_buffer(size)
        status = uclib.uc_reg_read(self._uc._uch, reg_id, buf)
        if status != 0:
            raise CetvmError(f"cannot read register {reg_id} (unicorn error {status})")
        return int.from_bytes(buf.raw, "little")

    def _raw_reg_write(self, reg_id: int, value: int, size: int) -> None:
        buf = ctypes.create_string_buffer(value.to_bytes(size, "little"), size)
        status = uclib.uc_reg_write(self._uc._uch, reg_id, buf)
        if status != 0:
            raise CetvmError(f"cannot write register {reg_id} (unicorn error {status})")

    def set_sregs(self, sregs: Sregs) -> None:
        """Load control registers, EFER, descriptor tables and segment caches (no checks).

        EFER.LMA is derived as hardware does: LME and CR0.PG (also in the engine, see
        :meth:`_force_efer_lma`). Starting in real mode (the RESET/INIT state), in 32-bit
        protected mode (CS.L=0, D=1, paging off) and in 64-bit mode (LME/LMA, CR0.PG, CS.L=1) work.
        """
        uc = self._uc
        efer = sregs.efer & ~Efer.LMA
        if efer & Efer.LME and sregs.cr0 & Cr0.PG:
            efer |= Efer.LMA
        uc.reg_write(X.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, sregs.cr3)
        uc.msr_write(Msr.IA32_EFER, efer)
        uc.reg_write(X.UC_X86_REG_CR0, sregs.cr0)
        self._force_efer_lma(bool(efer & Efer.LMA))
        uc.reg_write(X.UC_X86_REG_CR2, sregs.cr2)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        uc.reg_write(X.UC_X86_REG_TR, (sregs.tr.selector, sregs.tr.base, sregs.tr.limit, sregs.tr.attributes))
        uc.reg_write(X.UC_X86_REG_LDTR, (sregs.ldt.selector, sregs.ldt.base, sregs.ldt.limit, sregs.ldt.attributes))
        self.load_segments(cs=sregs.cs, ss=sregs.ss, ds=sregs.ds, es=sregs.es, fs=sregs.fs, gs=sregs.gs)

    def _force_efer_lma(self, lma: bool) -> None:
        """Make the engine's EFER.LMA (and QEMU's HF_LMA, with HF_CS64 cleared when leaving) ``lma``.

        Why: QEMU changes LMA only when a CR0 write toggles PG with LME set, and Unicorn's
        UC_MODE_64 starts with EFER = LME|LMA but CR0.PG = 0 — so a RESET to real mode
        (CR0 = 0x60000010, EFER = 0) kept LMA and EFER read back 0x400; a 64-bit load over a
        state that already had CR0.PG = 1 never set it. Hardware: LMA = LME AND CR0.PG
        [SDM Vol. 3 §10.8.5]. Patched in the saved context (env->efer at :data:`EFER_OFFSET`,
        checked against RDMSR first).
        """
        blob = ContextBlob.save(self._uc)
        efer = blob.u64(EFER_OFFSET)
        if efer != self._uc.msr_read(Msr.IA32_EFER):
            raise CetvmError("internal error: Unicorn's context does not hold EFER at the measured offset (not 2.1.4?)")
        if bool(efer & Efer.LMA) == lma:
            return
        lma_bit = int(Efer.LMA)
        ctypes.c_uint64.from_address(blob.address + EFER_OFFSET).value = efer | lma_bit if lma else efer & ~lma_bit
        blob.hflags = blob.hflags | HFlags.LMA if lma else blob.hflags & ~(HFlags.LMA | HFlags.CS64)
        blob.restore(self._uc)

    def load_segments(self, **segments: Segment) -> None:
        """Load segment registers with their descriptor caches; recompute CPL/mode (blob patch)."""
        blob = ContextBlob.save(self._uc)
        for name, seg in segments.items():
            blob.set_segment(name, seg)
        cr0_pe = bool(self._uc.reg_read(X.UC_X86_REG_CR0) & Cr0.PE)
        blob.hflags = segment_hflags(blob.hflags, blob.segment("cs"), blob.segment("ss"),
                                     blob.segment("ds"), blob.segment("es"), cr0_pe)
        blob.restore(self._uc)
        for name in ("fs", "gs"):
            if name in segments and segments[name].base:
                self._uc.reg_write(X.UC_X86_REG_FS_BASE if name == "fs" else X.UC_X86_REG_GS_BASE, segments[name].base)
        self.refresh_mode()

    def segment(self, name: str) -> Segment:
        return ContextBlob.save(self._uc).segment(name)

    @property
    def cr0(self) -> int:
        return self._uc.reg_read(X.UC_X86_REG_CR0)

    @property
    def cr4(self) -> int:
        return self._uc.reg_read(X.UC_X86_REG_CR4)

    def write_cr(self, n: int, value: int) -> None:
        """Write CR0/CR2/CR3/CR4/CR8 without checks (the emulation checks first)."""
        self._uc.reg_write({0: X.UC_X86_REG_CR0, 2: X.UC_X86_REG_CR2, 3: X.UC_X86_REG_CR3,
                            4: X.UC_X86_REG_CR4, 8: X.UC_X86_REG_CR8}[n], value & _U64)
        if n in (0, 3, 4):
            self._blocks.invalidate()
        self.refresh_mode()

    @property
    def xcr0(self) -> int:
        """XCR0 (the hypervisor sets it after an XSETBV exit; no checks here)."""
        return ContextBlob.save(self._uc).u64(XCR0_OFFSET)

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        blob = ContextBlob.save(self._uc)
        ctypes.c_uint64.from_address(blob.address + XCR0_OFFSET).value = value & _U64
        blob.restore(self._uc)

    def msr(self, index: int) -> int:
        """Host-initiated MSR read (CET MSRs and IA32_XSS from the vCPU, the rest from Unicorn)."""
        if index in _CET_MSR_INDICES:
            return self._cet_msr_value(index)
        if index == Msr.IA32_XSS:
            return self.xss
        return self._uc.msr_read(index)

    def set_msr(self, index: int, value: int) -> None:
        """Host-initiated MSR write, no architectural checks (the hypervisor's policy decides)."""
        if index in _CET_MSR_INDICES:
            self._set_cet_msr_value(index, value)
        elif index == Msr.IA32_XSS:
            self.xss = value & _U64
        else:
            self._uc.msr_write(index, value & _U64)
            if index == Msr.IA32_EFER:
                self.refresh_mode()

    def _clear_stale_old_exception(self) -> None:
        """After an engine stop with no exception: QEMU's old_exception must be -1.

        Measured on 2.1.4: a stop requested from a hook (RIP write + emu_stop, e.g. the block
        classification restart) and a single-stepped IRETQ can leave old_exception at 8 (#DF);
        the guest's next fault then becomes a #DF or a silent triple fault (EXCP_HLT).
        """
        blob = ContextBlob.save(self._uc)
        if blob.u32(OLD_EXCEPTION_OFFSET) != 0xFFFF_FFFF:
            blob.reset_old_exception()
            blob.restore(self._uc)

    def reset_old_exception(self) -> None:
        """Forget the last exception so the next fault is not promoted to #DF (engine-notes)."""
        blob = ContextBlob.save(self._uc)
        blob.reset_old_exception()
        blob.restore(self._uc)

    def refresh_mode(self) -> None:
        """Re-read the mode-defining state the hot paths cache (CPL, 64-bit mode, paging, CR4.CET)."""
        uc = self._uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        efer = uc.msr_read(Msr.IA32_EFER)
        self._mode = PagingMode(cr0, uc.reg_read(X.UC_X86_REG_CR3), cr4, efer)
        self._tlb.clear()
        self._ss_window.forget()
        hflags = ContextBlob.save(uc).hflags
        self._cpl = hflags & HFlags.CPL_MASK if cr0 & Cr0.PE else 0
        self._long_mode = bool(hflags & HFlags.CS64)
        self._cr4_cet = bool(cr4 & Cr4.CET)
        self._update_cet_active()
        self._update_tlb_mode(not cr0 & Cr0.PG)
        if self._native is not None:
            self._sync_native_mode()

    def _update_tlb_mode(self, paging_off: bool) -> None:
        """Paging off (traced mode only, where MOV to CR0 is emulated and seen): Unicorn's
        virtual-TLB mode with :meth:`_on_tlb_fill`, so data pages are not executable to the
        engine and stores stay on its fast path (engine-notes "Speed"). Paging on: the CPU's
        own walk of the guest page tables (the guest's NX does the same job)."""
        virtual = self.traced and paging_off
        if virtual != self._tlb_virtual:
            self._uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL if virtual else UC_TLB_CPU)
            self._tlb_virtual = virtual

    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry, _data: object) -> bool:
        """Identity translation; a page filled for a fetch is R+X, for data R+W (never W+X)."""
        entry.paddr = vaddr & ~0xFFF
        entry.perms = (UC_PROT_READ | UC_PROT_EXEC) if access == UC_MEM_FETCH else (UC_PROT_READ | UC_PROT_WRITE)
        return True

    # ------------------------------------------------------------------ hypervisor interface
    def inject_exception(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        """Deliver an exception at the next run (cancels completion of the last exit)."""
        self._completion = None
        self._pending = PendingEvent(vector, error_code, cr2, injected=True)

    def run(self, budget: int | None = None) -> VmExit:
        """Run until an exit. ``budget``: at most this many instructions (then ExitReason.BUDGET)."""
        self.complete_pending_exit()
        self._budget_left = budget
        hook = self._add_count_hook() if budget is not None else None
        try:
            return self._run_loop()
        finally:
            if hook is not None:
                self._del_count_hook(hook)
            self._budget_left = None

    # ------------------------------------------------------------------ exact instruction budget
    @property
    def instructions_retired(self) -> int:
        """Instructions retired by this vCPU (counted exactly while a run has a budget)."""
        return self._counter.retired

    @instructions_retired.setter
    def instructions_retired(self, value: int) -> None:
        self._counter.retired = value

    @property
    def _budget_left(self) -> int | None:
        return self._counter.budget_left if self._budgeting else None

    @_budget_left.setter
    def _budget_left(self, value: int | None) -> None:
        self._budgeting = value is not None
        if value is not None:
            self._counter.budget_left = value

    @property
    def _budget_hit(self) -> bool:
        return bool(self._counter.hit)

    @_budget_hit.setter
    def _budget_hit(self, value: bool) -> None:
        self._counter.hit = int(value)

    def _add_count_hook(self) -> tuple[str, object]:
        """A UC_HOOK_CODE counter for the budget: the native one (``cetfast_count_insn``, ~60
        MIPS) when the library is built, else :meth:`_count_instruction` (~2 MIPS). A vCPU on the
        Python CET path uses no native code at all, so both counters stay tested."""
        address = None if self.cet_path == "python" else native_count_hook()
        if address is None:
            return "python", self._uc.hook_add(UC_HOOK_CODE, self._count_instruction)
        handle = uc_hook_h()
        status = uclib.uc_hook_add(self._uc._uch, ctypes.byref(handle), UC_HOOK_CODE, ctypes.c_void_p(address),
                                   ctypes.c_void_p(ctypes.addressof(self._counter)),
                                   ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise CetvmError(f"cannot install the instruction counter (unicorn error {status})")
        return "native", handle

    def _del_count_hook(self, hook: tuple[str, object]) -> None:
        kind, handle = hook
        if kind == "python":
            self._uc.hook_del(handle)
        else:
            uclib.uc_hook_del(self._uc._uch, handle)

    def _run_loop(self) -> VmExit:
        from cetvm.cpu import emulate, events

        while True:
            if self._pending is not None:
                event, self._pending = self._pending, None
                if not (event.software or event.injected) and event.vector < 32 and self.exception_bitmap >> event.vector & 1:
                    return VmExit(ExitReason.EXCEPTION, self.rip, exception=ExceptionExit(event.vector, event.error_code, event.cr2))
                exit_ = events.deliver(self, event)
                if exit_ is not None:
                    return exit_
                continue
            if self._budget_left is not None and self._budget_left <= 0:
                return VmExit(ExitReason.BUDGET, self.rip)
            rip = self.rip
            if rip in self._exits:
                exit_ = self._emulate_at(rip, emulate)
                if exit_ is not None:
                    return exit_
                continue
            exit_ = self._run_engine(rip)
            if exit_ is not None:
                return exit_

    def _run_engine(self, rip: int) -> VmExit | None:
        self._budget_hit = False
        try:
            self._uc.emu_start(rip, 0)
            if self._native is not None:
                self._native.raise_callback_error()
                self._apply_native_handover()
            if self._hook_error is not None:
                error, self._hook_error = self._hook_error, None
                raise error
        except UcError as err:
            if err.errno == UC_ERR_INSN_INVALID:
                return self._on_invalid_stop()
            if err.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED):
                return self._on_unmapped_stop(err.errno)
            raise CetvmError(f"engine error at RIP {self.rip:#x}: {err}") from None
        if self._pending is None:
            self._clear_stale_old_exception()
        if not self.traced:
            self.refresh_mode()  # native IRETQ/SYSRET/far transfers may have changed CPL or mode
        if self._syscall_at is not None:
            from cetvm.cpu import emulate

            self.rip, self._syscall_at = self._syscall_at, None
            return self._emulate_at(self.rip, emulate)
        if self._pending is not None or self._budget_hit or self.rip in self._exits:
            return None
        if not self.traced:
            # Untraced mode: Unicorn stops by itself only after HLT (RIP past it).
            return VmExit(ExitReason.HLT, (self.rip - 1) & _U64, 1)
        return None

    def _on_untraced_syscall(self, uc: Uc, _data: object) -> None:
        """Untraced mode: Unicorn runs SYSCALL as a NOP; stop (it ends the TB) and emulate it."""
        self._syscall_at = uc.reg_read(X.UC_X86_REG_RIP)
        self._unretire()
        uc.emu_stop()

    def _count_instruction(self, uc: Uc, address: int, size: int, _data: object) -> None:
        """Python twin of ``cetfast_count_insn`` (used when the native library is not built)."""
        counter = self._counter
        if counter.budget_left <= 0:
            counter.hit = 1
            uc.emu_stop()
            return
        counter.budget_left -= 1
        counter.retired += 1

    def _retire(self) -> None:
        """An instruction emulated in Python retired (counts against the budget)."""
        self.instructions_retired += 1
        if self._budget_left is not None:
            self._budget_left -= 1

    def _unretire(self) -> None:
        """The last counted instruction faulted instead of retiring."""
        if self._budget_left is not None:
            self._budget_left += 1
            self.instructions_retired -= 1

    # ------------------------------------------------------------------ emulation plumbing
    def fetch_instruction(self, rip: int):
        """Decode the instruction at ``rip`` (fetch access; raises GuestFault)."""
        code = self._read_code(rip, decode.MAX_INSTRUCTION_LENGTH)
        return decode.decode_one(code, rip, 64 if self._long_mode else 32)

    def _read_code(self, linear: int, size: int) -> bytes:
        """Instruction bytes; stops early at an untranslatable page (fewer bytes, no fault)."""
        out = bytearray()
        access = Access.FETCH | self._user_access()
        while size > 0:
            chunk = min(size, PAGE - (linear & (PAGE - 1)))
            try:
                out += self._uc.mem_read(self.translate(linear, access), chunk)
            except (GuestFault, UcError):
                if not out:
                    raise
                break
            linear, size = (linear + chunk) & _U64, size - chunk
        return bytes(out)

    def _emulate_at(self, rip: int, emulate) -> VmExit | None:
        self._apply_pending_terminator(rip)
        if self._pending is not None:
            return None
        try:
            instr = self.fetch_instruction(rip)
            result = emulate.emulate(self, instr)
        except GuestFault as fault:
            self._raise_event(fault)
            return None
        self._blocks.prev = None
        return result

    def step_native(self, rip: int, next_ip: int | None = None) -> None:
        """Let Unicorn execute the one instruction at ``rip`` although it is an exit address.

        Used for instructions whose CET effects cetvm adds around Unicorn's own execution (far
        CALL/RET/JMP, INVLPG, MMIO completion); not for privilege changes (IRETQ, SYSRET are
        emulated: see :func:`cetvm.cpu.emulate.iret`).

        Exactly one instruction must run: the block hook is off while stepping, so anything
        Unicorn ran past it would escape the CET checks. Unicorn's ``count`` is enforced by a code
        hook that translation blocks already in the cache do not contain, so it cannot be relied
        on alone. With ``next_ip`` (an instruction that does not branch) a temporary exit there
        stops Unicorn before the next instruction; for a branch (far transfers: the target is not
        known here) the translation cache is flushed around a counted step so that every block
        runs with the count hook. Far transfers are rare; INVLPG and MMIO take the cheap path.
        """
        uc = self._uc
        was_exit = rip in self._exits
        temporary_exit = next_ip is not None and next_ip not in self._exits
        if was_exit:
            self._exits.discard(rip)
        if temporary_exit:
            self._exits.add(next_ip)
        if was_exit or temporary_exit:
            uc.ctl_set_exits(sorted(self._exits))
            uc.ctl_remove_cache(rip, rip + 1)
            if temporary_exit:
                uc.ctl_remove_cache(next_ip, next_ip + 1)
        if next_ip is None:
            uc.ctl_flush_tb()
        self._stepping = True
        if self._native is not None:
            self._native.set_enabled(False)
        cr2 = uc.reg_read(X.UC_X86_REG_CR2)
        try:
            uc.emu_start(rip, 0, count=1)
        except UcError as err:
            if err.errno == UC_ERR_INSN_INVALID:
                self._raise_event(GuestFault(Vector.UD))
            else:
                raise CetvmError(f"engine error at RIP {rip:#x}: {err}") from None
        finally:
            self._stepping = False
            if self._native is not None:
                self._native.set_enabled(True)
            if temporary_exit:
                self._exits.discard(next_ip)
            if was_exit:
                self._exits.add(rip)
            if was_exit or temporary_exit:
                uc.ctl_set_exits(sorted(self._exits))
                uc.ctl_remove_cache(rip, rip + 1)
                if temporary_exit:
                    uc.ctl_remove_cache(next_ip, next_ip + 1)
            if next_ip is None:
                uc.ctl_flush_tb()  # drop the blocks translated with the count hook
        self._blocks.prev = None
        if self._pending is None:
            # Dropping the stepped TB translates ``rip`` in the *new* mode; after a privilege
            # change that is a phantom #PF that sets CR2 and old_exception: undo both.
            uc.reg_write(X.UC_X86_REG_CR2, cr2)
            self._clear_stale_old_exception()

    def add_completion(self, completion: Callable[[], None]) -> None:
        """Run ``completion`` at the start of the next ``run`` (finishes an exiting instruction)."""
        self._completion = completion

    @property
    def exit_pending_completion(self) -> bool:
        """True while the instruction of the last exit still has to be finished (IN/MMIO-read
        data, RIP past HLT/VMCALL/CPUID/...): by :meth:`complete_pending_exit` or the next run."""
        return self._completion is not None

    def complete_pending_exit(self) -> None:
        """Finish the instruction of the last exit now, without running guest code and without
        delivering pending events (KVM's complete_userspace_io(), which runs before anything
        else changes the vCPU). The hypervisor must have stored its results first (IN data in
        the exit's ``io.data``, MMIO read data, RAX of a VMCALL...). Nothing pending: no-op.
        A fault raised by the completion (e.g. an MMIO write re-executed into a #PF) is
        delivered at the next run."""
        completion, self._completion = self._completion, None
        if completion is not None:
            completion()

    def cancel_pending_exit(self) -> None:
        """Forget the completion of the last exit: the exiting instruction is not finished and
        RIP stays at it (e.g. the vCPU is reset, or its registers are replaced wholesale, so
        re-executing the instruction is what should happen). Nothing pending: no-op."""
        self._completion = None

    def _raise_event(self, fault: GuestFault) -> None:
        """Queue a fault for delivery (RIP must already be at the faulting instruction)."""
        self._blocks.prev = None
        self._pending = PendingEvent(fault.vector, fault.error_code, fault.cr2)

    # ------------------------------------------------------------------ block hook (traced mode)
    def _install_block_hook(self) -> None:
        """Register the block hook straight through Unicorn's C API (ctypes): about twice as fast
        as the binding's wrapper, and the same shape a native hook will have. The hook is the
        common-case path of :mod:`cetvm.cpu.fastpath` in front of :meth:`_on_block` (the
        reference), or :meth:`_on_block_raw` alone when ``python_fast_path`` is False."""
        hook = make_block_hook(self, self._on_block) if self.python_fast_path else self._on_block_raw
        self._block_hook_cb = _BLOCK_HOOK_CFUNC(hook)
        handle = uc_hook_h()
        status = uclib.uc_hook_add(self._uc._uch, ctypes.byref(handle), UC_HOOK_BLOCK,
                                   ctypes.cast(self._block_hook_cb, ctypes.c_void_p), ctypes.c_void_p(0),
                                   ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise CetvmError(f"cannot install the block hook (unicorn error {status})")

    def _install_native_path(self) -> None:
        """The native fast path (:mod:`cetvm.cpu.native`): the C block hook owns SSP, U_CET,
        S_CET (``self.cet``) and the block table / pending terminator (``self._blocks``); it
        calls :meth:`_classify_block` once per new block and hands rare cases back to
        :meth:`_apply_native_handover`. Paging-off guests get its native TLB-fill hook."""
        self._native = NativeCet(self._uc, lambda address, size: self._classify_block(address, size) is not None)
        self._blocks = self._native.blocks
        self.cet = self._native.cet_state
        self._native.install()
        self._native.install_tlb_fill(set_mode=False)

    def _sync_native_mode(self) -> None:
        mode = self._mode
        paging = PagingKind.FOUR_LEVEL if mode.long_paging else PagingKind.OTHER if mode.paging else PagingKind.OFF
        self._native.sync_mode(cpl=self._cpl, long_mode=self._long_mode, cr4_cet=self._cr4_cet, paging=paging,
                               cr3=mode.cr3)
        self._native.flush_translations()

    def _apply_native_handover(self) -> None:
        """A block start the native hook left to us: run the reference state machine for it."""
        request = self._native.take_handover()
        if request is None:
            return
        try:
            first = self._read_code(request.block_addr, 4)
        except (GuestFault, UcError):
            first = b""
        decision = on_block_start(self, request.terminator, request.block_addr, self.reg("rsp"), first)
        if decision.action == BlockAction.FAULT:
            self.rip = decision.rip
            if decision.rsp is not None:
                self.set_reg("rsp", decision.rsp)
            self._raise_event(decision.fault)

    def _on_block_raw(self, _uch: int, address: int, size: int, _user: int) -> None:
        try:
            self._on_block(address, size)
        except BaseException as exc:  # ctypes would swallow it: re-raised after emu_start
            self._hook_error = exc
            self._uc.emu_stop()

    def _fast_rsp(self) -> int:
        uclib.uc_reg_read(self._uc._uch, X.UC_X86_REG_RSP, ctypes.byref(self._reg_buf))
        return self._reg_buf.value

    def _on_block(self, address: int, size: int) -> None:
        """At each block start: classify on a miss, then run the CET state machine (the
        reference hook; :mod:`cetvm.cpu.fastpath` handles the common cases in front of it and
        calls this, with nothing committed, for everything else).

        Shortcut (engine decision, no CET semantics): with no pending terminator and the
        current CPL's IBT tracker idle, :func:`on_block_start` has nothing to do and is skipped.
        """
        if self._stepping:
            return
        blocks = self._blocks
        info = blocks.cache.get(address)
        if info is None or info.size != size:
            info = self._classify_block(address, size)
            if info is None:
                return
        prev = blocks.prev
        blocks.prev = info.terminator
        blocks.prev_block_start = address
        if not self._cet_active:
            return
        if prev is None and not (self.cet.u_cet if self._cpl == 3 else self.cet.s_cet) & _TRACKER:
            return
        # RSP is read only on a fault (BlockDecision.rsp_adjust): one register read less per block.
        decision = on_block_start(self, prev, address, None, info.first_bytes)
        if decision.action == BlockAction.FAULT:
            uc = self._uc
            if decision.rsp_adjust:
                uc.reg_write(X.UC_X86_REG_RSP, (self._fast_rsp() + decision.rsp_adjust) & _U64)
            uc.reg_write(X.UC_X86_REG_RIP, decision.rip)
            self._raise_event(decision.fault)
            uc.emu_stop()

    def _classify_block(self, address: int, size: int) -> BlockInfo | None:
        """Decode a new block; make emulated instructions exits (then restart: returns None)."""
        try:
            code = self._read_code(address, size)
        except (GuestFault, UcError):
            code = b""
        instrs = decode.decode_block(code, address, 64 if self._long_mode else 32)
        new_exits = [i.ip for i in instrs if decode.needs_emulation(i) and i.ip not in self._exits]
        if new_exits:
            self._exits.update(new_exits)
            self._uc.ctl_set_exits(sorted(self._exits))
            self._uc.ctl_remove_cache(address, address + max(size, 1))
            self._uc.reg_write(X.UC_X86_REG_RIP, address)
            self._uc.emu_stop()
            return None
        terminator = classify_terminator(instrs[-1]) if instrs else None
        if terminator is not None and terminator.kind == Terminator.FALLTHROUGH:
            terminator = None  # nothing to apply at the next block start
        info = BlockInfo(address, size, terminator, code[:4])
        self._blocks.store(info)
        return info

    def _apply_pending_terminator(self, rip: int) -> None:
        """Apply the previous block's terminator when the next "block" is an emulated instruction."""
        prev = self._blocks.take_prev(None)
        if prev is None or not self._cet_active:
            return
        try:
            first = self._read_code(rip, 4)
        except (GuestFault, UcError):
            first = b""
        decision = on_block_start(self, prev, rip, self.reg("rsp"), first)
        if decision.action == BlockAction.FAULT:
            self.rip = decision.rip
            if decision.rsp is not None:
                self.set_reg("rsp", decision.rsp)
            self._raise_event(decision.fault)

    # ------------------------------------------------------------------ exception hooks
    def _on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        if not self.traced:
            self.refresh_mode()  # native privilege changes are not seen otherwise
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        software = intno >= 32 or intno in _TRAP_VECTORS
        if not software:
            self._unretire()
        prev = self._blocks.take_prev(None)
        if prev is not None and self._blocks.prev_block_start <= rip <= prev.insn_addr:
            prev = None  # the fault is inside the block: its terminator never ran
        if prev is not None and self._cet_active and not software:
            # The previous block's terminator ran but its target faulted before the block hook:
            # apply the terminator alone (the IBT check happens when the guest comes back).
            decision = apply_terminator(self, prev, rip, uc.reg_read(X.UC_X86_REG_RSP))
            if decision.action == BlockAction.FAULT:
                uc.reg_write(X.UC_X86_REG_RIP, decision.rip)
                if decision.rsp is not None:
                    uc.reg_write(X.UC_X86_REG_RSP, decision.rsp)
                self._raise_event(decision.fault)
                uc.emu_stop()
                return
        if intno == Vector.PF:
            cr2 = uc.reg_read(X.UC_X86_REG_CR2)
            self._pending = PendingEvent(Vector.PF, int(self._derive_pf_error(rip, cr2)), cr2)
        elif software:
            self._pending = PendingEvent(intno, None, None, software=True)
        else:
            error = 0 if intno in (Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.AC) else None
            self._pending = PendingEvent(intno, error)
        uc.emu_stop()

    def _derive_pf_error(self, rip: int, cr2: int) -> PfErr:
        """The #PF error code Unicorn does not expose: re-walk the page tables for the access.

        Decision: a fetch if CR2 lies within the 15 bytes at RIP and a fetch walk fails; else
        the instruction's data accesses (iced-x86): a walk as a read if it reads memory, then
        as a write if it writes memory — the first walk that faults gives the error code (so a
        store gets W, a load-then-store that fails on the load does not). If our walk sees no
        violation (e.g. SMAP, reserved bits), P plus W/U as the instruction suggests.
        """
        user = self._user_access()
        if 0 <= cr2 - rip < decode.MAX_INSTRUCTION_LENGTH:
            try:
                self.translate(cr2, Access.FETCH | user)
            except GuestFault as fault:
                return PfErr(fault.error_code or 0)
        reads, writes = self._memory_access_kinds(rip)
        walks = ([Access.READ] if reads or not writes else []) + ([Access.WRITE] if writes else [])
        for access in walks:
            try:
                translate(self._read_phys_u64, self._mode, cr2, access | user)
            except GuestFault as fault:
                return PfErr(fault.error_code or 0)
            except CetvmError:
                break
        return PfErr.P | (PfErr.W if writes else 0) | (PfErr.U if user else 0)

    def _memory_access_kinds(self, rip: int) -> tuple[bool, bool]:
        try:
            instr = self.fetch_instruction(rip)
        except (GuestFault, UcError):
            return True, False
        reads = writes = False
        for used in self._info_factory.info(instr).used_memory():
            if used.access in (OpAccess.READ, OpAccess.COND_READ, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE):
                reads = True
            if used.access in (OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE):
                writes = True
        return reads, writes

    def _on_invalid_instruction(self, uc: Uc, _data: object) -> bool:
        self._unretire()
        self._blocks.prev = None
        return False  # stop with UC_ERR_INSN_INVALID; _on_invalid_stop emulates or raises #UD

    def _on_invalid_stop(self) -> VmExit | None:
        from cetvm.cpu import emulate

        rip = self.rip
        try:
            instr = self.fetch_instruction(rip)
            if instr.mnemonic == Mnemonic.INVALID or not emulate.can_emulate(instr):
                raise GuestFault(Vector.UD)
            return emulate.emulate(self, instr)
        except GuestFault as fault:
            self._raise_event(fault)
            return None

    def _on_unmapped_stop(self, errno: int) -> VmExit | None:
        """An access to guest-physical memory without RAM: an MMIO exit (as KVM does).

        No UC_HOOK_MEM_*_UNMAPPED hook is installed (any memory hook takes every guest access
        off Unicorn's fast path: measured 140 vs 350 MIPS); Unicorn stops with RIP at the
        instruction and we decode it for the address, size and (for a store) the data.
        """
        rip = self.rip
        if errno == UC_ERR_FETCH_UNMAPPED:
            return VmExit(ExitReason.SHUTDOWN, rip, detail="instruction fetch from guest-physical memory with no RAM")
        self._unretire()
        self._blocks.prev = None
        try:
            mmio = self._decode_mmio_access(rip, write=errno == UC_ERR_WRITE_UNMAPPED)
        except GuestFault as fault:
            self._raise_event(fault)
            return None
        self.add_completion(lambda: self._complete_mmio(rip, mmio))
        return VmExit(ExitReason.MMIO, rip, mmio=mmio)

    def _decode_mmio_access(self, rip: int, write: bool) -> MmioExit:
        from cetvm.cpu import emulate

        instr = self.fetch_instruction(rip)
        kinds = (OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE) if write else \
            (OpAccess.READ, OpAccess.COND_READ, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE)
        for used in self._info_factory.info(instr).used_memory():
            if used.access not in kinds or used.base == Register.RSP and instr.is_stack_instruction:
                continue
            linear = emulate.effective_address(self, instr)
            size = _memory_size_bytes(instr)
            gpa = self.translate(linear, Access.WRITE if write else Access.READ)
            data = emulate.store_value(self, instr, size) if write else 0
            return MmioExit(gpa, size, Direction.OUT if write else Direction.IN, data)
        raise NotSupportedError(f"MMIO access by {instr} at {rip:#x} is not supported")

    def _complete_mmio(self, rip: int, mmio: MmioExit) -> None:
        """Re-execute the MMIO instruction with a scratch page holding the hypervisor's data."""
        page = mmio.address & ~(PAGE - 1)
        self._uc.mem_map(page, PAGE, UC_PROT_ALL)
        try:
            if mmio.direction == Direction.IN:
                self._uc.mem_write(mmio.address, (mmio.data & ((1 << (8 * mmio.size)) - 1)).to_bytes(mmio.size, "little"))
            self.step_native(rip, self.fetch_instruction(rip).next_ip)
        finally:
            self._uc.mem_unmap(page, PAGE)
        self._retire()

    # ------------------------------------------------------------------ misc
    @property
    def unicorn(self) -> Uc:
        """The underlying engine (for the native-hook work and diagnostics only)."""
        return self._uc

    @property
    def block_count(self) -> int:
        return len(self._blocks)


_CET_MSR_INDICES = frozenset(int(m) for m in (Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP,
                                              Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP, Msr.IA32_INT_SSP_TAB))

