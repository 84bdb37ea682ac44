"""The vCPU's block-start part: the traced-mode block hook on its three CET paths (native,
Python fast path, reference), block classification and the per-block instruction budget.

:class:`BlockHook` installs the UC_HOOK_BLOCK callback through Unicorn's C API — the native C
hook of :mod:`cetvm.cpu.native`, the flat Python common case of :mod:`cetvm.cpu.fastpath` in
front of the reference, or the reference alone — classifies blocks (instructions cetvm emulates
become exit points, :mod:`cetvm.cpu.exit_points`), runs the reference block-start handling
(:func:`cetvm.cpu.cet.transfer.on_block_start`) and carries out its decisions
(:meth:`BlockHook.apply_decision`, the one place a CET fault of a branch is made pending), takes
the native hook's hand-overs — on the native path with block-granular budgets also those of the
native event delivery (:class:`cetvm.cpu.native.NativeEvents`: SYSCALL, SYSRETQ, IRETQ and the
common #PF inside the engine, which this part installs, claims at classification and keeps in
step with the cached mode) — and keeps the books of what the block that ran last retired
(:mod:`cetvm.cpu.budget`).

Hot path: the reference hook :meth:`BlockHook.on_block` runs at every block start the fast
paths do not handle; the parts it reads (cached mode, block table, budget) are bound to the
hook once, so a block start follows one attribute per part.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from iced_x86 import Code, Instruction, Mnemonic
from unicorn import UC_HOOK_BLOCK, Uc, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError
from cetvm.arch.msr import CetCtl
from cetvm.arch.regs import RFLAGS_IF, U64_MASK
from cetvm.cpu import decode
from cetvm.cpu.blocks import BlockInfo, BlockTable, BlockTracker
from cetvm.cpu.budget import InstructionBudget
from cetvm.cpu.cet.transfer import BlockAction, BlockDecision, Terminator, classify_terminator, on_block_start
from cetvm.cpu.exit_points import ExitPoints
from cetvm.cpu.fastpath import ShadowStackWindow, make_block_hook
from cetvm.cpu.flag_sync import FlagSync
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.mode import CpuMode, InstructionFetch
from cetvm.cpu.native import NativeCet, NativeEvents, PagingKind
from cetvm.cpu.paging import PagingMode
from cetvm.cpu.registers import Registers
from cetvm.cpu.uc_context import EngineCpu, HFlags
from cetvm.cpu.vcpu_cet import VcpuCet

_TRACKER = int(CetCtl.TRACKER)
#: void hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
_BLOCK_HOOK_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


class BlockHook:
    """Block starts of one vCPU: classification, the CET state machine, the per-block budget."""

    def __init__(self, uc: Uc, *, mode: CpuMode, cet: VcpuCet, blocks: BlockTable, budget: InstructionBudget,
                 exits: ExitPoints, fetch: InstructionFetch, registers: Registers, window: ShadowStackWindow,
                 raise_fault: Callable[[GuestFault], None], code_is_global: Callable[[int, int], bool],
                 refresh_mode: Callable[..., None], native: NativeCet | None, engine_cpu: EngineCpu | None) -> None:
        self._uc = uc
        self._engine_cpu = engine_cpu
        self._mode = mode
        self._cet = cet
        self._blocks = blocks
        self._budget = budget
        self._exits = exits
        self._fetch = fetch
        self._registers = registers
        self._window = window
        self._raise_fault = raise_fault
        self._code_is_global = code_is_global
        self._refresh_mode = refresh_mode
        self._native = native
        #: SYSCALL/SYSRETQ/IRETQ/#PF in the engine (:meth:`install_native_events`)
        self._native_events: NativeEvents | None = None
        self._new_event_hooks = False
        #: the engine's lazy flags made whole in front of CMPXCHG8B/16B (cetvm.cpu.flag_sync)
        self._flag_sync = FlagSync(uc, native)
        self._hook_error: BaseException | None = None
        self._reg_buf = ctypes.c_uint64()
        self._block_hook_cb = None
        self._window_stopped = False

    # ------------------------------------------------------------------ installation
    def install_python_hook(self, fast_path: bool) -> None:
        """Register the block hook straight through Unicorn's C API (ctypes): about twice as fast
        as the binding's wrapper, and the shape the native C hook has too. The hook is the
        common-case path of :mod:`cetvm.cpu.fastpath` in front of :meth:`on_block` (the
        reference), or the reference alone when ``fast_path`` is False."""
        if fast_path:
            assert isinstance(self._blocks, BlockTracker)
            hook = make_block_hook(self._mode, self._cet.regs, self.on_block, self._blocks, self._window,
                                   self.on_hook_error, self._budget.block_store)
        else:
            hook = self._on_block_raw
        self._block_hook_cb = _BLOCK_HOOK_CFUNC(hook)
        handle = uc_hook_h()
        status = uclib.uc_hook_add(self._uc._uch, ctypes.byref(handle), UC_HOOK_BLOCK,
                                   ctypes.cast(self._block_hook_cb, ctypes.c_void_p), ctypes.c_void_p(0),
                                   ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise CetvmError(f"cannot install the block hook (unicorn error {status})")

    def install_native_events(self) -> NativeEvents:
        """SYSCALL, SYSRETQ, IRETQ and #PF delivered in the engine (:class:`cetvm.cpu.native.NativeEvents`;
        block-granular budgets only: their instructions are counted with their block). It holds
        IA32_PL0..3_SSP, so they move from the CET registers into it. The vCPU installs its #PF
        hook in place of the Python interrupt hook (``NativeEvents.install_page_faults``)."""
        assert self._native is not None
        events = NativeEvents(self._uc, self._native)
        regs = self._cet.regs
        events.pl_ssp[:] = list(regs.pl_ssp)
        regs.pl_ssp = events.pl_ssp
        events.set_enabled(True)
        self._native_events = events
        return events

    def sync_native_mode(self, paging_mode: PagingMode, *, flush: bool = True) -> None:
        """Tell the native hook the mode it checks per block (after every mode change); ``flush``:
        and forget its cached shadow-stack translations (not needed when only segments changed:
        they are kept per user-ness)."""
        native, mode = self._native, self._mode
        if native is None:
            return
        paging = (PagingKind.FOUR_LEVEL if paging_mode.long_paging
                  else PagingKind.OTHER if paging_mode.paging else PagingKind.OFF)
        native.sync_mode(cpl=mode.cpl, long_mode=mode.long_mode, cr4_cet=mode.cr4_cet, paging=paging,
                         cr3=paging_mode.cr3, cs_base=mode.cs_base)
        if flush:
            native.flush_translations()

    def sync_native_events_mode(self) -> None:
        """The native events changed the CPL inside the engine: re-read the cached mode (segment
        state only: the vCPU's ``refresh_mode(paging=False)``)."""
        if self._native_events is not None and self._native_events.mode_moved():
            self._refresh_mode(paging=False)

    # ------------------------------------------------------------------ errors inside hooks
    def on_hook_error(self, exc: BaseException) -> None:
        """An exception inside a hook: keep it for :meth:`raise_hook_error`, stop the engine."""
        self._hook_error = exc
        if self._native is not None:
            self._native.note_callback_error()
        self._uc.emu_stop()

    def raise_hook_error(self) -> None:
        """After the engine stopped: re-raise what a hook raised (ctypes swallowed it)."""
        if self._native is not None:
            self._native.raise_callback_error()
        if self._hook_error is not None:
            error, self._hook_error = self._hook_error, None
            raise error

    # ------------------------------------------------------------------ the CET state machine
    def apply_native_handover(self) -> int | None:
        """After a run on the native path: take what the native hooks left to us — a block start
        (run the reference state machine for it) and an instruction the native events left to
        Python, whose RIP is returned for the run loop to emulate (None: none)."""
        if self._native is None:
            return None
        self.sync_native_events_mode()
        handed_over = None if self._native_events is None else self._take_native_event_handover()
        request = self._native.take_handover()
        if request is not None:
            first = self._first_bytes(request.block_addr)
            self.apply_decision(on_block_start(self._cet, request.terminator, request.block_addr,
                                               self._registers.read("rsp"), first))
        return handed_over

    def _take_native_event_handover(self) -> int | None:
        """An instruction the native events left to Python (cetfast.c "Native events"): it did
        not retire; its RIP is returned for the run loop to emulate. If the code there is no
        SYSCALL, SYSRETQ or IRETQ any more (rewritten), its hook goes, the engine runs the
        instruction and None is returned."""
        events = self._native_events
        assert events is not None
        rip = events.take_handover()
        if rip is None:
            return None
        self.retire_before(rip)
        self._registers.write("rip", rip)
        try:
            instr = self._fetch.fetch_instruction(rip)
        except (GuestFault, UcError):
            instr = None
        if instr is not None and (instr.code in (Code.SYSRETQ, Code.IRETQ) or instr.mnemonic == Mnemonic.SYSCALL):
            return rip
        pc = self._mode.linear(rip)
        events.unhook_return(pc)
        self._uc.ctl_remove_cache(pc, pc + 1)
        return None

    def apply_decision(self, decision: BlockDecision, *, counted: bool = True) -> bool:
        """Carry out a block-start decision of :mod:`cetvm.cpu.cet.transfer`: on FAULT, roll
        RIP (and RSP: ``decision.rsp``, or the current RSP + ``rsp_adjust`` when the state machine
        did not read RSP) back to the terminator, take back the terminator's count when it was
        counted as retired (``counted``) and make the fault the pending event. True when it
        faulted (the caller stops the engine if it runs inside it)."""
        if decision.action != BlockAction.FAULT:
            return False
        if counted:
            self.terminator_faulted(decision)
        uc = self._uc
        if decision.rsp is not None:
            uc.reg_write(X.UC_X86_REG_RSP, decision.rsp)
        elif decision.rsp_adjust:
            uc.reg_write(X.UC_X86_REG_RSP, (self._fast_rsp() + decision.rsp_adjust) & U64_MASK)
        uc.reg_write(X.UC_X86_REG_RIP, decision.rip)
        self._raise_fault(decision.fault)
        return True

    def _on_block_raw(self, _uch: int, address: int, size: int, _user: int) -> None:
        try:
            self.on_block(address, size)
        except BaseException as exc:  # ctypes would swallow it: re-raised after emu_start
            self.on_hook_error(exc)

    def _fast_rsp(self) -> int:
        uclib.uc_reg_read(self._uc._uch, X.UC_X86_REG_RSP, ctypes.byref(self._reg_buf))
        return self._reg_buf.value

    def on_block(self, address: int, size: int) -> None:
        """At each block start: classify on a miss, run the CET state machine (the reference
        hook; :mod:`cetvm.cpu.fastpath` handles the common cases in front of it and calls this,
        with nothing committed, for everything else), then retire the block's instructions — or,
        when the budget has fewer left, stop in front of it (:meth:`_stop_for_budget`)."""
        if self._mode.stepping:
            return
        blocks = self._blocks
        info = blocks.cache.get(address)
        if info is None or info.size != size:
            info = self.classify_block(address, size)
            if info is None:
                blocks.last_run = None
                return
        if not self._cet_block_start(info, address):
            blocks.last_run = None
            return
        if self._mode.irq_window_watch and self._interrupt_window_open():
            self._stop_for_window(address)
            return
        budget = self._budget.block_store
        if budget is not None:
            if budget.budget_left < info.icount:
                self._stop_for_budget(address, size)
                return
            budget.budget_left -= info.icount
            blocks.last_run = info

    def _cet_block_start(self, info: BlockInfo, address: int) -> bool:
        """The CET state machine at the start of block ``info``; False if it faulted (then the
        fault is pending, RIP and RSP are the faulting instruction's and the engine stops).

        Shortcut (engine decision, no CET semantics): with no pending terminator and the
        current CPL's IBT tracker idle, :func:`on_block_start` has nothing to do and is skipped.
        """
        blocks = self._blocks
        prev = blocks.prev
        blocks.prev = info.terminator
        blocks.prev_block_start = address
        mode = self._mode
        if not mode.cet_active:
            return True
        regs = self._cet.regs
        if prev is None and not (regs.u_cet if mode.cpl == 3 else regs.s_cet) & _TRACKER:
            return True
        # RSP is read only on a fault (BlockDecision.rsp_adjust): one register read less per block.
        if not self.apply_decision(on_block_start(self._cet, prev, address, None, info.first_bytes)):
            return True
        self._uc.emu_stop()
        return False

    def apply_pending_terminator(self, linear: int) -> None:
        """Apply the previous block's terminator when the next "block" is an emulated instruction
        at ``linear``."""
        prev = self._blocks.take_prev(None)
        if prev is None or not self._mode.cet_active:
            return
        self.apply_decision(on_block_start(self._cet, prev, linear, self._registers.read("rsp"),
                                           self._first_bytes(linear)))

    def _first_bytes(self, linear: int) -> bytes:
        try:
            return self._fetch.read_code(linear, 4)
        except (GuestFault, UcError):
            return b""

    # ------------------------------------------------------------------ classification
    def _claimed_by_native_events(self, instr: Instruction) -> bool:
        """``instr`` (which needs emulation) is delivered by the native events instead of an exit:
        SYSCALL always (its hook is per instruction type), SYSRETQ and IRETQ through a hook at
        their address (new hooks are marked in ``self._new_event_hooks``: the block is
        translated again)."""
        events = self._native_events
        if events is None or self._mode.code_bits != 64:
            return False
        if instr.mnemonic == Mnemonic.SYSCALL:
            return True
        if instr.code in (Code.SYSRETQ, Code.IRETQ):
            if events.hook_return(instr.ip, iret=instr.code == Code.IRETQ):
                self._new_event_hooks = True
            return True
        return False

    def _cut_short(self, instr: Instruction, block_end: int) -> bool:
        """``instr`` decodes as no instruction only because the block ends inside it: the engine
        ends a block at an instruction breakpoint (DR7) after that instruction's first byte."""
        if instr.mnemonic != Mnemonic.INVALID or instr.next_ip < block_end:
            return False
        try:
            code = self._fetch.read_code(instr.ip, decode.MAX_INSTRUCTION_LENGTH)
        except (GuestFault, UcError):
            return False
        return decode.decode_one(code, instr.ip, self._mode.code_bits).mnemonic != Mnemonic.INVALID

    def learn_block_bounds(self, address: int, size: int) -> None:
        """A #PF inside the block at ``address`` went to Python: give the native delivery its
        instruction boundaries (it takes back the instructions from the faulting one on), so
        the next #PF in that block stays in the engine. Learned here rather than at every
        classification, which is far more frequent than page faults."""
        if self._native_events is None:
            return
        try:
            instrs = self._fetch.decode_block(address, size)
        except (GuestFault, UcError):
            return
        self._native_events.store_bounds(address, size, bytes([i.len for i in instrs]))

    def classify_block(self, address: int, size: int) -> BlockInfo | None:
        """Decode a new block; make emulated instructions exits, give SYSRETQ/IRETQ their native
        event hooks and CMPXCHG8B/16B their flag hooks (any of them new: restart, returns None)."""
        self.sync_native_events_mode()  # the code is read with the current CPL's rights
        try:
            code = self._fetch.read_code(address, size)
        except (GuestFault, UcError):
            code = b""
        instrs = decode.decode_block(code, address, self._mode.code_bits)
        exits = self._exits
        self._new_event_hooks = False
        new_exits = [i.ip for i in instrs if decode.needs_emulation(i) and i.ip not in exits
                     and not self._claimed_by_native_events(i) and not self._cut_short(i, address + size)]
        new_flag_hooks = self._flag_sync.claim(instrs)
        if new_exits or self._new_event_hooks or new_flag_hooks:
            exits.update(new_exits)
            exits.sync()
            exits.drop_translations(address, address + size)
            self._uc.reg_write(X.UC_X86_REG_RIP, address - self._mode.cs_base)  # RIP is the offset
            self._uc.emu_stop()
            return None
        terminator = classify_terminator(instrs[-1]) if instrs else None
        if terminator is not None and terminator.kind == Terminator.FALLTHROUGH:
            terminator = None  # nothing to apply at the next block start
        info = BlockInfo(address, size, terminator, code[:4], len(instrs), self._code_is_global(address, size))
        self._blocks.store(info)
        return info

    # ------------------------------------------------------------------ interrupt window
    def watch_interrupt_window(self, env_address: int | None) -> None:
        """An external interrupt waits (injected, or an interrupt-window exit requested) while
        RFLAGS.IF = 0 or an STI / MOV SS shadow blocks it: until the next call with None, stop
        the engine in front of the first block that starts with the window open, so the run
        loop takes the interrupt at that instruction boundary [SDM Vol. 3 §6.8.1, §6.8.3] —
        not at the next exit (kvm-unit-tests' eventinj "vec 32/33" and ioapic "simultaneous
        edge interrupts": ``sti; nop; cli``). QEMU ends a block after an STI, after the
        instruction in its shadow and after a POPF, so a block start is where the window opens.
        ``env_address``: the engine's CPUX86State (for the native hook; cetfast.c "Interrupt
        window")."""
        self._mode.irq_window_watch = env_address is not None
        if self._native is not None:
            self._native.set_irq_window_watch(env_address)

    def take_window_stop(self) -> bool:
        """The watch stopped the engine in front of a block (since the last call)."""
        stopped, self._window_stopped = self._window_stopped, False
        if self._native is not None and self._native.take_irq_window_stop():
            stopped = True
        return stopped

    def _interrupt_window_open(self) -> bool:
        """RFLAGS.IF = 1 and no STI / MOV SS shadow (QEMU's HF_INHIBIT_IRQ), read at a block start
        where the engine's flags are exact."""
        registers = self._registers
        return bool(registers.read("rflags") & RFLAGS_IF) and not registers.env.hflags & HFlags.INHIBIT_IRQ

    def _stop_for_window(self, address: int) -> None:
        """Stop in front of the block at ``address`` (its block start is done, it does not run:
        no terminator pending), as :meth:`_stop_for_budget` does."""
        self._window_stopped = True
        self._blocks.prev = None
        self._blocks.last_run = None
        self._uc.reg_write(X.UC_X86_REG_RIP, address - self._mode.cs_base)
        self._uc.emu_stop()

    # ------------------------------------------------------------------ what the last block retired
    def _stop_for_budget(self, address: int, size: int) -> None:
        """The block at ``address`` has more instructions than the budget has left: its block
        start is done (the CET state is whole wherever the run ends) but it does not run — no
        terminator pending, the engine stops in front of it (the Python twin of cetfast.c's
        budget_stop; the vCPU then runs the instructions left, :meth:`run_fenced`)."""
        self._budget.store.budget_stop = size or 1
        self._blocks.prev = None
        self._blocks.last_run = None
        self._uc.reg_write(X.UC_X86_REG_RIP, address - self._mode.cs_base)
        self._uc.emu_stop()

    def run_fenced(self, rip: int, size: int, count: int) -> None:
        """Run exactly the first ``count`` instructions of the block at ``rip`` (``size`` bytes),
        which has more: the block hook stopped the engine in front of it for want of budget. A
        temporary exit after them makes the engine translate the block short and stop there;
        the block's translations are dropped before and after (Unicorn's exits act when a block
        is translated; ``rip`` is the offset, the block and the exit are linear)."""
        pc = self._mode.linear(rip)
        instrs = self._fetch.decode_block(pc, size)
        if count >= len(instrs):
            # The block was rewritten since it was classified, to the same size (self-modifying
            # code): classify it again; the run loop enters it anew with the right count.
            self.classify_block(pc, size)
            return
        if self._engine_cpu is not None:
            self._run_first_instructions(rip, count)
            return
        fence = instrs[count].ip
        exits = self._exits
        added = fence not in exits
        if added:
            exits.add(fence)
            exits.sync()
        exits.drop_translations(pc, pc + size)
        try:
            self._uc.emu_start(rip, 0)
        finally:
            if added:
                exits.discard(fence)
                exits.sync()
            exits.drop_translations(pc, pc + size)

    def _run_first_instructions(self, rip: int, count: int) -> None:
        """run_fenced through the engine's next-block request (:class:`cetvm.cpu.uc_context.EngineCpu`):
        a translation block of the first ``count`` instructions (cached beside the block's own),
        whose ``count`` instructions are all the budget has left, so the block hook stops the
        engine in front of the next block — a stop the run loop does not act on (it is out of
        budget)."""
        assert self._engine_cpu is not None
        try:
            with self._engine_cpu.first_instructions(count):
                self._uc.emu_start(rip, 0)
        finally:
            self._budget.take_stop()

    def retire_before(self, rip: int) -> None:
        """The engine stopped at ``rip`` without executing the instruction there (a fault, an MMIO
        access, an invalid instruction): at block granularity, of the block that ran last only
        the instructions before ``rip`` retired — the rest, counted when the block started, are
        taken back (:mod:`cetvm.cpu.budget`); at instruction granularity the instruction at
        ``rip`` is."""
        budget = self._budget
        if budget.per_instruction:
            budget.unretire()
            return
        blocks = self._blocks
        last = blocks.last
        blocks.close_last()
        if last is None:
            return
        address, size, icount = last
        pc = self._mode.linear(rip)
        if not address <= pc < address + size:
            return
        ran = 0
        if pc > address:
            try:
                ran = len(self._fetch.decode_block(address, pc - address))
            except (GuestFault, UcError):
                ran = 0
        budget.uncount(icount - min(ran, icount))

    def branch_did_not_retire(self) -> None:
        """The branch that ended the block that ran last faulted after the engine moved RIP to
        its target (a non-canonical target: #GP): it did not retire."""
        budget = self._budget
        if budget.per_instruction:
            budget.unretire()
            return
        last = self._blocks.last
        self._blocks.close_last()
        if last is not None:
            budget.uncount(1)

    def terminator_faulted(self, decision: BlockDecision) -> None:
        """A CET fault of the pending terminator itself (#CP(1) at a RET, a shadow-stack fault of a
        CALL: ``decision.rolled_back``): the terminator did not retire, but it was counted — as
        its block started (block granularity) or as it started (instruction granularity)."""
        if not decision.rolled_back:
            return
        if self._budget.per_instruction:
            self._budget.unretire()
        else:
            self._budget.uncount(1)
