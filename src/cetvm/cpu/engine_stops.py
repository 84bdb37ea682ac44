"""How a vCPU's engine stops become guest events or exits: interrupts, #PF, #UD, MMIO, SYSCALL.

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change): the UC_HOOK_INTR and
UC_HOOK_INSN_INVALID hooks (exceptions become a pending event for :mod:`cetvm.cpu.events`, with
the #PF error code Unicorn does not expose re-derived from a page walk), the untraced-mode
SYSCALL and paging-off TLB-fill hooks, and the stops Unicorn reports as errors: an invalid
instruction (emulated or #UD) and an access to guest-physical memory without RAM (an MMIO exit,
completed by re-executing the instruction over a scratch page, as KVM's complete_userspace_io).

A mixin of :class:`~cetvm.cpu.vcpu.Vcpu`: the hooks run inside Unicorn and update the vCPU's
pending event, block tracker and budget in place.
"""

from __future__ import annotations

from iced_x86 import MemorySizeExt, Mnemonic, OpAccess, Register
from unicorn import UC_ERR_FETCH_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_MEM_FETCH, UC_PROT_ALL, UC_PROT_EXEC, \
    UC_PROT_READ, UC_PROT_WRITE, Uc, UcError
from unicorn import x86_const as X

from cetvm import CetvmError, NotSupportedError
from cetvm.arch import PfErr, Vector
from cetvm.cpu import decode
from cetvm.cpu.cet.transfer import BlockAction, apply_terminator
from cetvm.cpu.events import PendingEvent
from cetvm.cpu.exits import Direction, ExitReason, MmioExit, VmExit
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access

PAGE = 0x1000
#: Vectors that are traps: RIP reported by Unicorn is past the instruction (engine-notes).
_TRAP_VECTORS = frozenset({Vector.BP, Vector.OF})


def _memory_size_bytes(instr) -> int:
    return MemorySizeExt.size(instr.memory_size)


class EngineStopsMixin:
    """Exception, invalid-instruction, MMIO and SYSCALL stops of :class:`~cetvm.cpu.vcpu.Vcpu`."""

    def _on_interrupt(self, uc: Uc, intno: int, _data: object) -> None:
        if not self.traced:
            self.refresh_mode()  # native privilege changes are not seen otherwise
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        software = intno >= 32 or intno in _TRAP_VECTORS
        if not software and not (intno == Vector.PF and self._is_fetch_fault(rip, uc.reg_read(X.UC_X86_REG_CR2))):
            self._unretire()  # a fetch fault happens before the count hook: nothing to take back
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

    def _is_fetch_fault(self, rip: int, cr2: int) -> bool:
        """The #PF at ``rip`` is the instruction's own fetch (CR2 within its 15 bytes and a fetch
        walk faults): the instruction was never counted (issue 9: the retired count underflowed
        when a restored vCPU's first instruction could not be fetched)."""
        if not 0 <= cr2 - rip < decode.MAX_INSTRUCTION_LENGTH:
            return False
        try:
            self.translate(cr2, Access.FETCH | self._user_access())
        except GuestFault:
            return True
        except CetvmError:
            return False
        return False

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
                self._memory.walk(cr2, access | user)
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

    def _on_untraced_syscall(self, uc: Uc, _data: object) -> None:
        """Untraced mode: Unicorn runs SYSCALL as a NOP; stop (it ends the TB) and emulate it."""
        self._syscall_at = uc.reg_read(X.UC_X86_REG_RIP)
        self._unretire()
        uc.emu_stop()

    def _on_tlb_fill(self, uc: Uc, vaddr: int, access: int, entry, _data: object) -> bool:
        """Identity translation; a page filled for a fetch is R+X, for data R+W (never W+X)."""
        entry.paddr = vaddr & ~0xFFF
        entry.perms = (UC_PROT_READ | UC_PROT_EXEC) if access == UC_MEM_FETCH else (UC_PROT_READ | UC_PROT_WRITE)
        return True
