"""The Python CET common-case path: a flat block hook in front of the reference state machine.

[The Python twin of the native short path, ``cetfast_block_hook`` in cpu/native/cetfast.c;
the semantics are :func:`cetvm.cpu.cet.transfer.on_block_start`.]

At every block start the Vcpu's Python block hook must apply the previous block's terminator.
The reference (:meth:`cetvm.cpu.block_hook.BlockHook.on_block` → ``on_block_start`` → shadow-stack and
IBT primitives → ``CetMachine`` reads → ``ss_read``/``ss_write`` → ``translate``) makes 12-20
Python calls per block. The hook built by :func:`make_block_hook` handles the cases that matter
for speed with plain ints and local variables, and hands everything else, unchanged, to the
reference, which stays the single place where CET semantics are decided.

The short path applies only when all of these hold (else the reference runs, from the same
inputs: nothing is committed before the hand-over):

- the block is in the classification cache with the same size, the engine is not
  single-stepping and no interrupt waits for its window (the reference watches for it);
- CET is inactive (nothing to apply), or:
- the current CPL's U_CET/S_CET has TRACKER = IDLE and SUPPRESS = 0 — then the ENDBRANCH check
  of ``ibt_check_target`` at the new block can only fault (never change the MSR), and it can fault
  only after an arming terminator;
- the previous terminator is one of: none (a fall-through, a direct JMP or Jcc), CALL_DIRECT,
  CALL_INDIRECT, JMP_INDIRECT, RET, RET_IMM. CALL with displacement 0, NOTRACK branches and
  emulated transfers go to the reference;
- after CALL_INDIRECT / JMP_INDIRECT with ENDBR_EN: the new block starts with ENDBR64. Then
  ``ibt_arm_on_indirect`` would set TRACKER and the ENDBR64 would clear it again (SUPPRESS is
  already 0): the MSR is unchanged, so the short path leaves it alone;
- a terminator to apply needs 64-bit mode (8-byte shadow-stack entries, ENDBR64 is the mode's
  ENDBR);
- with SH_STK_EN (shadow stacks on at this CPL): the 8-aligned
  shadow-stack slot lies in the page of :class:`ShadowStackWindow` — the host RAM of a guest page
  already translated with the shadow-stack rules for the current privilege (a TLB entry: it is
  forgotten whenever the Vcpu flushes its translations, i.e. on MOV to CR0/CR3/CR4, INVLPG,
  INVPCID and any mode change). CALL then stores the return address (``insn_addr + insn_len``)
  at SSP - 8 and sets SSP [``shstk_push_near``]; RET loads [SSP], and only if it equals the new
  block's address (the return address the RET took from the data stack) sets SSP += 8
  [``shstk_pop_near_and_check``]. A mismatch goes to the reference, which reads the entry again
  and raises #CP(NEAR_RET) with RIP at the RET and RSP rolled back.

The state stays in the architectural places: SSP and the CET MSRs in the vCPU's CET registers, shadow-stack
entries in guest RAM, the pending terminator in the Vcpu's ``BlockTracker`` (``prev`` and
``prev_block_start``, which the interrupt hook reads). The window is a translation cache, not a
copy of the shadow stack.

Decision recorded here (TLB semantics): like the Vcpu's own translation cache, the window may
keep a translation after the guest edits its page tables, until the guest invalidates it (INVLPG,
INVPCID, MOV to CR0/CR3/CR4, a mode change), as a TLB may [SDM Vol. 3 §4.10.4]. Without an
invalidation, whether a shadow-stack access sees the old or the new mapping can differ between
this hook and the reference alone (as between processors); after one they agree (tested).

Decision recorded here: the window's slots are a native-endian 8-byte view of the guest page;
on a big-endian host :func:`make_block_hook` returns the reference hook (guest memory is
little-endian).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Protocol

from cetvm import CetvmError
from cetvm.arch.cet import ENDBR64
from cetvm.cpu.cet.policy import ENDBR_EN, SH_STK_EN, SUPPRESS, TRACKER
from cetvm.cpu.blocks import BlockTracker
from cetvm.cpu.budget import BudgetStore
from cetvm.cpu.cet.transfer import Terminator
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access
from cetvm.cpu.state import CetRegisters
from cetvm.arch.regs import U64_MASK as _U64

PAGE = 0x1000
#: ``linear & _SLOT_TAG_MASK`` keeps the page (bits 63:12) and the misalignment (bits 2:0): it
#: equals the window's page exactly when ``linear`` is an 8-aligned slot of that page.
_SLOT_TAG_MASK = _U64 & ~0xFF8
_NO_PAGE = -1  # matches no ``linear & _SLOT_TAG_MASK``
_TRACKER_OR_SUPPRESS = TRACKER | SUPPRESS
_SS_READ, _SS_READ_USER = int(Access.SHADOW_STACK), int(Access.SHADOW_STACK | Access.USER)
_SS_WRITE, _SS_WRITE_USER = _SS_READ | int(Access.WRITE), _SS_READ_USER | int(Access.WRITE)

#: void hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data), as Python sees it.
BlockHook = Callable[[int, int, int, int], None]


class FastPathMode(Protocol):
    """What the short path reads of the vCPU's cached mode at every block start (plain
    attributes of :class:`cetvm.cpu.mode.CpuMode`, kept current by the vCPU's ``refresh_mode``)."""

    cpl: int
    long_mode: bool
    cet_active: bool
    stepping: bool
    irq_window_watch: bool


@dataclass(slots=True)
class ShadowStackWindow:
    """The guest page holding the current shadow-stack slots, as host RAM (a one-entry TLB).

    ``page``: the linear page (4 KiB aligned), or -1 when empty; ``slots``: its host memory as
    512 native-endian unsigned 64-bit integers (slot i = linear ``page + 8 * i``). The page was
    translated for the privilege (user or supervisor shadow-stack access) of the CPL at the
    time; the Vcpu forgets the window in ``refresh_mode``, the only place its CPL changes, so
    the window always belongs to the current CPL.
    """

    translate: Callable[[int, int], int]
    ram_view: Callable[[int, int], tuple[memoryview, int]]
    page: int = _NO_PAGE
    slots: memoryview | None = None

    def forget(self) -> None:
        """Drop the translation (the Vcpu's translations were flushed or the mode changed)."""
        self.page = _NO_PAGE
        self.slots = None

    def fill(self, linear: int, user: bool, write: bool) -> bool:
        """Translate the page of ``linear`` for a shadow-stack access and map its RAM.

        False (window empty) if the translation faults or the page is not RAM: the reference
        then makes the same access and raises the fault. Filling changes no architectural
        state (the Vcpu's TLB caches the same translation as the reference's access would).
        """
        page = linear & ~(PAGE - 1) & _U64
        access = (_SS_WRITE_USER if user else _SS_WRITE) if write else (_SS_READ_USER if user else _SS_READ)
        try:
            gpa = self.translate(page, access)
            view, offset = self.ram_view(gpa, PAGE)
        except (GuestFault, CetvmError):
            self.forget()
            return False
        self.page, self.slots = page, view[offset:offset + PAGE].cast("Q")
        return True


def make_block_hook(mode: FastPathMode, cet: CetRegisters, reference: Callable[[int, int], None],
                    blocks: BlockTracker, window: ShadowStackWindow, on_error: Callable[[BaseException], None],
                    budget: BudgetStore | None) -> BlockHook:
    """The Vcpu's UC_HOOK_BLOCK callback: the short path above, else ``reference(address, size)``.

    ``reference`` is the Vcpu's complete block-start handling (classification on a miss, the
    pending-terminator bookkeeping, ``on_block_start``, fault delivery). The returned function
    has the C hook's signature and, like the Vcpu's raw hook, hands any exception to
    ``on_error`` (which stops the engine; ctypes would swallow it).

    Reads in place: the Vcpu's block tracker ``blocks`` and its cache dict
    (BlockTracker.invalidate clears it in place), the CET registers ``cet`` (SSP, U_CET, S_CET;
    the short path writes only ``cet.ssp``), the vCPU's cached ``mode`` (``cpl``, ``long_mode``,
    ``cet_active``, ``stepping``) and its shadow-stack
    ``window``; ``budget``: the instruction budget counted per block (None: counted per
    instruction, :mod:`cetvm.cpu.budget`).
    """
    if sys.byteorder != "little":
        return _guarded(reference, on_error)
    cache_get = blocks.cache.get
    ret, ret_imm = Terminator.RET, Terminator.RET_IMM
    call_direct, call_indirect, jmp_indirect = Terminator.CALL_DIRECT, Terminator.CALL_INDIRECT, Terminator.JMP_INDIRECT

    def block_hook(_uch: int, address: int, size: int, _user: int) -> None:
        try:
            info = cache_get(address)
            if info is None or info.size != size or mode.stepping or mode.irq_window_watch:
                reference(address, size)
                return
            if budget is not None and budget.budget_left < info.icount:
                reference(address, size)  # stops in front of the block
                return
            prev = blocks.prev
            if mode.cet_active:
                cpl = mode.cpl
                ctl = cet.u_cet if cpl == 3 else cet.s_cet
                if prev is None:
                    if ctl & TRACKER:
                        reference(address, size)
                        return
                elif ctl & _TRACKER_OR_SUPPRESS or not mode.long_mode:
                    reference(address, size)
                    return
                else:
                    kind = prev.kind
                    if kind is ret or kind is ret_imm:
                        if ctl & SH_STK_EN:
                            # shstk_pop_near_and_check: [SSP] must equal the return address
                            ssp = cet.ssp
                            if ssp & _SLOT_TAG_MASK != window.page and (
                                    ssp & 7 or not window.fill(ssp, cpl == 3, False)):
                                reference(address, size)
                                return
                            if window.slots[(ssp & 0xFFF) >> 3] != address:
                                reference(address, size)  # #CP(NEAR_RET), decided by the reference
                                return
                            cet.ssp = (ssp + 8) & _U64
                    elif kind is call_direct or kind is call_indirect:
                        if kind is call_indirect and ctl & ENDBR_EN and info.first_bytes != ENDBR64:
                            reference(address, size)  # the tracker arms and the target may #CP(3)
                            return
                        if ctl & SH_STK_EN:
                            # shstk_push_near: SSP -= 8; [SSP] = return address
                            slot = (cet.ssp - 8) & _U64
                            if slot & _SLOT_TAG_MASK != window.page and (
                                    slot & 7 or not window.fill(slot, cpl == 3, True)):
                                reference(address, size)
                                return
                            window.slots[(slot & 0xFFF) >> 3] = (prev.insn_addr + prev.insn_len) & _U64
                            cet.ssp = slot
                    elif kind is jmp_indirect:
                        if ctl & ENDBR_EN and info.first_bytes != ENDBR64:
                            reference(address, size)
                            return
                    else:
                        reference(address, size)
                        return
            blocks.prev = info.terminator
            blocks.prev_block_start = address
            if budget is not None:
                budget.budget_left -= info.icount
                blocks.last_run = info
        except BaseException as exc:  # ctypes would swallow it: re-raised after emu_start
            on_error(exc)

    return block_hook


def _guarded(reference: Callable[[int, int], None], on_error: Callable[[BaseException], None]) -> BlockHook:
    """The reference alone, with the raw hook's error handling."""
    def block_hook(_uch: int, address: int, size: int, _user: int) -> None:
        try:
            reference(address, size)
        except BaseException as exc:
            on_error(exc)

    return block_hook
