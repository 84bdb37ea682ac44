"""The vCPU: Unicorn executes guest code, cetvm adds CET, event delivery and VMX-like exits.

Execution model:

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
:mod:`cetvm.cpu.events` delivers them through the guest IDT. On the native path (block-granular
budgets) the common SYSCALL, SYSRETQ, IRETQ and #PF are delivered inside the engine by the C
library (:class:`cetvm.cpu.native.NativeEvents`), which leaves every other case to the same
Python code; the vCPU re-reads its cached mode after a run in which they changed the CPL.

This module is the composition, VM entry/exit and the run loop. Parts (objects with their own
interface): :mod:`cetvm.cpu.memory` (``GuestMemory``: regions, physical/virtual access,
translation cache), :mod:`cetvm.cpu.registers` (``Registers``: GPR/segment/CR/XCR0/FPU access,
CET MSR values), :mod:`cetvm.cpu.budget` (``InstructionBudget``: the exact instruction budget),
:mod:`cetvm.cpu.completion` (``ExitCompletion``: the last exit and its unfinished instruction),
:mod:`cetvm.cpu.vmcs` (``Vmcs``: the current VMCS). Still mixins of this class (one class in
several files, sharing its attributes):

- :mod:`cetvm.cpu.vcpu_cet`: the CetMachine protocol (CPL, SSP, shadow-stack access);
- :mod:`cetvm.cpu.block_hook`: the block hook on the native / Python fast / reference CET paths;
- :mod:`cetvm.cpu.exit_emulation`: emulation at exit addresses, ``step_in_engine``, completions;
- :mod:`cetvm.cpu.engine_stops`: interrupt/#UD/MMIO/SYSCALL stops of the engine;
- :mod:`cetvm.cpu.interrupts`: external interrupts (pending vector, IF, STI/MOV SS shadow, HLT
  wake-up), checked only at run entry and exits.

The vCPU keeps the state every part reads per block or per instruction as its own plain
attributes, so the hot paths never follow an attribute chain. Public and read-only to everyone
but the vCPU: ``cpl``, ``long_mode`` (64-bit mode), ``cr4_cet``, ``cet_active`` (CR4.CET and an
enable bit in U_CET or S_CET), ``stepping`` (one instruction runs in the engine, hooks off),
``cet`` (SSP, U_CET, S_CET...); private: ``_blocks``, ``_exits``, ``_pending``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import TYPE_CHECKING, Iterator

from iced_x86 import InstructionInfoFactory
from unicorn import (
    UC_ARCH_X86, UC_ERR_FETCH_UNMAPPED, UC_ERR_INSN_INVALID, UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_64, UC_TLB_CPU, UC_TLB_VIRTUAL,
    Uc, UcError,
)
from unicorn import x86_const as X

from cetvm import CetvmError
from cetvm.arch import Cr0, Cr4, Msr
from cetvm.arch.msr import CET_MSR_SET
from cetvm.cpu import decode
from cetvm.cpu.block_hook import BlockHookMixin
from cetvm.cpu.blocks import BlockTable, BlockTracker
from cetvm.cpu.budget import InstructionBudget, select_granularity
from cetvm.cpu.cet.transfer import BlockDecision
from cetvm.cpu.vcpu_cet import CetMachineMixin
from cetvm.cpu.engine_features import engine_cpu_model
from cetvm.cpu.engine_stops import EngineStopsMixin
from cetvm.cpu.events import PendingEvent
from cetvm.cpu.exit_emulation import EmulationPlumbingMixin
from cetvm.arch.vmx import VmcsField
from cetvm.cpu.faults import HardwareRefused
from cetvm.cpu.completion import ExitCompletion
from cetvm.cpu.exits import ExceptionExit, ExitReason, VmExit
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.fastpath import ShadowStackWindow
from cetvm.cpu.interrupts import InterruptsMixin
from cetvm.cpu.memory import PAGE, GuestMemory, MemoryRegion
from cetvm.cpu.native import select_cet_path
from cetvm.cpu.paging import Access, PagingMode, mapping_of
from cetvm.cpu.registers import EFER_OFFSET, XCR0_OFFSET, Registers
from cetvm.cpu.state import CetRegisters, CetState, DescriptorTable, FpuState, Regs, Segment, Sregs
from cetvm.cpu.tsc import TimeStampCounter
from cetvm.cpu.uc_context import ContextBlob, HFlags, check_unicorn
from cetvm.cpu.vmcs import Vmcs, guest_cet_state_fault, software_exception_exits
from cetvm.arch.regs import U64_MASK
from cetvm.cpu import emulate, events

if TYPE_CHECKING:
    from cetvm.cpuid import CpuidModel

__all__ = ["EFER_OFFSET", "PAGE", "XCR0_OFFSET", "MemoryRegion", "PendingEvent", "Vcpu"]



#: CR0 and CR4 bits whose change changes how linear addresses translate, so that the
#: processor flushes its TLBs, global entries included [SDM Vol. 3 §4.10.4.1].
_CR0_PAGING_BITS = int(Cr0.PG | Cr0.PE)
_CR4_PAGING_BITS = int(Cr4.PGE | Cr4.PAE | Cr4.PSE | Cr4.PCIDE | Cr4.LA57)
#: 1 GiB: the largest page size of IA-32e paging.
_LARGEST_PAGE = 1 << 30


class Vcpu(CetMachineMixin, EmulationPlumbingMixin, BlockHookMixin, EngineStopsMixin, InterruptsMixin):
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
    ``budget_granularity`` (traced mode): how instructions are counted for ``run(budget=N)`` —
    "block" (per translation block, exact stops; the default) or "instruction" (a code hook on
    every instruction, the reference); None means ``$CETVM_BUDGET_GRANULARITY`` or "block"
    (:mod:`cetvm.cpu.budget`). Untraced vCPUs count per instruction (they have no block hook).
    A hypervisor controls it through its current VMCS (:attr:`vmcs`, :meth:`vmptrld`; see
    :mod:`cetvm.cpu.vmcs`) and tells it the CET features of the guest's CPUID
    (:meth:`set_guest_cet_features`); ``has_shstk`` / ``has_ibt`` are the hardware's.
    """

    def __init__(self, model: "CpuidModel", *, trace: bool = True, cet_path: str | None = None,
                 python_fast_path: bool | None = None, budget_granularity: str | None = None) -> None:
        self.model = model
        self.has_shstk = bool(model.has("shstk"))
        self.has_ibt = bool(model.has("ibt"))
        #: CET as the guest's CPUID enumerates it (within the hardware's): CET instructions,
        #: CR4.CET and the CET MSRs follow these (:meth:`set_guest_cet_features`)
        self.guest_shstk = self.has_shstk
        self.guest_ibt = self.has_ibt
        self.traced = trace
        self.vmcs = Vmcs()
        #: the last exit and the completion of its instruction (:mod:`cetvm.cpu.completion`)
        self.completion = ExitCompletion()
        self.cet: CetRegisters = CetState()
        self.xss = 0
        granularity = select_granularity(budget_granularity)
        self._budget = InstructionBudget(granularity if trace else "instruction")
        self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._uc.ctl_set_cpu_model(engine_cpu_model())  # the features the guest CPUID may show
        check_unicorn(self._uc)
        self._memory = GuestMemory(self._uc)
        self._registers = Registers(self._uc)
        # Bound once: the CetMachine shadow-stack accesses run per CALL/RET on the reference path.
        self._translate = self._memory.translate
        self._ram_view = self._memory.ram_view
        self._blocks: BlockTable = BlockTracker()
        self._exits: set[int] = set()
        self._pending: PendingEvent | None = None
        self._irq_vector: int | None = None  # external interrupt (cetvm.cpu.interrupts)
        #: writes of the FPU registers from outside the engine (set_fpu / set_sse), so KVM's guest
        #: FPU swap can tell that the CPU still holds what it last put (cetvm.kvm.vmx._swap_sse)
        self.fpu_writes = 0
        self._info_factory = InstructionInfoFactory()
        self.stepping = False
        self.cpl = 0
        self.long_mode = True
        self._code_bits = 64
        self._cs_base = 0
        self.cr4_cet = False
        self.cet_active = False
        self._ss_window = ShadowStackWindow(self._memory.translate, self._memory.ram_view)
        if python_fast_path is None:
            python_fast_path = os.environ.get("CETVM_PYTHON_FAST_PATH", "1") != "0"
        self.python_fast_path = python_fast_path
        uc = self._uc
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._intr_hook = uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self._hook_error: BaseException | None = None
        self._reg_buf = ctypes.c_uint64()
        self._block_hook_cb = None
        self._tlb_virtual = False
        self._syscall_at: int | None = None
        if not self.traced:
            uc.hook_add(UC_HOOK_INSN, self._on_untraced_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        self._native = None
        self._native_events = None  # SYSCALL/SYSRETQ in the engine (block_hook._install_native_events)
        self.cet_path = "off"
        if self.traced:
            self.cet_path = select_cet_path(cet_path or os.environ.get("CETVM_CET_PATH") or "auto")
            if self.cet_path == "native":
                self._install_native_path()
            else:
                self._install_block_hook()
                uc.hook_add(UC_HOOK_TLB_FILL, self._on_tlb_fill)
        # after the native path's SERIALIZE hook: Unicorn asks the #UD hooks in order
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid_instruction)
        #: The time-stamp counter (RDTSC/RDTSCP/IA32_TIME_STAMP_COUNTER, :mod:`cetvm.cpu.tsc`);
        #: the Python CET path uses no native code here either, so both TSC hooks stay tested.
        self.tsc = TimeStampCounter(self._uc, self._budget.counter_address, use_native=self.cet_path != "python")
        self.refresh_mode()

    # ------------------------------------------------------------------ memory (GuestMemory)
    def map_ram(self, gpa: int, size: int, share_with: "Vcpu | None" = None) -> None:
        """Back guest-physical [gpa, gpa+size) with RAM (page-aligned, zero-filled); see
        :meth:`cetvm.cpu.memory.GuestMemory.map_ram`. The native hook is told about it.
        ``share_with``: map the same host memory as that vCPU's region at ``gpa`` (SMP: every
        engine of a VM sees one RAM)."""
        backing = None if share_with is None else share_with._memory.ram_backing(gpa)
        try:
            address = self._memory.map_ram(gpa, size, backing)
        except UcError as err:
            raise HardwareRefused(f"cannot map {size:#x} bytes of RAM at {gpa:#x}: {err}") from None
        if self._native is not None:
            self._native.add_ram(gpa, size, address)

    def map_mmio(self, gpa: int, size: int) -> None:
        """Declare [gpa, gpa+size) MMIO: guest accesses exit with ExitReason.MMIO.

        Accesses to guest-physical addresses backed by nothing exit the same way (as in KVM).
        """
        self._memory.map_mmio(gpa, size)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return self._memory.regions

    def read_phys(self, gpa: int, size: int) -> bytes:
        return self._memory.read_phys(gpa, size)

    def write_phys(self, gpa: int, data: bytes) -> None:
        self._memory.write_phys(gpa, data)

    def translate(self, linear: int, access: Access = Access.READ) -> int:
        """Guest-virtual → guest-physical with the current paging mode (raises GuestFault);
        cached like a TLB until ``flush_tlb`` (see :meth:`cetvm.cpu.memory.GuestMemory.translate`)."""
        return self._translate(linear, access)

    def flush_translations(self) -> None:
        """Forget every translated block, block classification and exit address of this engine.

        For code that changed under it without its own stores noticing: another vCPU's engine
        wrote it (cross-modifying code; each engine detects only its own self-modifying writes).
        The KVM layer calls it when a vCPU is reset by INIT (the usual way a processor is pointed
        at freshly written code, e.g. an AP trampoline)."""
        self._blocks.invalidate()
        self._blocks.prev = None
        self._exits.clear()
        self._uc.ctl_set_exits([])
        self._uc.ctl_flush_tb()

    def drop_translations(self, start: int, end: int, *, block_before: bool = False) -> None:
        """Drop the engine's translation blocks that cover linear [start, end) — and, with
        ``block_before`` (``start`` stops being an exit), the one ending right before ``start``,
        which Unicorn translated to stop there. Requests are two bytes or more: the native path
        filters Unicorn's own one-byte drops after each run
        (:meth:`cetvm.cpu.native.NativeCet.filter_exit_invalidation`). Unicorn finds the blocks
        through the physical page of the first byte, so the byte before ``start`` (maybe on
        another page) is a request of its own."""
        self._uc.ctl_remove_cache(start, max(end, start + 2))
        if block_before and start:
            self._uc.ctl_remove_cache(start - 1, start + 1)

    def flush_tlb(self) -> None:
        """Forget cached translations: ours, the fast path's shadow-stack window, the native hook's."""
        self._memory.flush()
        self._ss_window.forget()
        if self._native is not None:
            self._native.flush_translations()

    def is_ram(self, gpa: int, size: int) -> bool:
        """Guest-physical [gpa, gpa+size) is RAM (anything else is an MMIO access)."""
        return self._memory.is_ram(gpa, size)

    def retire_emulated(self) -> None:
        """An instruction emulated outside the engine retired (counts against the budget)."""
        self._budget.retire()

    def read_virt(self, linear: int, size: int, access: Access = Access.READ) -> bytes:
        """Read guest-virtual memory page by page (raises GuestFault on a translation fault)."""
        return self._memory.read_virt(linear, size, access)

    def write_virt(self, linear: int, data: bytes, access: Access = Access.WRITE) -> None:
        """Write guest-virtual memory (all pages are translated before anything is written)."""
        self._memory.write_virt(linear, data, access)

    def _user_access(self) -> Access:
        return Access.USER if self.cpl == 3 else Access.READ

    def _phys_read_int(self, gpa: int, size: int) -> int:
        return self._memory.phys_read_int(gpa, size)

    def _phys_write_int(self, gpa: int, value: int, size: int) -> None:
        self._memory.phys_write_int(gpa, value, size)

    # ------------------------------------------------------------------ registers (Registers)
    def reg(self, name: str) -> int:
        """A general-purpose register, ``rip`` or ``rflags`` by name."""
        return self._registers.read(name)

    def set_reg(self, name: str, value: int) -> None:
        self._registers.write(name, value)

    @property
    def rip(self) -> int:
        return self._uc.reg_read(X.UC_X86_REG_RIP)

    @rip.setter
    def rip(self, value: int) -> None:
        self._uc.reg_write(X.UC_X86_REG_RIP, value & U64_MASK)

    def get_regs(self) -> Regs:
        return self._registers.get_regs()

    def set_regs(self, regs: Regs) -> None:
        self._registers.set_regs(regs)

    def get_sregs(self) -> Sregs:
        return self._registers.get_sregs()

    def descriptor_table(self, name: str) -> DescriptorTable:
        """GDTR (``"gdt"``) or IDTR (``"idt"``) without the rest of :meth:`get_sregs`."""
        return self._registers.descriptor_table(name)

    def task_register(self) -> Segment:
        """TR with its descriptor cache, without the rest of :meth:`get_sregs`."""
        return self._registers.task_register()

    def set_sregs(self, sregs: Sregs) -> None:
        """Load control registers, EFER, descriptor tables and segment caches (no checks).

        EFER.LMA is derived as hardware does: LME and CR0.PG (also in the engine, see
        :meth:`cetvm.cpu.registers.Registers.force_efer_lma`). Starting in real mode (the
        RESET/INIT state), in 32-bit protected mode (CS.L=0, D=1, paging off) and in 64-bit mode
        (LME/LMA, CR0.PG, CS.L=1) work.
        """
        self._registers.load_sregs(sregs)
        self.load_segments(cs=sregs.cs, ss=sregs.ss, ds=sregs.ds, es=sregs.es, fs=sregs.fs, gs=sregs.gs)
        self.refresh_mode()

    def get_fpu(self) -> FpuState:
        """x87, SSE and AVX registers (KVM_GET_FPU plus the YMM upper halves)."""
        return self._registers.get_fpu()

    def set_fpu(self, fpu: FpuState) -> None:
        """Load x87, SSE and AVX registers (InputError if a field does not fit its width)."""
        self._registers.set_fpu(fpu)
        self.fpu_writes += 1

    def get_sse(self) -> tuple[int, list[int]]:
        """(MXCSR, [XMM0..15]) only (the guest FPU swap of every KVM_RUN)."""
        return self._registers.get_sse()

    def set_sse(self, mxcsr: int, xmm: list[int]) -> None:
        """Load MXCSR and XMM0-15 (YMM upper halves kept)."""
        self._registers.set_sse(mxcsr, xmm)
        self.fpu_writes += 1

    def load_segments(self, **segments: Segment) -> None:
        """Load segment registers with their descriptor caches; recompute CPL/mode (blob patch)."""
        self._registers.load_segment_caches(segments)
        self.refresh_mode(paging=False)

    def segment(self, name: str) -> Segment:
        return self._registers.segment(name)

    @property
    def cr0(self) -> int:
        return self._uc.reg_read(X.UC_X86_REG_CR0)

    @property
    def cr4(self) -> int:
        return self._registers.cr4

    def write_cr(self, n: int, value: int) -> None:
        """Write CR0/CR2/CR3/CR4/CR8 without checks (the emulation checks first). Block
        classifications go as TLB entries do [SDM Vol. 3 §4.10.4.1]: a CR3 load drops those
        not on global pages; a CR0/CR4 write that changes how linear addresses translate drops
        all (:data:`_CR0_PAGING_BITS`, :data:`_CR4_PAGING_BITS`)."""
        old = self.cr0 if n == 0 else self.cr4 if n == 4 else 0
        self._registers.write_cr(n, value)
        if n == 3:
            self._blocks.invalidate_local()
            self._load_paging_root(value)
            return
        if (n == 0 and (old ^ value) & _CR0_PAGING_BITS) or (n == 4 and (old ^ value) & _CR4_PAGING_BITS):
            self._blocks.invalidate()
        self.refresh_mode()

    def _load_paging_root(self, cr3: int) -> None:
        """What a CR3 load changes of the mode :meth:`refresh_mode` caches: only the paging root
        (CPL, code size, CR0/CR4/EFER stay; Linux loads CR3 at every context switch)."""
        mode = self._memory.mode
        self._memory.set_mode(PagingMode(mode.cr0, cr3 & U64_MASK, mode.cr4, mode.efer))
        self._ss_window.forget()
        if self._native is not None:
            self._sync_native_mode()

    def forget_blocks(self, *, global_too: bool) -> None:
        """Forget block classifications: those not on global pages, or all."""
        if global_too:
            self._blocks.invalidate()
        else:
            self._blocks.invalidate_local()

    def forget_blocks_at(self, linear: int) -> None:
        """Forget the block classifications on the page ``linear`` lies in (INVLPG). If it is not
        mapped any more, the page it was in is unknown: the 1 GiB region around it (the largest
        page a TLB entry covers) goes."""
        mapping = mapping_of(self._memory.read_phys_u64, self._memory.mode, linear)
        if mapping is None:
            base, size = linear & ~(_LARGEST_PAGE - 1), _LARGEST_PAGE
        else:
            base, size = mapping.page_base, mapping.page_size
        self._blocks.invalidate_range(base, base + size)

    def code_is_global(self, address: int, size: int) -> bool:
        """True if the code at linear [address, address + size) is on global pages only (its
        block classification may outlive a CR3 load, :meth:`write_cr`)."""
        read, mode = self._memory.read_phys_u64, self._memory.mode
        first = mapping_of(read, mode, address)
        if first is None or not first.global_page:
            return False
        last = address + max(size, 1) - 1
        if last < first.page_base + first.page_size:
            return True
        second = mapping_of(read, mode, last)
        return second is not None and second.global_page

    @property
    def xcr0(self) -> int:
        """XCR0 (the hypervisor sets it after an XSETBV exit; no checks here)."""
        return self._registers.xcr0

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        self._registers.xcr0 = value

    def msr(self, index: int) -> int:
        """Host-initiated MSR read (CET MSRs, IA32_XSS and the TSC from the vCPU, the rest from
        Unicorn); HardwareRefused for an MSR the engine does not implement."""
        if index in CET_MSR_SET:
            return self._cet_msr_value(index)
        if index == Msr.IA32_XSS:
            return self.xss
        if index == Msr.IA32_TIME_STAMP_COUNTER:
            return self.tsc.read()
        try:
            return self._uc.msr_read(index)
        except UcError as err:
            raise HardwareRefused(f"RDMSR {index:#x}: {err}") from None

    def set_msr(self, index: int, value: int) -> None:
        """Host-initiated MSR write, no architectural checks (the hypervisor's policy decides);
        HardwareRefused for an MSR the engine does not implement."""
        if index in CET_MSR_SET:
            self._set_cet_msr_value(index, value)
        elif index == Msr.IA32_XSS:
            self.xss = value & U64_MASK
        elif index == Msr.IA32_TIME_STAMP_COUNTER:  # WRMSR writes the counter itself [SDM §18.17]
            self.tsc.offset = (value - self.tsc.source()) & U64_MASK
        else:
            try:
                self._uc.msr_write(index, value & U64_MASK)
            except UcError as err:
                raise HardwareRefused(f"WRMSR {index:#x}: {err}") from None
            if index == Msr.IA32_EFER:
                self.refresh_mode()

    def _clear_stale_old_exception(self) -> None:
        self._registers.clear_stale_old_exception()

    def reset_old_exception(self) -> None:
        """Forget the last exception so the next fault is not promoted to #DF."""
        self._registers.reset_old_exception()

    # ------------------------------------------------------------------ cached mode
    def refresh_mode(self, *, paging: bool = True) -> None:
        """Re-read the mode-defining state the hot paths cache (CPL, 64-bit mode, paging, CR4.CET).

        ``paging=False``: only segment state changed (a segment load: CPL, CS.L, CS.base), so the
        paging mode and the translations cached for it stay (they are kept per access kind,
        user and supervisor apart) — event delivery, IRET and SYSCALL/SYSRET load segments."""
        uc = self._uc
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        if paging:
            efer = uc.msr_read(Msr.IA32_EFER)
            self._memory.set_mode(PagingMode(cr0, uc.reg_read(X.UC_X86_REG_CR3), cr4, efer))
        self._ss_window.forget()
        blob = ContextBlob.save(uc)
        hflags = blob.hflags
        self._cs_base = blob.segment("cs").base
        self.cpl = hflags & HFlags.CPL_MASK if cr0 & Cr0.PE else 0
        self.long_mode = bool(hflags & HFlags.CS64)
        #: Decoder bitness of the code segment: 64-bit mode, else CS.D (32) or real/16-bit (16).
        self._code_bits = 64 if self.long_mode else 32 if hflags & HFlags.CS32 else 16
        self.cr4_cet = bool(cr4 & Cr4.CET)
        self._update_cet_active()
        self._update_tlb_mode(not cr0 & Cr0.PG)
        if self._native is not None:
            self._sync_native_mode(flush=paging)

    def _linear(self, rip: int) -> int:
        """The linear address of the instruction at offset ``rip`` of the code segment
        (CS.base + RIP) [SDM Vol. 3 §3.4 "Logical and linear addresses"]: the address the engine
        compares its exits with, reports to its hooks and keys its translations on, in every mode
        (QEMU's translation-block pc), whereas RIP (``emu_start``'s start address, register
        reads and writes) is the offset. They differ only while CS.base is not 0: real mode
        with a nonzero CS (an AP started by a SIPI runs at CS.base = vector << 12), a 16/32-bit
        segment with a base."""
        return self._cs_base + rip

    def _update_tlb_mode(self, paging_off: bool) -> None:
        """Paging off (traced mode only, where MOV to CR0 is emulated and seen): Unicorn's
        virtual-TLB mode with :meth:`_on_tlb_fill`, so data pages are not executable to the
        engine and stores stay on its fast path. Paging on: the CPU's
        own walk of the guest page tables (the guest's NX does the same job)."""
        virtual = self.traced and paging_off
        if virtual != self._tlb_virtual:
            self._uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL if virtual else UC_TLB_CPU)
            self._tlb_virtual = virtual

    # ------------------------------------------------------------------ hypervisor interface
    def vmptrld(self, vmcs: Vmcs) -> None:
        """Make ``vmcs`` the current VMCS: the next VM entry (``run``) obeys its controls."""
        self.vmcs = vmcs

    # The hypervisor controls moved into the VMCS; these two raise instead of letting code written
    # for the old attributes set a new, ignored attribute (remove once no branch uses them).
    @property
    def exception_bitmap(self) -> int:
        raise AttributeError("Vcpu.exception_bitmap is the VMCS's: vcpu.vmcs.read/write(VmcsField.EXCEPTION_BITMAP)")

    @exception_bitmap.setter
    def exception_bitmap(self, _value: int) -> None:
        raise AttributeError("Vcpu.exception_bitmap is the VMCS's: vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, bits)")

    @property
    def msr_intercepts(self) -> None:
        raise AttributeError("Vcpu.msr_intercepts is the VMCS's MSR bitmap: vcpu.vmcs.msr_bitmap / set_msr_bitmap()")

    @msr_intercepts.setter
    def msr_intercepts(self, _value: object) -> None:
        raise AttributeError("Vcpu.msr_intercepts is the VMCS's MSR bitmap: vcpu.vmcs.set_msr_bitmap(indices)")

    def set_guest_cet_features(self, *, shstk: bool, ibt: bool) -> None:
        """The CET features the guest's CPUID enumerates (KVM: guest_cpu_cap_has after
        KVM_SET_CPUID2). Without them CR4.CET is reserved, the CET MSRs do not exist for the
        guest and the shadow-stack instructions are #UD, as on a CPU without the feature."""
        self.guest_shstk = bool(shstk) and self.has_shstk
        self.guest_ibt = bool(ibt) and self.has_ibt

    def set_exit_result(self, *, data: int | None = None, error: bool = False) -> None:
        """The hypervisor's result for the last exit, which the completion at the next run
        writes to the guest: ``data`` for an IN, an MMIO read or an intercepted RDMSR; ``error``
        for an intercepted RDMSR/WRMSR that must #GP(0) instead. The hypervisor copies it in
        (KVM: from kvm_run, complete_userspace_io); the exit it got from :meth:`run` is
        otherwise read-only to it."""
        self.completion.set_result(data=data, error=error)

    def load_xcr0(self, value: int) -> None:
        """XSETBV by the host (kvm_load_guest_xsave_state): XCR0 without checks."""
        self._registers.xcr0 = value

    def inject_exception(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        """Deliver an exception at the next run (cancels completion of the last exit)."""
        self.completion.cancel()
        self._pending = PendingEvent(vector, error_code, cr2, injected=True)

    @property
    def has_pending_event(self) -> bool:
        """An exception or injected event waits for delivery at the next run (KVM: an event in
        the VM-entry interruption-information field; nothing else may be injected before it)."""
        return self._pending is not None

    def run(self, budget: int | None = None) -> VmExit:
        """VM entry, run until an exit, VM exit. ``budget``: at most this many instructions
        (then ExitReason.BUDGET). The last exit's instruction is completed first."""
        self.complete_pending_exit()
        further = self.completion.take_further_exit()
        if further is not None:
            return self._vm_exit(further)
        failure = self._vm_entry()
        if failure is not None:
            return self._vm_exit(failure)
        self._budget.left = budget
        self.tsc.sync()
        hook = None
        if budget is not None and self._budget.per_instruction:
            hook = self._budget.add_count_hook(self._uc, self.cet_path == "python")
        try:
            return self._vm_exit(self._run_loop())
        finally:
            if hook is not None:
                self._budget.del_count_hook(self._uc, hook)
            self._budget.left = None

    def _vm_entry(self) -> VmExit | None:
        """VM entry from the current VMCS [SDM Vol. 3 ch. 28]: with LOAD_CET_STATE, check the
        guest CET fields and load S_CET, SSP and INTR_SSP_TABLE; a failed check is a VM-entry
        failure exit (nothing loaded, nothing run)."""
        vmcs = self.vmcs
        if not vmcs.entry_loads_cet():
            return None
        s_cet, ssp = vmcs.read(VmcsField.GUEST_S_CET), vmcs.read(VmcsField.GUEST_SSP)
        intr_ssp_table = vmcs.read(VmcsField.GUEST_INTR_SSP_TABLE)
        fault = guest_cet_state_fault(s_cet, ssp, intr_ssp_table)
        if fault is not None:
            return VmExit(ExitReason.ENTRY_FAILED, self.rip, detail=f"VM entry failed the guest-state checks: {fault}")
        self.set_cet_msr(Msr.IA32_S_CET, s_cet)
        self.set_cet_msr(Msr.IA32_INT_SSP_TAB, intr_ssp_table)
        self.ssp = ssp
        return None

    def _vm_exit(self, exit_: VmExit) -> VmExit:
        """VM exit [SDM Vol. 3 ch. 29]: save the guest CET state into the VMCS (always, as a
        processor that supports loading it does) and record the exit information."""
        vmcs = self.vmcs
        if exit_.reason is not ExitReason.ENTRY_FAILED:
            vmcs.write(VmcsField.GUEST_S_CET, self.cet_msr(Msr.IA32_S_CET))
            vmcs.write(VmcsField.GUEST_SSP, self.ssp)
            vmcs.write(VmcsField.GUEST_INTR_SSP_TABLE, self.cet_msr(Msr.IA32_INT_SSP_TAB))
        self.completion.last_exit = exit_
        vmcs.record_exit(exit_)
        return exit_

    # ------------------------------------------------------------------ exact instruction budget
    @property
    def instructions_retired(self) -> int:
        """Instructions retired by this vCPU (exact; at instruction granularity only while a run has
        a budget, see :mod:`cetvm.cpu.budget`)."""
        return self._budget.retired

    @instructions_retired.setter
    def instructions_retired(self, value: int) -> None:
        self._budget.retired = value

    def _retire(self) -> None:
        """An instruction emulated in Python retired (counts against the budget)."""
        self._budget.retire()

    def _unretire(self) -> None:
        """The last counted instruction faulted instead of retiring (instruction granularity)."""
        self._budget.unretire()

    def _retire_before(self, rip: int) -> None:
        """The engine stopped at ``rip`` without executing the instruction there (a fault, an MMIO
        access, an invalid instruction): at block granularity, of the block that ran last only
        the instructions before ``rip`` retired — the rest, counted when the block started, are
        taken back (:mod:`cetvm.cpu.budget`); at instruction granularity the instruction at
        ``rip`` is."""
        if self._budget.per_instruction:
            self._unretire()
            return
        blocks = self._blocks
        last = blocks.last
        blocks.close_last()
        if last is None:
            return
        address, size, icount = last
        pc = self._linear(rip)
        if not address <= pc < address + size:
            return
        ran = 0
        if pc > address:
            try:
                ran = len(decode.decode_block(self._read_code(address, pc - address), address, self._code_bits))
            except (GuestFault, UcError):
                ran = 0
        self._budget.uncount(icount - min(ran, icount))

    def _branch_did_not_retire(self) -> None:
        """The branch that ended the block that ran last faulted after the engine moved RIP to
        its target (a non-canonical target: #GP): it did not retire."""
        if self._budget.per_instruction:
            self._unretire()
            return
        last = self._blocks.last
        self._blocks.close_last()
        if last is not None:
            self._budget.uncount(1)

    def _terminator_faulted(self, decision: BlockDecision) -> None:
        """A CET fault of the pending terminator itself (#CP(1) at a RET, a shadow-stack fault of a
        CALL: ``decision.rolled_back``): the terminator did not retire, but it was counted — as
        its block started (block granularity) or as it started (instruction granularity)."""
        if not decision.rolled_back:
            return
        if self._budget.per_instruction:
            self._unretire()
        else:
            self._budget.uncount(1)

    def _run_fenced(self, rip: int, size: int, count: int) -> None:
        """Run exactly the first ``count`` instructions of the block at ``rip`` (``size`` bytes),
        which has more: the block hook stopped the engine in front of it for want of budget. A
        temporary Unicorn exit after them makes the engine translate the block short and stop
        there; the block's translations are dropped before and after (Unicorn's exits act when
        a block is translated; ``rip`` is the offset, the block and the exit are linear)."""
        pc = self._linear(rip)
        instrs = decode.decode_block(self._read_code(pc, size), pc, self._code_bits)
        if count >= len(instrs):
            # The block was rewritten since it was classified, to the same size (self-modifying
            # code): classify it again; the run loop enters it anew with the right count.
            self._classify_block(pc, size)
            return
        fence = instrs[count].ip
        uc = self._uc
        added = fence not in self._exits
        if added:
            self._exits.add(fence)
            uc.ctl_set_exits(sorted(self._exits))
        self.drop_translations(pc, pc + size)
        try:
            uc.emu_start(rip, 0)
        finally:
            if added:
                self._exits.discard(fence)
                uc.ctl_set_exits(sorted(self._exits))
            self.drop_translations(pc, pc + size)

    # ------------------------------------------------------------------ run loop
    def _run_loop(self) -> VmExit:
        while True:
            if self._irq_vector is not None:
                self._take_deliverable_interrupt()
            if self._pending is not None:
                event, self._pending = self._pending, None
                if not (event.software or event.injected) and event.vector < 32 \
                        and self.vmcs.read(VmcsField.EXCEPTION_BITMAP) >> event.vector & 1:
                    return VmExit(ExitReason.EXCEPTION, self.rip, exception=ExceptionExit(event.vector, event.error_code, event.cr2))
                if software_exception_exits(event, self.vmcs):  # INT3 / INTO [SDM Vol. 3 §26.2]
                    length, self.rip = self.rip - event.instruction_rip, event.instruction_rip
                    return VmExit(ExitReason.EXCEPTION, self.rip, length, exception=ExceptionExit(event.vector, software=True))
                exit_ = events.deliver(self, event)
                if exit_ is not None:
                    return exit_
                continue
            if self._budget.left is not None and self._budget.left <= 0:
                return VmExit(ExitReason.BUDGET, self.rip)
            rip = self.rip
            if self._linear(rip) in self._exits:
                exit_ = self._emulate_at(rip, emulate)
            else:
                exit_ = self._run_engine(rip)
            if exit_ is not None and not (self._irq_vector is not None and self._wake_from_hlt(exit_)):
                return exit_

    def _run_engine(self, rip: int) -> VmExit | None:
        self._budget.hit = False
        if self._native_events is not None:
            self._native_events.before_run(self._irq_vector is not None, self.vmcs.read(VmcsField.EXCEPTION_BITMAP))
        try:
            self._emu_start_keeping_cr2(rip)
            if self._native is not None:
                self._native.raise_callback_error()
                self._apply_native_handover()
            if self._hook_error is not None:
                error, self._hook_error = self._hook_error, None
                raise error
            if self.tsc.error is not None:
                error, self.tsc.error = self.tsc.error, None
                raise error
        except UcError as err:
            if err.errno == UC_ERR_INSN_INVALID:
                return self._on_invalid_stop()
            if err.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED):
                return self._on_unmapped_stop(err.errno)
            raise CetvmError(f"engine error at RIP {self.rip:#x}: {err}") from None
        if self._budget.hit:
            self._forget_terminator_not_run(self._linear(self.rip))
        if self._pending is None:
            self._clear_stale_old_exception()
        if not self.traced:
            self.refresh_mode()  # native IRETQ/SYSRET/far transfers may have changed CPL or mode
        if self._syscall_at is not None:
            self.rip, self._syscall_at = self._syscall_at, None
            return self._emulate_at(self.rip, emulate)
        if self._pending is not None or self._budget.hit or self._linear(self.rip) in self._exits:
            return None
        if not self.traced:
            # Untraced mode: Unicorn stops by itself only after HLT (RIP past it).
            return VmExit(ExitReason.HLT, (self.rip - 1) & U64_MASK, 1)
        return None

    @contextlib.contextmanager
    def _cr2_kept(self) -> Iterator[None]:
        """Put the guest's CR2 back after engine work. CR2 changes architecturally only when a
        #PF is delivered (:func:`cetvm.cpu.events.deliver` writes the pending #PF's own CR2,
        read by the interrupt hook) or by MOV to CR2 (emulated), but Unicorn also writes it on
        events that are no #PF for the guest: MMIO and unmapped accesses, mapping and unmapping
        a scratch page, the re-translation of a stale block after a paging change. (Found by a
        2-vCPU snapshot: the continued machine's AP had CR2 = 0x14, the restored one 0.)"""
        uc = self._uc
        cr2 = uc.reg_read(X.UC_X86_REG_CR2)
        try:
            yield
        finally:
            uc.reg_write(X.UC_X86_REG_CR2, cr2)

    def _emu_start_keeping_cr2(self, rip: int) -> None:
        budget = self._budget
        with self._cr2_kept():
            if not budget.per_instruction:
                self._blocks.close_last()
            self._uc.emu_start(rip, 0)
            self._sync_native_events_mode()
            stop = budget.take_stop()
            if stop and budget.left:
                self._run_fenced(self.rip, stop, budget.left)
        if self._native_events is not None:
            cr2 = self._native_events.take_delivered_cr2()
            if cr2 is not None:  # a #PF the native events delivered: CR2 is the guest's now
                self._uc.reg_write(X.UC_X86_REG_CR2, cr2)

    # ------------------------------------------------------------------ misc
    @property
    def unicorn(self) -> Uc:
        """The underlying engine (for the native-hook work and diagnostics only)."""
        return self._uc

    @property
    def block_count(self) -> int:
        return len(self._blocks)
