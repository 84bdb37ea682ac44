"""The traced-mode block hook of a vCPU on its three CET paths (native, Python fast path, reference).

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change): installing the
UC_HOOK_BLOCK callback through Unicorn's C API — the native C hook of :mod:`cetvm.cpu.native`,
the flat Python common case of :mod:`cetvm.cpu.fastpath` in front of the reference, or the
reference alone — block classification (instructions cetvm emulates become Unicorn exits), the
reference block-start handling (:func:`cetvm.cpu.cet.transfer.on_block_start`) and the native
hook's hand-overs.

A mixin of :class:`~cetvm.cpu.vcpu.Vcpu`, not a separate object, on purpose: the hook runs at
every block start and reads the vCPU's cached mode (``cpl``, ``cet_active``, ``stepping``,
``_blocks``, ``cet``) as plain attributes of one object; a composed object would add an
attribute-chain lookup per block (and :mod:`cetvm.cpu.fastpath` reads the same attributes).
"""

from __future__ import annotations

import ctypes

from iced_x86 import Code, Mnemonic
from unicorn import UC_HOOK_BLOCK, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError
from cetvm.arch import Vector
from cetvm.arch.msr import CetCtl
from cetvm.cpu import decode
from cetvm.cpu.blocks import BlockInfo
from cetvm.cpu.cet.transfer import BlockAction, BlockDecision, Terminator, classify_terminator, on_block_start
from cetvm.cpu.fastpath import make_block_hook
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.native import NativeCet, NativeEvents, PagingKind, native_events_requested
from cetvm.arch.regs import U64_MASK as _U64

_TRACKER = int(CetCtl.TRACKER)
#: void hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
_BLOCK_HOOK_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


class BlockHookMixin:
    """Block-start handling of :class:`~cetvm.cpu.vcpu.Vcpu` (uses its attributes directly)."""

    def _install_block_hook(self) -> None:
        """Register the block hook straight through Unicorn's C API (ctypes): about twice as fast
        as the binding's wrapper, and the shape the native C hook has too. The hook is the
        common-case path of :mod:`cetvm.cpu.fastpath` in front of :meth:`_on_block` (the
        reference), or :meth:`_on_block_raw` alone when ``python_fast_path`` is False."""
        if self.python_fast_path:
            hook = make_block_hook(self, self._on_block, self._blocks, self._ss_window, self._on_hook_error,
                                   self._budget.block_store)
        else:
            hook = self._on_block_raw
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
        self._budget.attach(self._native.shared)
        self.cet = self._native.cet_state
        self._native.install()
        self._native.filter_exit_invalidation()
        if self.model.has("serialize"):
            self._native.install_serialize()
        self._native.install_tlb_fill(set_mode=False)
        if not self._budget.per_instruction and native_events_requested():
            self._install_native_events()

    def _install_native_events(self) -> None:
        """SYSCALL, SYSRETQ, IRETQ and #PF delivered in the engine (:class:`cetvm.cpu.native.NativeEvents`;
        block-granular budgets only: their instructions are counted with their block). It holds
        IA32_PL0..3_SSP, so they move from ``self.cet`` into it."""
        events = NativeEvents(self._uc, self._native)
        events.pl_ssp[:] = list(self.cet.pl_ssp)
        self.cet.pl_ssp = events.pl_ssp
        events.set_enabled(True)
        self._native_events = events
        self._uc.hook_del(self._intr_hook)
        events.install_page_faults(self._on_interrupt_from_native)

    def _on_interrupt_from_native(self, _uch: int, intno: int, _user: int) -> None:
        """UC_HOOK_INTR for what the native #PF delivery leaves to Python."""
        try:
            last = self._blocks.last if intno == Vector.PF else None
            self._on_interrupt(self._uc, intno, None)
            if last is not None:
                self._learn_block_bounds(*last)
        except BaseException as exc:  # ctypes would swallow it: re-raised after emu_start
            self._on_hook_error(exc)

    def _learn_block_bounds(self, address: int, size: int, _icount: int) -> None:
        """A #PF inside the block at ``address`` went to Python: give the native delivery its
        instruction boundaries (it takes back the instructions from the faulting one on), so
        the next #PF in that block stays in the engine. Learned here rather than at every
        classification, which is far more frequent than page faults."""
        try:
            code = self._read_code(address, size)
        except (GuestFault, UcError):
            return
        instrs = decode.decode_block(code, address, self._code_bits)
        self._native_events.store_bounds(address, size, bytes([i.len for i in instrs]))

    @property
    def native_event_counts(self) -> dict[str, int] | None:
        """How many SYSCALLs, SYSRETs, IRETs and #PFs the native path delivered inside the engine,
        and how many it left to Python (None when the native events are not in use)."""
        return None if self._native_events is None else self._native_events.stats

    def _claimed_by_native_events(self, instr) -> bool:
        """``instr`` (which needs emulation) is delivered by the native events instead of an exit:
        SYSCALL always (its hook is per instruction type), SYSRETQ and IRETQ through a hook at
        their address (new hooks are marked in ``self._new_event_hooks``: the block is
        translated again)."""
        events = self._native_events
        if events is None or self._code_bits != 64:
            return False
        if instr.mnemonic == Mnemonic.SYSCALL:
            return True
        if instr.code in (Code.SYSRETQ, Code.IRETQ):
            if events.hook_return(instr.ip, iret=instr.code == Code.IRETQ):
                self._new_event_hooks = True
            return True
        return False

    def _sync_native_events_mode(self) -> None:
        """The native events changed the CPL inside the engine: re-read the cached mode."""
        if self._native_events is not None and self._native_events.mode_moved():
            self.refresh_mode(paging=False)

    def _take_native_event_handover(self) -> None:
        """An instruction the native events left to Python (cetfast.c "Native events"): it did
        not retire; the run loop emulates it (``_syscall_at``). If the code there is no SYSCALL,
        SYSRETQ or IRETQ any more (rewritten), its hook goes and the engine runs the instruction."""
        rip = self._native_events.take_handover()
        if rip is None:
            return
        self._retire_before(rip)
        self.rip = rip
        try:
            instr = self.fetch_instruction(rip)
        except (GuestFault, UcError):
            instr = None
        if instr is not None and (instr.code in (Code.SYSRETQ, Code.IRETQ) or instr.mnemonic == Mnemonic.SYSCALL):
            self._syscall_at = rip
            return
        pc = self._linear(rip)
        self._native_events.unhook_return(pc)
        self._uc.ctl_remove_cache(pc, pc + 1)

    def _sync_native_mode(self, *, flush: bool = True) -> None:
        """Tell the native hook the mode; ``flush``: and forget its cached shadow-stack
        translations (not needed when only segments changed: they are kept per user-ness)."""
        mode = self._memory.mode
        paging = PagingKind.FOUR_LEVEL if mode.long_paging else PagingKind.OTHER if mode.paging else PagingKind.OFF
        self._native.sync_mode(cpl=self.cpl, long_mode=self.long_mode, cr4_cet=self.cr4_cet, paging=paging,
                               cr3=mode.cr3, cs_base=self._cs_base)
        if flush:
            self._native.flush_translations()

    def _apply_native_handover(self) -> None:
        """A block start the native hook left to us: run the reference state machine for it."""
        self._sync_native_events_mode()
        if self._native_events is not None:
            self._take_native_event_handover()
        request = self._native.take_handover()
        if request is None:
            return
        try:
            first = self._read_code(request.block_addr, 4)
        except (GuestFault, UcError):
            first = b""
        self.apply_decision(on_block_start(self, request.terminator, request.block_addr, self.reg("rsp"), first))

    def apply_decision(self, decision: BlockDecision, *, counted: bool = True) -> bool:
        """Carry out a block-start decision of :mod:`cetvm.cpu.cet.transfer`: on FAULT, roll
        RIP (and RSP: ``decision.rsp``, or the current RSP + ``rsp_adjust`` when the state machine
        did not read RSP) back to the terminator, take back the terminator's count when it was
        counted as retired (``counted``) and make the fault the pending event. True when it
        faulted (the caller stops the engine if it runs inside it)."""
        if decision.action != BlockAction.FAULT:
            return False
        if counted:
            self._terminator_faulted(decision)
        uc = self._uc
        if decision.rsp is not None:
            uc.reg_write(X.UC_X86_REG_RSP, decision.rsp)
        elif decision.rsp_adjust:
            uc.reg_write(X.UC_X86_REG_RSP, (self._fast_rsp() + decision.rsp_adjust) & _U64)
        uc.reg_write(X.UC_X86_REG_RIP, decision.rip)
        self._raise_event(decision.fault)
        return True

    def _on_block_raw(self, _uch: int, address: int, size: int, _user: int) -> None:
        try:
            self._on_block(address, size)
        except BaseException as exc:  # ctypes would swallow it: re-raised after emu_start
            self._on_hook_error(exc)

    def _on_hook_error(self, exc: BaseException) -> None:
        """An exception inside a hook: keep it for ``_run_engine`` to re-raise, stop the engine."""
        self._hook_error = exc
        self._uc.emu_stop()

    def _fast_rsp(self) -> int:
        uclib.uc_reg_read(self._uc._uch, X.UC_X86_REG_RSP, ctypes.byref(self._reg_buf))
        return self._reg_buf.value

    def _on_block(self, address: int, size: int) -> None:
        """At each block start: classify on a miss, run the CET state machine (the reference
        hook; :mod:`cetvm.cpu.fastpath` handles the common cases in front of it and calls this,
        with nothing committed, for everything else), then retire the block's instructions — or,
        when the budget has fewer left, stop in front of it (:meth:`_stop_for_budget`)."""
        if self.stepping:
            return
        blocks = self._blocks
        info = blocks.cache.get(address)
        if info is None or info.size != size:
            info = self._classify_block(address, size)
            if info is None:
                blocks.last_run = None
                return
        if not self._cet_block_start(info, address):
            blocks.last_run = None
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
        if not self.cet_active:
            return True
        if prev is None and not (self.cet.u_cet if self.cpl == 3 else self.cet.s_cet) & _TRACKER:
            return True
        # RSP is read only on a fault (BlockDecision.rsp_adjust): one register read less per block.
        if not self.apply_decision(on_block_start(self, prev, address, None, info.first_bytes)):
            return True
        self._uc.emu_stop()
        return False

    def _stop_for_budget(self, address: int, size: int) -> None:
        """The block at ``address`` has more instructions than the budget has left: its block
        start is done (the CET state is whole wherever the run ends) but it does not run — no
        terminator pending, the engine stops in front of it (the Python twin of cetfast.c's
        budget_stop; the vCPU then runs the instructions left,
        :meth:`cetvm.cpu.vcpu.Vcpu._run_fenced`)."""
        self._budget.store.budget_stop = size or 1
        self._blocks.prev = None
        self._blocks.last_run = None
        self._uc.reg_write(X.UC_X86_REG_RIP, address - self._cs_base)
        self._uc.emu_stop()

    def _classify_block(self, address: int, size: int) -> BlockInfo | None:
        """Decode a new block; make emulated instructions exits (then restart: returns None)."""
        self._sync_native_events_mode()  # the code is read with the current CPL's rights
        try:
            code = self._read_code(address, size)
        except (GuestFault, UcError):
            code = b""
        instrs = decode.decode_block(code, address, self._code_bits)
        self._new_event_hooks = False
        new_exits = [i.ip for i in instrs if decode.needs_emulation(i) and i.ip not in self._exits
                     and not self._claimed_by_native_events(i)]
        if new_exits or self._new_event_hooks:
            self._exits.update(new_exits)
            self._uc.ctl_set_exits(sorted(self._exits))
            self.drop_translations(address, address + size)
            self._uc.reg_write(X.UC_X86_REG_RIP, address - self._cs_base)  # RIP is the offset
            self._uc.emu_stop()
            return None
        terminator = classify_terminator(instrs[-1]) if instrs else None
        if terminator is not None and terminator.kind == Terminator.FALLTHROUGH:
            terminator = None  # nothing to apply at the next block start
        info = BlockInfo(address, size, terminator, code[:4], len(instrs), self.code_is_global(address, size))
        self._blocks.store(info)
        return info

    def _apply_pending_terminator(self, rip: int) -> None:
        """Apply the previous block's terminator when the next "block" is an emulated instruction."""
        prev = self._blocks.take_prev(None)
        if prev is None or not self.cet_active:
            return
        try:
            first = self._read_code(rip, 4)
        except (GuestFault, UcError):
            first = b""
        self.apply_decision(on_block_start(self, prev, rip, self.reg("rsp"), first))
