"""The vCPU: Unicorn executes guest code, cetvm adds CET, event delivery and VMX-like exits.

Execution model:

- *Traced mode* (the default, ``trace=True``): one UC_HOOK_BLOCK hook. On a block's first
  execution it is decoded (iced-x86); instructions cetvm must emulate (:mod:`cetvm.cpu.decode`)
  become exit points, the block is dropped from the TB cache and restarted, so Unicorn stops in
  front of them and :mod:`cetvm.cpu.emulate` runs them. At every block start the CET state
  machine (:mod:`cetvm.cpu.cet.transfer`) applies the previous block's terminator.
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

:class:`Vcpu` is the composition of parts, each an object with its own small interface, plus
VM entry, VM exit and the run loop; its public methods are the interface the hypervisor
(:mod:`cetvm.kvm`), the emulation code and tests use:

- :attr:`Vcpu.memory` (:class:`cetvm.cpu.memory.GuestMemory`): regions, physical/virtual
  access, translation cache;
- :attr:`Vcpu.registers` (:class:`cetvm.cpu.registers.Registers`): GPR/segment/CR/XCR0/FPU;
- :attr:`Vcpu.mode` (:class:`cetvm.cpu.mode.CpuMode`): the cached mode every hot path reads
  (CPL, 64-bit mode, CS base, CR4.CET, CET active, stepping); instruction fetch
  (:class:`cetvm.cpu.mode.InstructionFetch`);
- :attr:`Vcpu.cet_machine` (:class:`cetvm.cpu.vcpu_cet.VcpuCet`): the CET registers and the
  :class:`cetvm.cpu.cet.machine.CetMachine` the CET semantics run on;
- :attr:`Vcpu.pending_events` (:class:`cetvm.cpu.interrupts.PendingEvents`): the next event to
  deliver, the pending external interrupt, IF and the interrupt shadow;
- :attr:`Vcpu.completion` (:class:`cetvm.cpu.completion.ExitCompletion`): the last exit and its
  unfinished instruction;
- :attr:`Vcpu.budget` (:class:`cetvm.cpu.budget.InstructionBudget`): the exact instruction budget;
- the block hook (:class:`cetvm.cpu.block_hook.BlockHook`), the engine's exit points
  (:class:`cetvm.cpu.exit_points.ExitPoints`), engine stops
  (:class:`cetvm.cpu.engine_stops.EngineStops`) and emulation at exit points
  (:class:`cetvm.cpu.exit_emulation.ExitEmulation`);
- :attr:`Vcpu.vmcs` (:class:`cetvm.cpu.vmcs.Vmcs`): the current VMCS; :attr:`Vcpu.tsc`.

The parts are wired once, in ``__init__``: each gets the parts it uses (bound, so a block start
follows one attribute per part) and nothing reads another part's private state.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from unicorn import (
    UC_ARCH_X86, UC_ERR_FETCH_UNMAPPED, UC_ERR_INSN_INVALID, UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_64, UC_TLB_CPU, UC_TLB_VIRTUAL,
    Uc, UcError,
)
from unicorn import x86_const as X

from iced_x86 import Register

from cetvm import CetvmError
from cetvm.arch import Cr0, Cr4, Msr, Vector
from cetvm.arch.msr import CET_MSR_SET
from cetvm.arch.regs import U64_MASK
from cetvm.arch.vmx import (
    GUEST_INTR_STATE_MOV_SS, GUEST_INTR_STATE_NMI, GUEST_INTR_STATE_STI, INTR_INFO_TYPE_SHIFT, INTR_INFO_VALID,
    INTR_INFO_VECTOR_MASK, INTR_TYPE_NMI, CpuBasedControls, VmcsField,
)
from cetvm.cpu import events
from cetvm.cpu.alignment import alignment_checked, misaligned_access
from cetvm.cpu.block_hook import BlockHook
from cetvm.cpu.blocks import BlockTable, BlockTracker
from cetvm.cpu.budget import InstructionBudget, select_granularity
from cetvm.cpu.completion import Completion, ExitCompletion
from cetvm.cpu.engine_features import engine_cpu_model
from cetvm.cpu.engine_stops import EngineStops
from cetvm.cpu.events import PendingEvent
from cetvm.cpu.exit_emulation import ExitEmulation
from cetvm.cpu.exit_points import ExitPoints
from cetvm.cpu.exits import ExceptionExit, ExitReason, MmioStepHooks, VmExit
from cetvm.cpu.fastpath import ShadowStackWindow
from cetvm.cpu.faults import GuestFault, HardwareRefused
from cetvm.cpu.interrupts import PendingEvents
from cetvm.cpu.memory import PAGE, GuestMemory, MemoryRegion
from cetvm.cpu.emulate import read_register
from cetvm.cpu.mode import CpuMode, InstructionFetch
from cetvm.cpu.native import (NativeCet, NativeEvents, NativeExitInsns, native_classify_requested, native_events_requested,
                              select_cet_path)
from cetvm.cpu.paging import Access, PagingMode, mapping_of
from cetvm.cpu.registers import EFER_OFFSET, XCR0_OFFSET, Registers, cet_msr_value
from cetvm.cpu.state import CetRegisters, CetState, DescriptorTable, FpuState, Regs, Segment, Sregs
from cetvm.cpu.tsc import TimeStampCounter
from cetvm.cpu.uc_context import EngineCpu, HFlags, check_unicorn, cr2_kept
from cetvm.cpu.vcpu_cet import VcpuCet
from cetvm.cpu.vmcs import Vmcs, guest_cet_state_fault, software_exception_exits, standalone_vmcs

if TYPE_CHECKING:
    from iced_x86 import Instruction

    from cetvm.cpuid import CpuidModel

__all__ = ["EFER_OFFSET", "PAGE", "XCR0_OFFSET", "MemoryRegion", "PendingEvent", "Vcpu"]



#: CR0 and CR4 bits whose change changes how linear addresses translate, so that the
#: processor flushes its TLBs, global entries included [SDM Vol. 3 §4.10.4.1].
_CR0_PAGING_BITS = int(Cr0.PG | Cr0.PE)
_CR4_PAGING_BITS = int(Cr4.PGE | Cr4.PAE | Cr4.PSE | Cr4.PCIDE | Cr4.LA57)
#: 1 GiB: the largest page size of IA-32e paging.
_LARGEST_PAGE = 1 << 30


class Vcpu:
    """One virtual CPU with its guest-physical memory (a VM of one CPU, as the hardware sees it).

    ``model``: the :class:`cetvm.cpuid.CpuidModel` it emulates (which CET features exist, the
    XSAVE layout). ``trace``: see the module docstring (False only for benchmarks and guests
    that need no exits but HLT). ``cet_path`` (traced mode): which block hook enforces CET —
    "native" (the C fast path, :mod:`cetvm.cpu.native`), "python" (the readable reference
    hook of :mod:`cetvm.cpu.block_hook`) or "auto" (native when built, else python with a
    one-line notice on stderr); None means ``$CETVM_CET_PATH`` or "auto". Both paths give the
    same architectural results.
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
        #: the current VMCS; without a hypervisor's :meth:`vmptrld` the standalone controls
        self.vmcs = standalone_vmcs()
        self._halted = False
        self._watching_window = False  # the block hook watches for the interrupt window
        self.xss = 0
        #: writes of the FPU registers from outside the engine (set_fpu / set_sse), so KVM's guest
        #: FPU swap can tell that the CPU still holds what it last put (cetvm.kvm.vmx._swap_sse)
        self.fpu_writes = 0
        if python_fast_path is None:
            python_fast_path = os.environ.get("CETVM_PYTHON_FAST_PATH", "1") != "0"
        self.python_fast_path = python_fast_path
        self.cet_path = "off"
        if trace:
            self.cet_path = select_cet_path(cet_path or os.environ.get("CETVM_CET_PATH") or "auto")

        uc = self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_cpu_model(engine_cpu_model())  # the features the guest CPUID may show
        check_unicorn(uc)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._tlb_virtual = False

        # ---- the parts
        self.budget = InstructionBudget(select_granularity(budget_granularity) if trace else "instruction")
        self.memory = GuestMemory(uc)
        self.registers = Registers(uc)
        self.mode = CpuMode()
        self.completion = ExitCompletion()
        self.pending_events = PendingEvents(uc, self.registers, self.completion)
        #: the native hook (:mod:`cetvm.cpu.native`) on the native CET path: it holds SSP, U_CET,
        #: S_CET and the block table in its shared state
        self.native: NativeCet | None = None
        blocks: BlockTable
        cet_regs: CetRegisters
        if self.cet_path == "native":
            native = self.native = NativeCet(uc, lambda address, size: self._hook.classify_block(address, size) is not None)
            blocks, cet_regs = native.blocks, native.cet_state
            self.budget.attach(native.shared)
        else:
            blocks, cet_regs = BlockTracker(), CetState()
        self._blocks = blocks
        self.cet_machine = VcpuCet(self.mode, cet_regs, self.memory, uc)
        self._exit_points = ExitPoints(uc)
        self._fetch = InstructionFetch(self.memory, self.mode)
        self._ss_window = ShadowStackWindow(self.memory.translate, self.memory.ram_view)
        #: the engine CPU's cflags_next_tb and tlb_flush_page (None: not the layout cetvm knows)
        self.engine_cpu = EngineCpu.find(uc)
        parts = dict(mode=self.mode, blocks=blocks, budget=self.budget)
        self._hook = BlockHook(uc, cet=self.cet_machine, exits=self._exit_points, fetch=self._fetch,
                               registers=self.registers, window=self._ss_window, raise_fault=self.raise_fault,
                               code_is_global=self.code_is_global, refresh_mode=self.refresh_mode,
                               native=self.native, engine_cpu=self.engine_cpu, **parts)
        self._stops = EngineStops(self, uc, cet=self.cet_machine, hook=self._hook, events=self.pending_events,
                                  memory=self.memory, fetch=self._fetch, registers=self.registers, **parts)
        self._emulation = ExitEmulation(self, uc, exits=self._exit_points, hook=self._hook,
                                        events=self.pending_events, fetch=self._fetch, registers=self.registers,
                                        native=self.native, engine_cpu=self.engine_cpu, **parts)

        # ---- the engine's hooks
        #: SYSCALL, SYSRETQ, IRETQ and the common #PF delivered inside the engine (native path,
        #: block-granular budgets: :meth:`cetvm.cpu.block_hook.BlockHook.install_native_events`)
        self._native_events: NativeEvents | None = None
        #: the exit-point instructions done in C with them (cetfast_run)
        self._exit_insns: NativeExitInsns | None = None
        if not trace:
            uc.hook_add(UC_HOOK_INSN, self._stops.on_untraced_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
        elif self.native is not None:
            # the C block hook classifies plain 64-bit blocks itself, calls BlockHook.classify_block
            # for every other new block and hands rare cases back (BlockHook.apply_native_handover);
            # paging-off guests get its TLB fill
            self.native.install()
            if native_classify_requested():
                self.native.classify_plain_blocks(self.registers.env.address)
            self.native.filter_exit_invalidation()
            if model.has("serialize"):
                self.native.install_serialize()
            self.native.install_tlb_fill(set_mode=False)
            self.native.split_tlb()
            if not self.budget.per_instruction and native_events_requested():
                self._native_events = self._hook.install_native_events()
                self._exit_insns = self._native_events.install_exit_insns(self._native_cr3_write)
                self._exit_insns.set_env(self.registers.env.address)
        else:
            self._hook.install_python_hook(python_fast_path)
            uc.hook_add(UC_HOOK_TLB_FILL, self._stops.on_tlb_fill)
        if self._native_events is None:
            uc.hook_add(UC_HOOK_INTR, self._stops.on_interrupt)
        else:  # the native #PF delivery is the interrupt hook; it calls EngineStops for the rest
            self._native_events.install_page_faults(self._stops.on_interrupt_from_native)
        # after the native path's SERIALIZE hook: Unicorn asks the #UD hooks in order
        uc.hook_add(UC_HOOK_INSN_INVALID, self._stops.on_invalid_instruction)
        #: The time-stamp counter (RDTSC/RDTSCP/IA32_TIME_STAMP_COUNTER, :mod:`cetvm.cpu.tsc`);
        #: the Python CET path uses no native code here either, so both TSC hooks stay tested.
        self.tsc = TimeStampCounter(uc, self.budget.counter_address, use_native=self.cet_path != "python")
        self.refresh_mode()

    # ------------------------------------------------------------------ cached mode (CpuMode)
    @property
    def cpl(self) -> int:
        return self.mode.cpl

    @property
    def long_mode(self) -> bool:
        """64-bit mode (IA-32e with CS.L = 1)."""
        return self.mode.long_mode

    @property
    def cr4_cet(self) -> bool:
        return self.mode.cr4_cet

    @property
    def cet_active(self) -> bool:
        """CR4.CET and SH_STK_EN or ENDBR_EN in U_CET or S_CET."""
        return self.mode.cet_active

    @property
    def stepping(self) -> bool:
        """One instruction runs in the engine with the CET hooks off."""
        return self.mode.stepping

    # ------------------------------------------------------------------ memory (GuestMemory)
    def map_ram(self, gpa: int, size: int, share_with: "Vcpu | None" = None) -> None:
        """Back guest-physical [gpa, gpa+size) with RAM (page-aligned, zero-filled); see
        :meth:`cetvm.cpu.memory.GuestMemory.map_ram`. The native hook is told about it.
        ``share_with``: map the same host memory as that vCPU's region at ``gpa`` (SMP: every
        engine of a VM sees one RAM)."""
        backing = None if share_with is None else share_with.memory.ram_backing(gpa)
        try:
            address = self.memory.map_ram(gpa, size, backing)
        except UcError as err:
            raise HardwareRefused(f"cannot map {size:#x} bytes of RAM at {gpa:#x}: {err}") from None
        if self.native is not None:
            self.native.add_ram(gpa, size, address)

    def map_mmio(self, gpa: int, size: int) -> None:
        """Declare [gpa, gpa+size) MMIO: guest accesses exit with ExitReason.MMIO.

        Accesses to guest-physical addresses backed by nothing exit the same way (as in KVM).
        """
        self.memory.map_mmio(gpa, size)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return self.memory.regions

    def read_phys(self, gpa: int, size: int) -> bytes:
        return self.memory.read_phys(gpa, size)

    def write_phys(self, gpa: int, data: bytes) -> None:
        self.memory.write_phys(gpa, data)

    def translate(self, linear: int, access: Access = Access.READ) -> int:
        """Guest-virtual → guest-physical with the current paging mode (raises GuestFault);
        cached like a TLB until ``flush_tlb`` (see :meth:`cetvm.cpu.memory.GuestMemory.translate`)."""
        return self.memory.translate(linear, access)

    def flush_translations(self) -> None:
        """Forget every translated block, block classification and exit address of this engine.

        For code that changed under it without its own stores noticing: another vCPU's engine
        wrote it (cross-modifying code; each engine detects only its own self-modifying writes).
        The KVM layer calls it when a vCPU is reset by INIT (the usual way a processor is pointed
        at freshly written code, e.g. an AP trampoline)."""
        self._blocks.invalidate()
        self._blocks.prev = None
        self._exit_points.clear()
        self._exit_points.sync()
        self._uc.ctl_flush_tb()

    def flush_tlb(self) -> None:
        """Forget cached translations: ours, the fast path's shadow-stack window, the native hook's."""
        self.memory.flush()
        self._ss_window.forget()
        if self.native is not None:
            self.native.flush_translations()

    def is_ram(self, gpa: int, size: int) -> bool:
        """Guest-physical [gpa, gpa+size) is RAM (anything else is an MMIO access)."""
        return self.memory.is_ram(gpa, size)

    def retire_emulated(self) -> None:
        """An instruction emulated outside the engine retired (counts against the budget)."""
        self.budget.retire()

    def read_virt(self, linear: int, size: int, access: Access = Access.READ) -> bytes:
        """Read guest-virtual memory page by page (raises GuestFault on a translation fault)."""
        return self.memory.read_virt(linear, size, access)

    def write_virt(self, linear: int, data: bytes, access: Access = Access.WRITE) -> None:
        """Write guest-virtual memory (all pages are translated before anything is written)."""
        self.memory.write_virt(linear, data, access)

    # ------------------------------------------------------------------ registers (Registers)
    def reg(self, name: str) -> int:
        """A general-purpose register, ``rip`` or ``rflags`` by name."""
        return self.registers.read(name)

    def set_reg(self, name: str, value: int) -> None:
        self.registers.write(name, value)

    @property
    def rip(self) -> int:
        return self.registers.read("rip")

    @rip.setter
    def rip(self, value: int) -> None:
        self.registers.write("rip", value)

    def get_regs(self) -> Regs:
        return self.registers.get_regs()

    def set_regs(self, regs: Regs) -> None:
        self.registers.set_regs(regs)

    def get_sregs(self) -> Sregs:
        return self.registers.get_sregs()

    def descriptor_table(self, name: str) -> DescriptorTable:
        """GDTR (``"gdt"``) or IDTR (``"idt"``) without the rest of :meth:`get_sregs`."""
        return self.registers.descriptor_table(name)

    def task_register(self) -> Segment:
        """TR with its descriptor cache, without the rest of :meth:`get_sregs`."""
        return self.registers.task_register()

    def set_sregs(self, sregs: Sregs) -> None:
        """Load control registers, EFER, descriptor tables and segment caches (no checks).

        EFER.LMA is derived as hardware does: LME and CR0.PG (also in the engine, see
        :meth:`cetvm.cpu.registers.Registers.force_efer_lma`). Starting in real mode (the
        RESET/INIT state), in 32-bit protected mode (CS.L=0, D=1, paging off) and in 64-bit mode
        (LME/LMA, CR0.PG, CS.L=1) work.
        """
        self.registers.load_sregs(sregs)
        self.load_segments(cs=sregs.cs, ss=sregs.ss, ds=sregs.ds, es=sregs.es, fs=sregs.fs, gs=sregs.gs)
        self.refresh_mode()

    def get_fpu(self) -> FpuState:
        """x87, SSE and AVX registers (KVM_GET_FPU plus the YMM upper halves)."""
        return self.registers.get_fpu()

    def set_fpu(self, fpu: FpuState) -> None:
        """Load x87, SSE and AVX registers (InputError if a field does not fit its width)."""
        self.registers.set_fpu(fpu)
        self.fpu_writes += 1

    def get_sse(self) -> tuple[int, list[int]]:
        """(MXCSR, [XMM0..15]) only (the guest FPU swap of every KVM_RUN)."""
        return self.registers.get_sse()

    def set_sse(self, mxcsr: int, xmm: list[int]) -> None:
        """Load MXCSR and XMM0-15 (YMM upper halves kept)."""
        self.registers.set_sse(mxcsr, xmm)
        self.fpu_writes += 1

    def load_segments(self, **segments: Segment) -> None:
        """Load segment registers with their descriptor caches; recompute CPL/mode (blob patch)."""
        self.registers.load_segment_caches(segments)
        self.refresh_mode(paging=False)

    def segment(self, name: str) -> Segment:
        return self.registers.segment(name)

    @property
    def cr0(self) -> int:
        return self.registers.cr0

    @property
    def cr4(self) -> int:
        return self.registers.cr4

    @property
    def cr8(self) -> int:
        """CR8, the task-priority register (bits 3:0)."""
        return self.registers.cr8

    def write_cr(self, n: int, value: int) -> None:
        """Write CR0/CR2/CR3/CR4/CR8 without checks (the emulation checks first). Block
        classifications go as TLB entries do [SDM Vol. 3 §4.10.4.1]: a CR3 load drops those
        not on global pages; a CR0/CR4 write that changes how linear addresses translate drops
        all (:data:`_CR0_PAGING_BITS`, :data:`_CR4_PAGING_BITS`)."""
        old = self.cr0 if n == 0 else self.cr4 if n == 4 else 0
        self.registers.write_cr(n, value)
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
        mode = self.memory.mode
        paging = PagingMode(mode.cr0, cr3 & U64_MASK, mode.cr4, mode.efer)
        self.memory.set_mode(paging)
        self._ss_window.forget()
        self._hook.sync_native_mode(paging)

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
        mapping = mapping_of(self.memory.read_phys_u64, self.memory.mode, linear)
        if mapping is None:
            base, size = linear & ~(_LARGEST_PAGE - 1), _LARGEST_PAGE
        else:
            base, size = mapping.page_base, mapping.page_size
        self._blocks.invalidate_range(base, base + size)

    def code_is_global(self, address: int, size: int) -> bool:
        """True if the code at linear [address, address + size) is on global pages only (its
        block classification may outlive a CR3 load, :meth:`write_cr`)."""
        read, mode = self.memory.read_phys_u64, self.memory.mode
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
        return self.registers.xcr0

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        self.registers.xcr0 = value

    def msr(self, index: int) -> int:
        """Host-initiated MSR read (CET MSRs, IA32_XSS and the TSC from the vCPU, the rest from
        Unicorn); HardwareRefused for an MSR the engine does not implement."""
        if index in CET_MSR_SET:
            return cet_msr_value(self.cet, index)
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
            self.cet_machine.set_cet_msr(index, value)
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

    def reset_old_exception(self) -> None:
        """Forget the last exception so the next fault is not promoted to #DF."""
        self.registers.reset_old_exception()

    # ------------------------------------------------------------------ CET registers (VcpuCet)
    @property
    def cet(self) -> CetRegisters:
        """SSP and the CET MSRs (the native hook's shared state on the native path)."""
        return self.cet_machine.regs

    @property
    def ssp(self) -> int:
        return self.cet_machine.regs.ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self.cet_machine.ssp = value

    def cet_msr(self, msr: Msr) -> int:
        """A CET MSR's value (U_CET, S_CET, PL0-3_SSP, INT_SSP_TAB)."""
        return self.cet_machine.cet_msr(msr)

    def set_cet_msr(self, msr: Msr, value: int) -> None:
        """Set a CET MSR without architectural checks (the caller has made them)."""
        self.cet_machine.set_cet_msr(msr, value)

    # ------------------------------------------------------------------ cached mode
    def refresh_mode(self, *, paging: bool = True) -> None:
        """Re-read the mode-defining state the hot paths cache (CPL, 64-bit mode, paging, CR4.CET).

        ``paging=False``: only segment state changed (a segment load: CPL, CS.L, CS.base), so the
        paging mode and the translations cached for it stay (they are kept per access kind,
        user and supervisor apart) — event delivery, IRET and SYSCALL/SYSRET load segments."""
        uc, mode = self._uc, self.mode
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        if paging:
            efer = uc.msr_read(Msr.IA32_EFER)
            self.memory.set_mode(PagingMode(cr0, uc.reg_read(X.UC_X86_REG_CR3), cr4, efer))
        self._ss_window.forget()
        env = self.registers.env
        hflags = env.hflags
        mode.cs_base = env.segment("cs").base
        mode.cpl = hflags & HFlags.CPL_MASK if cr0 & Cr0.PE else 0
        mode.long_mode = bool(hflags & HFlags.CS64)
        mode.code_bits = 64 if mode.long_mode else 32 if hflags & HFlags.CS32 else 16
        mode.cr4_cet = bool(cr4 & Cr4.CET)
        self.cet_machine.update_active()
        self._update_tlb_mode(not cr0 & Cr0.PG)
        self._hook.sync_native_mode(self.memory.mode, flush=paging)

    def _update_tlb_mode(self, paging_off: bool) -> None:
        """Paging off (traced mode only, where MOV to CR0 is emulated and seen): Unicorn's
        virtual-TLB mode with the engine stops' TLB fill, so data pages are not executable to
        the engine and stores stay on its fast path. Paging on: the CPU's own walk of the guest
        page tables (the guest's NX does the same job)."""
        virtual = self.traced and paging_off
        if virtual != self._tlb_virtual:
            self._uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL if virtual else UC_TLB_CPU)
            self._tlb_virtual = virtual

    # ------------------------------------------------------------------ emulation and exits
    def fetch_instruction(self, rip: int) -> "Instruction":
        """Decode the instruction at offset ``rip`` of the code segment (raises GuestFault)."""
        return self._fetch.fetch_instruction(rip)

    def step_in_engine(self, rip: int, next_ip: int | None = None, *, retire: bool = True) -> None:
        """Let the engine execute the one instruction at ``rip`` although it is an exit point
        (:meth:`cetvm.cpu.exit_emulation.ExitEmulation.step_in_engine`)."""
        self._emulation.step_in_engine(rip, next_ip, retire=retire)

    def execute_with_mmio_operand(self, instr: "Instruction", hooks: MmioStepHooks | None = None) -> VmExit | None:
        """Execute ``instr`` (at RIP) whose memory operand is not RAM, as after an engine stop on
        an MMIO access (for instructions cetvm emulates around the engine; ``hooks``: their
        checks of the value read and effects after it)."""
        return self._stops.execute_with_mmio_operand(instr, hooks)

    def add_completion(self, completion: Completion) -> None:
        """Run ``completion`` at the start of the next ``run`` (finishes an exiting instruction).
        A completion may return a further exit (a multi-access MMIO instruction): ``run`` then
        returns it before executing anything."""
        self.completion.set(completion)

    @property
    def exit_pending_completion(self) -> bool:
        """True while the instruction of the last exit still has to be finished (IN/MMIO-read
        data, RIP past HLT/VMCALL/CPUID/...): by :meth:`complete_pending_exit` or the next run."""
        return self.completion.pending

    def complete_pending_exit(self) -> None:
        """Finish the instruction of the last exit now, without running guest code and without
        delivering pending events (KVM's complete_userspace_io(), which runs before anything
        else changes the vCPU). The hypervisor must have stored its results first (IN data in
        the exit's ``io.data``, MMIO read data, RAX of a VMCALL...). Nothing pending: no-op.
        A fault raised by the completion (e.g. an MMIO write re-executed into a #PF) is
        delivered at the next run."""
        if self.completion.complete():
            self.pending_events.end_interrupt_shadow()  # the instruction retired

    def cancel_pending_exit(self) -> None:
        """Forget the completion of the last exit: the exiting instruction is not finished and
        RIP stays at it (e.g. the vCPU is reset, or its registers are replaced wholesale, so
        re-executing the instruction is what should happen). Nothing pending: no-op."""
        self.completion.forget()

    def raise_fault(self, fault: GuestFault) -> None:
        """Queue an architectural fault of the instruction at RIP (RIP must already be at the
        faulting instruction; KVM's injections use ``inject_exception``)."""
        self._blocks.prev = None
        self.pending_events.queue(PendingEvent(fault.vector, fault.error_code, fault.cr2))

    # ------------------------------------------------------------------ activity state
    @property
    def halted(self) -> bool:
        """The CPU is in the HLT activity state (a HLT retired without "HLT exiting") [SDM Vol. 3
        §26.7, §27.4]: an event to deliver wakes it, a run with nothing to deliver ends at once."""
        return self._halted

    def halt(self) -> None:
        """Enter the HLT activity state (HLT retired in the guest: an STI / MOV SS shadow ends)."""
        self.pending_events.end_interrupt_shadow()
        self._halted = True

    # ------------------------------------------------------------------ external interrupts
    def inject_interrupt(self, vector: int) -> None:
        """Queue external interrupt ``vector`` (:meth:`cetvm.cpu.interrupts.PendingEvents.inject_interrupt`)."""
        self.pending_events.inject_interrupt(vector)

    @property
    def pending_interrupt(self) -> int | None:
        """The external interrupt vector waiting for delivery, or None."""
        return self.pending_events.pending_interrupt

    def cancel_interrupt(self) -> None:
        """Drop a pending external interrupt (vCPU reset, state restore)."""
        self.pending_events.cancel_interrupt()

    @property
    def if_flag(self) -> bool:
        """RFLAGS.IF."""
        return self.pending_events.if_flag

    @property
    def interrupt_shadow(self) -> bool:
        """True while the instruction after STI / MOV SS / POP SS has not retired [SDM §6.8.3]."""
        return self.pending_events.interrupt_shadow

    @property
    def interrupt_window_open(self) -> bool:
        """A maskable interrupt would be taken now: IF = 1 and no STI / MOV SS shadow."""
        return self.pending_events.interrupt_window_open

    # ------------------------------------------------------------------ NMI blocking
    @property
    def nmi_blocked(self) -> bool:
        """Blocking by NMI [SDM Vol. 3 §6.7.1] (:mod:`cetvm.cpu.interrupts`); the hypervisor
        reads and writes it through GUEST_INTERRUPTIBILITY_INFO, not here."""
        return self.pending_events.nmi_blocked

    def end_nmi_blocking(self) -> None:
        """IRET executed: NMIs are unblocked (even when the IRET then faults) [SDM Vol. 3
        §6.7.1; §28.2.3 "NMI unblocking due to IRET"]."""
        self.pending_events.nmi_blocked = False

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
        self.registers.xcr0 = value

    def inject_exception(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        """Deliver an exception at the next run (cancels completion of the last exit)."""
        self.completion.cancel()
        self.pending_events.queue(PendingEvent(vector, error_code, cr2, injected=True))

    @property
    def has_pending_event(self) -> bool:
        """An exception or injected event waits for delivery at the next run (KVM: an event in
        the VM-entry interruption-information field; nothing else may be injected before it)."""
        return self.pending_events.has_event

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
        self.budget.left = budget
        self.tsc.sync()
        hook = None
        if budget is not None and self.budget.per_instruction:
            hook = self.budget.add_count_hook(self._uc, self.cet_path == "python")
        try:
            return self._vm_exit(self._run_loop())
        finally:
            if hook is not None:
                self.budget.del_count_hook(self._uc, hook)
            self.budget.left = None

    def _vm_entry(self) -> VmExit | None:
        """VM entry from the current VMCS [SDM Vol. 3 ch. 28]: the guest CET state
        (:meth:`_load_guest_cet_state`), blocking by NMI from GUEST_INTERRUPTIBILITY_INFO, then
        the event of the VM-entry interruption-information field (:meth:`_inject_entry_event`);
        a failed check is a VM-entry failure exit (nothing loaded, nothing run)."""
        vmcs = self.vmcs
        failure = self._load_guest_cet_state(vmcs) if vmcs.entry_loads_cet() else None
        if failure is not None:
            return failure
        interruptibility = vmcs.read(VmcsField.GUEST_INTERRUPTIBILITY_INFO)
        failure = self._entry_event_fault(vmcs.read(VmcsField.VM_ENTRY_INTR_INFO), interruptibility)
        if failure is not None:
            return VmExit(ExitReason.ENTRY_FAILED, self.rip, detail=f"VM entry failed: {failure}")
        self.pending_events.nmi_blocked = bool(interruptibility & GUEST_INTR_STATE_NMI)
        self._inject_entry_event(vmcs)
        return None

    def _entry_event_fault(self, info: int, interruptibility: int) -> str | None:
        """The VM-entry checks of the event to inject [SDM Vol. 3 §28.2.1.3, §28.3.1.5]: an NMI
        has vector 2 and is not injected while blocking by NMI (virtual-NMI blocking) or by MOV SS
        is set, nor on top of an event the CPU still has to deliver. cetvm's CPU takes only NMIs
        from this field (the hypervisor injects exceptions and external interrupts through
        :meth:`inject_exception` / :meth:`inject_interrupt`). Why the entry fails, or None."""
        if not info & INTR_INFO_VALID:
            return None
        kind, vector = (info >> INTR_INFO_TYPE_SHIFT) & 7, info & INTR_INFO_VECTOR_MASK
        if kind != INTR_TYPE_NMI:
            return f"VM_ENTRY_INTR_INFO type {kind}: cetvm's CPU injects only NMIs from this field"
        if vector != Vector.NMI:
            return f"an NMI injected with vector {vector} (must be 2)"
        if interruptibility & (GUEST_INTR_STATE_NMI | GUEST_INTR_STATE_MOV_SS):
            return "an NMI injected while blocking by NMI or by MOV SS is set"
        if self.pending_events.has_event:
            return "an NMI injected while another event waits for delivery"
        return None

    def _inject_entry_event(self, vmcs: Vmcs) -> None:
        """VM-entry event injection [SDM Vol. 3 §28.6]: the NMI is delivered through IDT vector
        2 before the first guest instruction, whatever RFLAGS.IF says; it wakes a halted CPU.
        The entry consumes the field: its valid bit is cleared here ("VM exits clear the valid
        bit"; a run that ends before it enters — the last exit's completion makes one more
        exit — leaves it for the next entry, which KVM sees as an injection still in flight)."""
        info = vmcs.read(VmcsField.VM_ENTRY_INTR_INFO)
        if info & INTR_INFO_VALID:
            vmcs.write(VmcsField.VM_ENTRY_INTR_INFO, info & ~INTR_INFO_VALID)
            self.pending_events.queue(PendingEvent(Vector.NMI, injected=True, nmi=True))

    def _load_guest_cet_state(self, vmcs: Vmcs) -> VmExit | None:
        """With LOAD_CET_STATE: check GUEST_S_CET, GUEST_SSP and GUEST_INTR_SSP_TABLE and load
        them [SDM Vol. 3 §28.3.1.1, §28.3.2.1]; the failure exit or None."""
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
            vmcs.write(VmcsField.GUEST_INTERRUPTIBILITY_INFO, self._interruptibility())
        self.completion.last_exit = exit_
        vmcs.record_exit(exit_)
        return exit_

    def _interruptibility(self) -> int:
        """GUEST_INTERRUPTIBILITY_INFO as VM exit saves it [SDM Vol. 3 §29.3.4]: blocking by NMI,
        and the shadow of the last instruction (STI's when RFLAGS.IF is 1, else MOV SS's: the
        engine keeps one shadow flag for both)."""
        events_ = self.pending_events
        state = GUEST_INTR_STATE_NMI if events_.nmi_blocked else 0
        if events_.interrupt_shadow:
            state |= GUEST_INTR_STATE_STI if events_.if_flag else GUEST_INTR_STATE_MOV_SS
        return state

    # ------------------------------------------------------------------ exact instruction budget
    @property
    def instructions_retired(self) -> int:
        """Instructions retired by this vCPU (exact; at instruction granularity only while a run has
        a budget, see :mod:`cetvm.cpu.budget`)."""
        return self.budget.retired

    @instructions_retired.setter
    def instructions_retired(self, value: int) -> None:
        self.budget.retired = value

    # ------------------------------------------------------------------ run loop
    def _run_loop(self) -> VmExit:
        events_ = self.pending_events
        budget = self.budget
        linear = self.mode.linear
        window_exiting = self.vmcs.cpu_based(CpuBasedControls.INTERRUPT_WINDOW_EXITING)
        nmi_window_wanted = self.vmcs.cpu_based(CpuBasedControls.NMI_WINDOW_EXITING)
        nmi_window_exiting = nmi_window_wanted
        while True:
            if events_.pending_interrupt is not None:
                if not events_.has_event and events_.interrupt_window_open:
                    self._stops.complete_terminator_before_interrupt(linear(self.rip))
                events_.take_deliverable_interrupt()
            event = events_.take()
            if event is not None:
                self._halted = False  # an event ends the HLT activity state
                if not (event.software or event.injected) and event.vector < 32 \
                        and self.vmcs.read(VmcsField.EXCEPTION_BITMAP) >> event.vector & 1:
                    return VmExit(ExitReason.EXCEPTION, self.rip, exception=ExceptionExit(event.vector, event.error_code, event.cr2))
                if software_exception_exits(event, self.vmcs):  # INT3 / INTO [SDM Vol. 3 §26.2]
                    length, self.rip = self.rip - event.instruction_rip, event.instruction_rip
                    return VmExit(ExitReason.EXCEPTION, self.rip, length, exception=ExceptionExit(event.vector, software=True))
                exit_ = events.deliver(self, event)
                if exit_ is not None:
                    return exit_
                if event.nmi:  # [SDM Vol. 3 §6.7.1]: NMIs blocked until the next IRET
                    events_.nmi_blocked = True
                continue
            if budget.left is not None and budget.left <= 0:
                return VmExit(ExitReason.BUDGET, self.rip)
            if nmi_window_exiting:  # before the interrupt window [SDM Vol. 3 §26.7.6, Table 7-2]
                if events_.nmi_window_open:
                    self._halted = False
                    return VmExit(ExitReason.NMI_WINDOW, self.rip)
                nmi_window_exiting = False
            if window_exiting:  # checked at VM entry, after the events it delivers (see cetvm.cpu.vmcs)
                if events_.interrupt_window_open:
                    self._halted = False  # the exit leaves the HLT activity state
                    return VmExit(ExitReason.INTERRUPT_WINDOW, self.rip)
                window_exiting = False
            if self._halted:
                return VmExit(ExitReason.BUDGET, self.rip)
            rip = self.rip
            if linear(rip) in self._exit_points:
                exit_ = self._emulation.emulate_at(rip)
                if exit_ is None and self._watching_window and events_.interrupt_window_open:
                    # an emulated IRETQ / SYSRET / RSM opened the window the engine was watching
                    window_exiting = self.vmcs.cpu_based(CpuBasedControls.INTERRUPT_WINDOW_EXITING)
            elif self.mode.cpl == 3 and self._alignment_checked():
                exit_ = self._step_alignment_checked(rip)
            else:
                self._watch_interrupt_window(events_)
                exit_ = self._run_engine(rip)
                if exit_ is None and self._watching_window and self._hook.take_window_stop():
                    # the window opened at a block start: the interrupt (or the window exit) now
                    window_exiting = self.vmcs.cpu_based(CpuBasedControls.INTERRUPT_WINDOW_EXITING)
            if nmi_window_wanted:
                # an IRETQ emulated here or handed over by the native one unblocked NMIs, or the
                # watched shadow ended
                nmi_window_exiting = events_.nmi_window_open
            if exit_ is not None:
                if not (exit_.reason is ExitReason.HLT and events_.wakes_halt()):
                    return exit_
                self.complete_pending_exit()  # the HLT retires; the interrupt is taken next

    def _watch_interrupt_window(self, events_: PendingEvents) -> None:
        """Before an engine run: an interrupt waits — injected, or the window exit requested —
        but RFLAGS.IF = 0 or an STI / MOV SS shadow blocks it: the block hook watches for the
        window (:meth:`BlockHook.watch_interrupt_window`); told only when that changes. An NMI
        window blocked only by the shadow is watched the same way (decision: the watch stops
        where IF = 1 and the shadow is over, so a MOV SS shadow with IF = 0 opens the NMI
        window at the next VM entry instead)."""
        vmcs = self.vmcs
        waiting = (events_.pending_interrupt is not None or vmcs.cpu_based(CpuBasedControls.INTERRUPT_WINDOW_EXITING)
                   or (vmcs.cpu_based(CpuBasedControls.NMI_WINDOW_EXITING) and not events_.nmi_blocked))
        watch = waiting and not events_.interrupt_window_open
        if watch != self._watching_window:
            self._watching_window = watch
            self._hook.watch_interrupt_window(self.registers.env.address if watch else None)

    def _run_engine(self, rip: int) -> VmExit | None:
        budget, stops, linear = self.budget, self._stops, self.mode.linear
        budget.hit = False
        if self._native_events is not None:
            vmcs = self.vmcs
            self._native_events.before_run(self.pending_events.pending_interrupt is not None,
                                           vmcs.read(VmcsField.EXCEPTION_BITMAP), self.pending_events.nmi_blocked)
            self._exit_insns.set_cpu_based_controls(vmcs.read(VmcsField.CPU_BASED_VM_EXEC_CONTROL))
            self._exit_insns.set_tpr_threshold(vmcs.read(VmcsField.TPR_THRESHOLD))
        handed_over: int | None = None
        try:
            self._emu_start_keeping_cr2(rip)
            self._hook.raise_hook_error()
            handed_over = self._hook.apply_native_handover()
            if self.tsc.error is not None:
                error, self.tsc.error = self.tsc.error, None
                raise error
        except UcError as err:
            if err.errno == UC_ERR_INSN_INVALID:
                return stops.on_invalid_stop()
            if err.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED):
                return stops.on_unmapped_stop(err.errno)
            raise CetvmError(f"engine error at RIP {self.rip:#x}: {err}") from None
        if budget.hit:
            stops.forget_terminator_not_run(linear(self.rip))
        if not self.pending_events.has_event:
            self.registers.clear_stale_old_exception()
        if not self.traced:
            self.refresh_mode()  # native IRETQ/SYSRET/far transfers may have changed CPL or mode
        # an instruction to emulate: what the native events left to Python, or (untraced) a SYSCALL
        syscall_at = stops.take_syscall() if handed_over is None else handed_over
        if syscall_at is not None:
            self.rip = syscall_at
            return self._emulation.emulate_at(syscall_at)
        if self.pending_events.has_event or budget.hit or linear(self.rip) in self._exit_points:
            return None
        if not self.traced:
            # Untraced mode: Unicorn stops by itself only after HLT (RIP past it).
            return VmExit(ExitReason.HLT, (self.rip - 1) & U64_MASK, 1)
        return None

    def _alignment_checked(self) -> bool:
        """CPL 3 with CR0.AM and RFLAGS.AC (:mod:`cetvm.cpu.alignment`)."""
        return alignment_checked(self.mode.cpl, self.memory.mode.cr0, self.reg("rflags"))

    def _step_alignment_checked(self, rip: int) -> VmExit | None:
        """One instruction with alignment checking [SDM Vol. 3 §6.15]: #AC(0) when it would
        access misaligned data, else the engine runs it alone (a budget of one instruction for
        this engine run; the run's own budget is charged what it retired)."""
        try:
            instr = self._fetch.fetch_instruction(rip)
        except GuestFault:
            return self._run_engine(rip)  # the engine raises the fetch fault itself
        if misaligned_access(instr, lambda reg: read_register(self, reg), self._segment_base):
            self.raise_fault(GuestFault(Vector.AC, 0))
            return None
        budget = self.budget
        if budget.per_instruction and budget.left is None:
            return self._run_engine(rip)  # no count hook installed: no way to stop after one
        left, before = budget.left, budget.retired
        budget.left = 1
        try:
            return self._run_engine(rip)
        finally:
            used = budget.retired - before
            budget.left = None if left is None else max(0, left - used)

    def _segment_base(self, segment: int) -> int:
        if segment == Register.FS:
            return self.msr(Msr.IA32_FS_BASE)
        if segment == Register.GS:
            return self.msr(Msr.IA32_GS_BASE)
        return 0

    def _emu_start_keeping_cr2(self, rip: int) -> None:
        """One engine run from ``rip`` (then, if the block hook stopped it for want of budget, the
        instructions the budget has left: :meth:`BlockHook.run_fenced`) with the guest's CR2 kept.
        However the run ends — an engine error too (an invalid instruction, an access to memory
        with no RAM), which the run loop then decodes and emulates at the stop — the cached mode
        follows the CPL the native events left (a SYSCALL delivered in the engine after a run
        started at CPL3: the stop is decoded and its block's instructions counted with CPL0's
        rights) and CR2 is the last #PF they delivered."""
        budget = self.budget
        try:
            with cr2_kept(self._uc):
                if not budget.per_instruction:
                    self._blocks.close_last()
                if self._native_events is None:
                    self._uc.emu_start(rip, 0)
                else:  # the plain exit-point instructions are done in C (cetfast_run)
                    status = self._native_events.run(rip)
                    if self._exit_insns is not None:
                        # the exits answered there charged their guest time to the run's budget:
                        # it was no instruction (the hypervisor counts the exits)
                        budget.retired -= self._exit_insns.take_exit_charges()
                    if status:
                        raise UcError(status)
                self._hook.sync_native_events_mode()
                stop = budget.take_stop()
                if stop and budget.left:
                    self._hook.run_fenced(self.rip, stop, budget.left)
        finally:
            self._after_native_events()

    def _native_cr3_write(self, value: int) -> int:
        """cetfast_run's MOV to CR3 (checks done there, as :func:`cetvm.cpu.emulate.mov_to_cr`'s):
        the load itself, 0 when done; an error is kept for after the run, 1."""
        try:
            self.write_cr(3, value)
        except BaseException as exc:  # noqa: BLE001 - cannot propagate through the engine
            self._hook.on_hook_error(exc)
            return 1
        return 0

    @property
    def native_exit_insns(self) -> NativeExitInsns | None:
        """The port I/O and CR3 loads done in C at exit points, for the hypervisor to configure
        (coalesced PIO ports, published port values) and to collect (the OUTs done): None
        without the native events."""
        return self._exit_insns

    def _after_native_events(self) -> None:
        """After an engine run: the mode and CR2 the native events left (see above)."""
        if self._native_events is None:
            return
        self._hook.sync_native_events_mode()
        cr2 = self._native_events.take_delivered_cr2()
        if cr2 is not None:  # a #PF the native events delivered: CR2 is the guest's now
            self._uc.reg_write(X.UC_X86_REG_CR2, cr2)

    # ------------------------------------------------------------------ misc
    @property
    def unicorn(self) -> Uc:
        """The underlying engine (for the native-hook work and diagnostics only)."""
        return self._uc

    @property
    def native_event_counts(self) -> dict[str, int] | None:
        """How many SYSCALLs, SYSRETs, IRETs and #PFs the native path delivered inside the engine,
        and how many it left to Python (None when the native events are not in use)."""
        return None if self._native_events is None else self._native_events.stats

    @property
    def block_count(self) -> int:
        return len(self._blocks)
