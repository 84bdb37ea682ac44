"""How a vCPU's engine stops become guest events or exits: interrupts, #PF, #UD, MMIO, SYSCALL.

:class:`EngineStops` (a part of :class:`cetvm.cpu.vcpu.Vcpu`) owns the UC_HOOK_INTR and
UC_HOOK_INSN_INVALID hooks (exceptions become a pending event for :mod:`cetvm.cpu.events`, with
the #PF error code Unicorn does not expose re-derived from a page walk; with native event
delivery, the interrupts the native #PF hook leaves to Python), the untraced-mode
SYSCALL and paging-off TLB-fill hooks, and the stops Unicorn reports as errors: an invalid
instruction (emulated or #UD) and an access to guest-physical memory without RAM (an MMIO exit,
completed by re-executing the instruction over a scratch page, as KVM's complete_userspace_io).

The hooks run inside Unicorn and update the vCPU's pending event
(:class:`cetvm.cpu.interrupts.PendingEvents`), block table and budget in place; instructions are
emulated through the vCPU's public interface (:func:`cetvm.cpu.emulate.emulate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from iced_x86 import FlowControl, InstructionInfoFactory, MemorySizeExt, OpAccess, Register
from unicorn import UC_ERR_FETCH_UNMAPPED, UC_MEM_FETCH, UC_PROT_ALL, UC_PROT_READ, UC_PROT_WRITE, Uc, UcError
from unicorn import x86_const as X

from cetvm import CetvmError, NotSupportedError
from cetvm.arch import PfErr, Vector, is_canonical, u64
from cetvm.cpu import decode, emulate, string_ops
from cetvm.cpu.block_hook import BlockHook
from cetvm.cpu.blocks import BlockTable
from cetvm.cpu.budget import InstructionBudget
from cetvm.cpu.cet.transfer import TerminatorInfo, apply_terminator
from cetvm.cpu.events import PendingEvent
from cetvm.cpu.exits import Direction, ExitReason, MmioExit, MmioStepHooks, VmExit
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.interrupts import PendingEvents
from cetvm.cpu.memory import GuestMemory
from cetvm.cpu.mode import CpuMode, InstructionFetch
from cetvm.cpu.paging import Access
from cetvm.cpu.registers import Registers
from cetvm.cpu.uc_context import cr2_kept
from cetvm.cpu.vcpu_cet import VcpuCet

if TYPE_CHECKING:
    from cetvm.cpu.vcpu import Vcpu

PAGE = 0x1000
#: Vectors that are traps: RIP reported by Unicorn is past the instruction.
_TRAP_VECTORS = frozenset({Vector.BP, Vector.OF})


def terminator_not_run(block_start: int, terminator: TerminatorInfo, rip: int) -> bool:
    """The engine stopped at ``rip`` inside the block that starts at ``block_start``, at or
    before its terminator: the terminator has not executed, so it must not be applied.

    The block hook records a block's terminator as pending when the block *starts*; it is
    applied at the next block start. A stop in between — an exception inside the block, the
    instruction budget running out (the end of a KVM_RUN slice), an exit — leaves it pending
    although the CALL/RET/JMP never ran; the engine then resumes mid-block at ``rip`` and would
    otherwise apply it there (a phantom shadow-stack push → a false #CP(1) at a later RET).
    """
    return block_start <= rip <= terminator.insn_addr


_READ_ACCESSES = frozenset({OpAccess.READ, OpAccess.COND_READ, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE})
_WRITE_ACCESSES = frozenset({OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE})


def _touches_page(address: int, size: int, page: int) -> bool:
    """The ``size`` bytes at linear ``address`` (at least one) include a byte of page ``page``."""
    return address // PAGE <= page <= (address + max(size, 1) - 1) // PAGE


def mmio_fragment(remaining: int) -> int:
    """The size of the next MMIO access of an operand with ``remaining`` bytes left: the
    largest bus size (8, 4, 2, 1) that fits."""
    return next(n for n in (8, 4, 2, 1) if n <= remaining)


@dataclass(frozen=True)
class MmioOperand:
    """A memory operand outside RAM as the MMIO accesses it needs: ``pieces`` are its device
    parts, (guest-physical address, size) per page in the order of its bytes (the RAM part of
    an operand crossing from RAM into a device page is left to the engine)."""

    pieces: tuple[tuple[int, int], ...]
    reads: bool
    writes: bool

    @property
    def size(self) -> int:
        return sum(size for _gpa, size in self.pieces)

    def locate(self, offset: int) -> tuple[int, int]:
        """(guest-physical address, bytes left in its piece) of byte ``offset`` of the pieces."""
        for gpa, size in self.pieces:
            if offset < size:
                return gpa + offset, size - offset
            offset -= size
        raise ValueError(f"offset {offset} past the operand")


def device_pieces(linear: int, size: int, mask: int, translate: Callable[[int], int],
                  is_ram: Callable[[int, int], bool]) -> tuple[tuple[int, int], ...]:
    """The parts of the ``size`` bytes at ``linear`` that are not RAM, one per page they touch:
    (guest-physical address, size). Each page is translated by itself (two virtual pages of a
    crossing operand need not be physically adjacent; ``translate`` raises the #PF of the page
    that faults)."""
    pieces = []
    offset = 0
    while offset < size:
        here = (linear + offset) & mask
        length = min(size - offset, PAGE - (here & (PAGE - 1)))
        gpa = translate(here)
        if not is_ram(gpa, 1):
            pieces.append((gpa, length))
        offset += length
    return tuple(pieces)


class EngineStops:
    """Exception, invalid-instruction, MMIO and SYSCALL stops of one vCPU's engine."""

    def __init__(self, vcpu: "Vcpu", uc: Uc, *, mode: CpuMode, cet: VcpuCet, blocks: BlockTable,
                 hook: BlockHook, events: PendingEvents, memory: GuestMemory, fetch: InstructionFetch,
                 budget: InstructionBudget, registers: Registers) -> None:
        self._vcpu = vcpu
        self._uc = uc
        #: pages the engine fetched from while paging was off (on_tlb_fill)
        self._fetched_pages: set[int] = set()
        self._mode = mode
        self._cet = cet
        self._blocks = blocks
        self._hook = hook
        self._events = events
        self._memory = memory
        self._fetch = fetch
        self._budget = budget
        self._registers = registers
        self._info_factory = InstructionInfoFactory()
        self._syscall_at: int | None = None

    def on_interrupt_from_native(self, _uch: int, intno: int, _user: int) -> None:
        """UC_HOOK_INTR behind the native #PF delivery (:class:`cetvm.cpu.native.NativeEvents`):
        what it leaves to Python goes to :meth:`on_interrupt`; a #PF it left teaches it the
        boundaries of the block that faulted (:meth:`cetvm.cpu.block_hook.BlockHook.learn_block_bounds`)."""
        try:
            last = self._blocks.last if intno == Vector.PF else None
            self.on_interrupt(self._uc, intno, None)
            if last is not None:
                address, size, _icount = last
                self._hook.learn_block_bounds(address, size)
        except BaseException as exc:  # ctypes would swallow it: re-raised after emu_start
            self._hook.on_hook_error(exc)

    def on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        """UC_HOOK_INTR: an exception or software interrupt becomes the pending event."""
        if not self._vcpu.traced:
            self._vcpu.refresh_mode()  # native privilege changes are not seen otherwise
        self._hook.sync_native_events_mode()
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        software = intno >= 32 or intno in _TRAP_VECTORS
        # a branch to a non-canonical address: the engine reports the #GP at the target, but the
        # branch is what faulted [SDM Vol. 1 §3.3.7.1]
        wild_branch = intno == Vector.GP and not is_canonical(rip)
        if software or (intno == Vector.PF and self._is_fetch_fault(rip, uc.reg_read(X.UC_X86_REG_CR2))):
            # a trap retired its instruction; a fetch fault happens before the count hook and
            # outside the block that ran last: nothing to take back
            self._blocks.close_last()
        elif wild_branch:
            self._hook.branch_did_not_retire()
        else:
            self._hook.retire_before(rip)
        if software:
            int_at = self._software_interrupt_address(self._blocks.take_prev(None), rip, intno)
        elif self.apply_terminator_before_target_fault(rip, branch_taken_back=wild_branch):
            uc.emu_stop()
            return
        if intno == Vector.PF:
            cr2 = uc.reg_read(X.UC_X86_REG_CR2)
            self._events.queue(PendingEvent(Vector.PF, int(self._derive_pf_error(rip, cr2)), cr2))
        elif software:
            self._events.queue(PendingEvent(intno, None, None, software=True, instruction_rip=int_at))
        else:
            if intno == Vector.GP and not wild_branch and self._noncanonical_stack_access(rip):
                intno = Vector.SS
            error = 0 if intno in (Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.AC) else None
            self._events.queue(PendingEvent(intno, error))
        uc.emu_stop()

    def apply_terminator_before_target_fault(self, rip: int, branch_taken_back: bool = False) -> bool:
        """The engine stopped at ``rip`` before the block hook ran there: a fault inside the
        current block, or a fault on fetching the next block (a #PF, a fetch from guest-physical
        memory with no RAM). In the second case the previous block's terminator ran but was not
        applied yet: apply it alone now, before the fetch fault — a RET's shadow-stack compare is
        part of the RET, so a forged return address is #CP(1) at the RET whatever the target is
        (unmapped, NX, supervisor, no RAM) [SDM vol. 1 17.2.3]. The ENDBRANCH check is not
        part of the branch: an indirect CALL/JMP leaves the tracker in WAIT_FOR_ENDBRANCH and the
        fetch fault at the target is delivered first (Bochs decodes the target before checking
        it); the check happens when the guest comes back. True when that raised a CET fault (RIP
        and RSP are then the faulting instruction's). ``branch_taken_back``: the terminator is
        already counted as not retired."""
        blocks = self._blocks
        prev = blocks.take_prev(None)
        if prev is None or terminator_not_run(blocks.prev_block_start, prev, rip) or not self._mode.cet_active:
            return False
        return self._hook.apply_decision(apply_terminator(self._cet, prev, rip, self._uc.reg_read(X.UC_X86_REG_RSP)),
                                   counted=not branch_taken_back)

    def complete_terminator_before_interrupt(self, rip: int) -> bool:
        """An external interrupt is about to be delivered at ``rip``. Interrupts are taken at
        instruction boundaries [SDM Vol. 3A §6.6]: a CALL or RET that ran before ``rip`` retired
        with its shadow-stack push or pop-and-compare, which is part of the instruction [SDM
        Vol. 1 §17.2.3], so the SSP the delivery saves (IA32_PL3_SSP, or the supervisor shadow
        stack's frame) must include it. The engine can stop there before the block hook applied
        it — at an exit point that is a branch's target (a WRSS right after a RET): apply it now,
        as a fetch fault at the target does (:meth:`apply_terminator_before_target_fault`). Left
        pending, the first block of the handler dropped it (a lost pop: the RET's entry stayed
        on the user shadow stack, found by the kernel's test_shadow_stack_64). True when
        applying it faulted (#CP of the RET, #PF of the push): that fault is the event now and
        the interrupt stays pending."""
        return self.apply_terminator_before_target_fault(rip)

    def _software_interrupt_address(self, terminator: TerminatorInfo | None, rip: int, intno: int) -> int:
        """Where the INT n / INT3 / INTO that Unicorn just raised starts (Unicorn reports RIP past
        it). The INT ends its block, so it is normally the block's recorded terminator; else the
        encodings CD ib (2 bytes) and CC/CE (1 byte) are tried in front of ``rip``."""
        if terminator is not None and terminator.insn_addr + terminator.insn_len == rip:
            return terminator.insn_addr
        for length, opcode in ((2, 0xCD), (1, 0xCC if intno == Vector.BP else 0xCE)):
            try:
                code = self._fetch.read_code(u64(rip - length), length)
            except (GuestFault, UcError):
                continue
            if code[0] == opcode and (length == 1 or code[1] == intno):
                return u64(rip - length)
        return u64(rip - 2)

    def forget_terminator_not_run(self, rip: int) -> None:
        """The engine stopped at ``rip`` without a fault (the budget ran out): drop the pending
        terminator if it has not executed yet (:func:`terminator_not_run`)."""
        blocks = self._blocks
        prev = blocks.prev
        if prev is not None and terminator_not_run(blocks.prev_block_start, prev, rip):
            blocks.prev = None

    def _noncanonical_stack_access(self, rip: int) -> bool:
        """The engine's #GP at ``rip`` is the 64-bit-mode canonical check of a memory access
        through SS (an RSP- or RBP-based operand, a stack access), which is #SS(0), not #GP(0)
        [SDM Vol. 3 §6.15 "Interrupt 12": "a non-canonical address referencing the SS segment";
        KVM's __linearize()]. The engine raises #GP for every non-canonical address; its first
        non-canonical access decides, as the access order does."""
        if self._mode.code_bits != 64:
            return False
        try:
            instr = self._fetch.fetch_instruction(rip)
        except (GuestFault, UcError):
            return False
        for used in self._info_factory.info(instr).used_memory():
            if not is_canonical(emulate.used_memory_address(self._vcpu, instr, used)):
                return used.segment == Register.SS
        return False

    def _is_fetch_fault(self, rip: int, cr2: int) -> bool:
        """The #PF at ``rip`` is the instruction's own fetch (CR2 within its 15 bytes and a fetch
        walk faults): the instruction was never counted (issue 9: the retired count underflowed
        when a restored vCPU's first instruction could not be fetched)."""
        if not 0 <= cr2 - rip < decode.MAX_INSTRUCTION_LENGTH:
            return False
        try:
            self._vcpu.translate(cr2, Access.FETCH | self._mode.user_access())
        except GuestFault:
            return True
        except CetvmError:
            return False
        return False

    def _derive_pf_error(self, rip: int, cr2: int) -> PfErr:
        """The #PF error code Unicorn does not expose: re-walk the page tables for the access.

        Decision: a fetch if CR2 lies within the 15 bytes at RIP and a fetch walk fails; else
        the instruction's data accesses (iced-x86) — in 64-bit mode only those whose bytes touch
        CR2's page (MOVS reads [RSI] and writes [RDI]: a fault on the destination is a write),
        all of them if none does: a walk as a read if one reads memory, then as a write if one
        writes memory — the first walk that faults gives the error code (so a store gets W, a
        load-then-store that fails on the load does not). If our walk sees no violation (e.g.
        SMAP, reserved bits), P plus W/U as the instruction suggests.
        """
        user = self._mode.user_access()
        if 0 <= cr2 - rip < decode.MAX_INSTRUCTION_LENGTH:
            try:
                self._vcpu.translate(cr2, Access.FETCH | user)
            except GuestFault as fault:
                return PfErr(fault.error_code or 0)
        reads, writes = self._memory_access_kinds(rip, cr2)
        walks = ([Access.READ] if reads or not writes else []) + ([Access.WRITE] if writes else [])
        for access in walks:
            try:
                self._memory.walk(cr2, access | user)
            except GuestFault as fault:
                return PfErr(fault.error_code or 0)
            except CetvmError:
                break
        return PfErr.P | (PfErr.W if writes else 0) | (PfErr.U if user else 0)

    def _memory_access_kinds(self, rip: int, cr2: int) -> tuple[bool, bool]:
        """(reads, writes) of the instruction at ``rip``'s memory accesses that touch the page of
        ``cr2`` (64-bit mode; all its accesses elsewhere or when none does)."""
        try:
            instr = self._fetch.fetch_instruction(rip)
        except (GuestFault, UcError):
            return True, False
        used = self._info_factory.info(instr).used_memory()
        if self._mode.code_bits == 64:
            page = cr2 // PAGE
            touching = [u for u in used if _touches_page(emulate.used_memory_address(self._vcpu, instr, u),
                                                         MemorySizeExt.size(u.memory_size), page)]
            used = touching or used
        reads = any(u.access in _READ_ACCESSES for u in used)
        writes = any(u.access in _WRITE_ACCESSES for u in used)
        return reads, writes

    def on_invalid_instruction(self, uc: Uc, _data: object) -> bool:
        """UC_HOOK_INSN_INVALID: the instruction at RIP did not retire (those of its block before
        it did, counted with the rights of the CPL the native events may have changed)."""
        self._hook.sync_native_events_mode()
        self._hook.retire_before(uc.reg_read(X.UC_X86_REG_RIP))
        self._blocks.prev = None
        return False  # stop with UC_ERR_INSN_INVALID; _on_invalid_stop emulates or raises #UD

    def on_invalid_stop(self) -> VmExit | None:
        rip = self._vcpu.rip
        try:
            instr = self._fetch.fetch_instruction(rip)
            if not emulate.can_emulate(instr):
                raise GuestFault(Vector.UD)
            return emulate.emulate(self._vcpu, instr)
        except GuestFault as fault:
            self._vcpu.raise_fault(fault)
            return None

    def on_unmapped_stop(self, errno: int) -> VmExit | None:
        """An access to guest-physical memory without RAM: an MMIO exit (as KVM does).

        No UC_HOOK_MEM_*_UNMAPPED hook is installed (any memory hook takes every guest access
        off Unicorn's fast path: measured 140 vs 350 MIPS); Unicorn stops with RIP at the
        instruction and we decode it for the address, size and (for a store) the data.
        """
        rip = self._vcpu.rip
        if errno == UC_ERR_FETCH_UNMAPPED:
            if self.apply_terminator_before_target_fault(rip):
                return None
            return VmExit(ExitReason.EMULATION_FAILED, rip, detail="instruction fetch from guest-physical memory with no RAM")
        self._hook.retire_before(rip)
        self._blocks.prev = None
        try:
            instr = self._fetch.fetch_instruction(rip)
            if string_ops.is_memory_string(instr):
                return self._string_mmio_step(rip, instr, [])
            return self._mmio_instruction(rip, instr)
        except GuestFault as fault:
            self._vcpu.raise_fault(fault)
            return None

    def _string_mmio_step(self, rip: int, instr, completed: list[int | None]) -> VmExit | None:
        """One iteration of a string instruction with an element outside RAM
        (:mod:`cetvm.cpu.string_ops`): an MMIO exit per MMIO element, completed by replaying the
        iteration with the hypervisor's data — which may need the next exit (a MOVS from one
        device page to another), as KVM's complete_emulated_mmio() does."""
        try:
            mmio = string_ops.string_iteration(self._vcpu, instr, completed)
        except GuestFault as fault:
            self._vcpu.raise_fault(fault)
            return None
        if mmio is None:
            return None

        def complete() -> VmExit | None:
            completed.append(mmio.data if mmio.direction is Direction.IN else None)
            return self._string_mmio_step(rip, instr, completed)
        self._vcpu.add_completion(complete)
        return VmExit(ExitReason.MMIO, rip, mmio=mmio)

    def _mmio_operand(self, instr) -> MmioOperand:
        """The instruction's memory operand that is not RAM: its explicit operand (for BT/BTS/
        BTR/BTC with a register bit offset, the one the offset selects), or its stack access
        (PUSH/POP/CALL/RET with RSP pointing at a device page: kvm-unit-tests' emulator pushes
        onto MMIO) when that one is RAM — as the device parts of its pages
        (:func:`device_pieces`)."""
        vcpu = self._vcpu
        for used in self._info_factory.info(instr).used_memory():
            size = MemorySizeExt.size(used.memory_size)
            if size <= 0:
                continue
            if used.base in (Register.RSP, Register.RBP) and instr.is_stack_instruction:  # PUSH, POP, LEAVE...
                linear = ((emulate.read_register(vcpu, used.base) + used.displacement_i64)
                          & emulate.address_mask(vcpu))
            elif emulate.is_bit_string_access(instr):
                linear = emulate.bit_string_address(vcpu, instr)
            else:
                linear = emulate.effective_address(vcpu, instr)
            reads, writes = used.access in _READ_ACCESSES, used.access in _WRITE_ACCESSES
            access = (Access.WRITE if writes and not reads else Access.READ) | self._mode.user_access()
            pieces = device_pieces(linear, size, emulate.address_mask(vcpu),
                                   lambda page_linear: vcpu.translate(page_linear, access), vcpu.is_ram)
            if pieces:
                return MmioOperand(pieces, reads, writes)
        raise NotSupportedError(f"MMIO access by {instr} at {instr.ip:#x} is not supported")

    def execute_with_mmio_operand(self, instr, hooks: MmioStepHooks | None = None) -> VmExit | None:
        """Execute ``instr`` (at RIP) whose memory operand is not RAM, as :meth:`_mmio_instruction`
        does after an engine stop (for instructions cetvm emulates around the engine, whose
        checks on the operand's value and effects after it are ``hooks``)."""
        return self._mmio_instruction(instr.ip, instr, hooks or MmioStepHooks())

    def _mmio_instruction(self, rip: int, instr, hooks: MmioStepHooks | None = None) -> VmExit | None:
        """An instruction whose memory operand is not RAM, as KVM's emulator completes MMIO: each
        read of the operand is an MMIO exit (in fragments of at most 8 bytes, the sizes a bus
        access has; an operand that crosses a page boundary in two parts, one per page, as
        emulator_read_write() splits it); with the data the instruction is executed by the engine
        over scratch pages at the operand's guest-physical addresses; what it stored there leaves
        as MMIO write exits. So every instruction the engine knows works on MMIO — stores whose
        value cetvm could not compute itself (SMSW, SETcc, SSE moves), read-modify-write (ADD,
        XCHG), and operands wider than 8 bytes — with one exit per fragment
        (complete_emulated_mmio)."""
        operand = self._mmio_operand(instr)
        if operand.reads:
            return self._mmio_read(rip, instr, operand, bytearray(), hooks or MmioStepHooks())
        return self._mmio_execute(rip, instr, operand, None, hooks or MmioStepHooks())

    def _mmio_read(self, rip: int, instr, operand: MmioOperand, got: bytearray,
                   hooks: MmioStepHooks) -> VmExit | None:
        if len(got) >= operand.size:
            return self._mmio_execute(rip, instr, operand, bytes(got), hooks)
        gpa, left = operand.locate(len(got))
        piece = mmio_fragment(left)
        mmio = MmioExit(gpa, piece, Direction.IN)

        def complete() -> VmExit | None:
            got.extend((mmio.data & ((1 << (8 * piece)) - 1)).to_bytes(piece, "little"))
            return self._mmio_read(rip, instr, operand, got, hooks)
        self._vcpu.add_completion(complete)
        return VmExit(ExitReason.MMIO, rip, mmio=mmio)

    def _mmio_execute(self, rip: int, instr, operand: MmioOperand, data: bytes | None,
                      hooks: MmioStepHooks) -> VmExit | None:
        """Run the instruction over scratch pages holding ``data`` (the bytes read), then send
        what it wrote (if anything) as MMIO writes."""
        if hooks.check is not None and data is not None:
            try:
                hooks.check(data)
            except GuestFault as fault:
                self._vcpu.raise_fault(fault)
                return None
        rsp = self._vcpu.reg("rsp")
        pages = sorted({gpa & ~(PAGE - 1) for gpa, size in operand.pieces}
                       | {(gpa + size - 1) & ~(PAGE - 1) for gpa, size in operand.pieces})
        stored = []
        with cr2_kept(self._uc):
            for page in pages:
                self._uc.mem_map(page, PAGE, UC_PROT_ALL)
            try:
                if data is not None:
                    offset = 0
                    for gpa, size in operand.pieces:
                        self._uc.mem_write(gpa, data[offset:offset + size])
                        offset += size
                branches = instr.flow_control != FlowControl.NEXT
                self._vcpu.step_in_engine(rip, None if branches else instr.next_ip, retire=False)
                if operand.writes:
                    stored = [(gpa, bytes(self._uc.mem_read(gpa, size))) for gpa, size in operand.pieces]
            finally:
                for page in pages:
                    self._uc.mem_unmap(page, PAGE)
        if self._events.has_event:  # the instruction faulted: nothing was stored
            if not is_canonical(self._vcpu.rip):
                self._unwind_wild_branch(rip, rsp)
            return None
        # Unicorn leaves old_exception at #PF after the scratch page is unmapped: without this the
        # guest's next fault became a #DF (a #PF after an MMIO read in the same block).
        self._registers.clear_stale_old_exception()
        self._budget.retire()
        if hooks.after is not None:
            hooks.after()
        return self._mmio_write(rip, stored)

    def _unwind_wild_branch(self, rip: int, rsp: int) -> None:
        """A branch through an MMIO pointer (JMP/CALL m64, RET from a device-page stack) to a
        non-canonical target: the engine moved RIP (and RSP) before its fetch at the target
        raised the #GP, but the branch is what faults [SDM Vol. 1 §3.3.7.1]: RIP at it, RSP as
        before it (kvm-unit-tests' emulator: "jmp" to NONCANONICAL through MMIO)."""
        self._vcpu.rip = rip
        self._vcpu.set_reg("rsp", rsp)

    def _mmio_write(self, rip: int, stored: list[tuple[int, bytes]]) -> VmExit | None:
        """The MMIO write exits of what the instruction stored: per page part, fragments of at
        most 8 bytes."""
        while stored and not stored[0][1]:
            stored = stored[1:]
        if not stored:
            return None
        (gpa, data), rest = stored[0], stored[1:]
        piece = mmio_fragment(len(data))
        mmio = MmioExit(gpa, piece, Direction.OUT, int.from_bytes(data[:piece], "little"))
        self._vcpu.add_completion(lambda: self._mmio_write(rip, [(gpa + piece, data[piece:])] + rest))
        return VmExit(ExitReason.MMIO, rip, mmio=mmio)

    def on_untraced_syscall(self, uc: Uc, _data: object) -> None:
        """Untraced mode: Unicorn runs SYSCALL as a NOP; stop (it ends the TB) and emulate it."""
        self._syscall_at = uc.reg_read(X.UC_X86_REG_RIP)
        self._budget.unretire()
        uc.emu_stop()

    def on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry, _data: object) -> bool:
        """Identity translation (paging off), as cetfast.c's fill: a page is RWX once it has
        been fetched from, every other page RW (stores to it stay on the engine's fast path).

        The earlier rule here, "fetch R+X, data R+W, never W+X", made kvm-unit-tests' realmode
        (which rewrites its test_insn area for every test) fail four reports on this path that
        pass on the native one (call near 1/2, LOOPcc short 3, jecxz short 2); with the native
        rule both paths agree. guests/kvm/real_smc.S checks self-modifying code with paging off
        on both paths (it does not reproduce that failure: not reduced further)."""
        page = vaddr >> 12
        if access == UC_MEM_FETCH:
            self._fetched_pages.add(page)
        entry.paddr = vaddr & ~0xFFF
        entry.perms = UC_PROT_ALL if page in self._fetched_pages else (UC_PROT_READ | UC_PROT_WRITE)
        return True

    def take_syscall(self) -> int | None:
        """Untraced mode: the RIP of a SYSCALL the engine stopped after (to emulate), once."""
        rip, self._syscall_at = self._syscall_at, None
        return rip
