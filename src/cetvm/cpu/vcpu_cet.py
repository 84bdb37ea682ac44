"""The vCPU's CET part: its :class:`cetvm.cpu.cet.machine.CetMachine` (the seam to the CET
semantics of :mod:`cetvm.cpu.cet`) and the CET MSR values.

:class:`VcpuCet` owns what the CET state machine reads and writes through the machine — SSP and
the CET MSRs held in a :class:`cetvm.cpu.state.CetRegisters` (Python's
:class:`~cetvm.cpu.state.CetState`, or the native hook's shared state on the native path: one
copy of each register), shadow-stack reads, writes and compare-exchange with the shadow-stack
paging rules [SDM Vol. 3 §4.6.1], and data reads at the current CPL — and keeps
:attr:`cetvm.cpu.mode.CpuMode.cet_active` (CR4.CET and SH_STK_EN or ENDBR_EN in U_CET or S_CET)
current. CPL, 64-bit mode and CR4.CET are the vCPU's cached mode (:class:`~cetvm.cpu.mode.CpuMode`).

``ss_read``/``ss_write`` run at every CALL/RET the reference path handles, so the translation
and RAM-view functions are bound once.
"""

from __future__ import annotations

from unicorn import Uc

from cetvm.arch import Msr
from cetvm.arch.msr import CetCtl
from cetvm.arch.regs import U64_MASK
from cetvm.cpu.memory import LE_UINT, GuestMemory
from cetvm.cpu.mode import CpuMode
from cetvm.cpu.paging import Access
from cetvm.cpu.registers import cet_msr_value, store_cet_msr_value
from cetvm.cpu.state import CetRegisters

_SS_READ, _SS_READ_USER = int(Access.SHADOW_STACK), int(Access.SHADOW_STACK | Access.USER)
_SS_WRITE, _SS_WRITE_USER = _SS_READ | int(Access.WRITE), _SS_READ_USER | int(Access.WRITE)
_CET_ENABLES = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)


class VcpuCet:
    """The CetMachine of a vCPU: CET registers, shadow-stack accesses, data reads."""

    def __init__(self, mode: CpuMode, regs: CetRegisters, memory: GuestMemory, uc: Uc) -> None:
        self._mode = mode
        #: SSP, U_CET, S_CET, PL0-3_SSP, INT_SSP_TAB
        self.regs = regs
        self._memory = memory
        self._translate = memory.translate
        self._ram_view = memory.ram_view
        self._uc = uc

    @property
    def cpl(self) -> int:
        return self._mode.cpl

    @property
    def long_mode(self) -> bool:
        return self._mode.long_mode

    @property
    def cr4_cet(self) -> bool:
        return self._mode.cr4_cet

    @property
    def ssp(self) -> int:
        return self.regs.ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self.regs.ssp = value & U64_MASK

    def cet_msr(self, msr: Msr) -> int:
        """The MSR value as a plain int (the CET code tests it against plain-int bit constants,
        see :mod:`cetvm.cpu.cet.policy`; S_CET and U_CET are the hot ones)."""
        if msr == 0x6A2:  # IA32_S_CET
            return self.regs.s_cet
        if msr == 0x6A0:  # IA32_U_CET
            return self.regs.u_cet
        return cet_msr_value(self.regs, int(msr))

    def set_cet_msr(self, msr: Msr, value: int) -> None:
        """Set a CET MSR without checks (the caller has made them)."""
        store_cet_msr_value(self.regs, int(msr), value)
        self.update_active()

    def ss_read(self, linear: int, size: int, *, user: bool) -> int:
        """Shadow-stack read of 4 or 8 bytes (the hot path of every RET: one cached translation,
        one RAM view lookup, one struct unpack)."""
        view, off = self._ram_view(self._translate(linear, _SS_READ_USER if user else _SS_READ), size)
        return LE_UINT[size].unpack_from(view, off)[0]

    def ss_write(self, linear: int, value: int, size: int, *, user: bool) -> None:
        """Shadow-stack write of 4 or 8 bytes (the hot path of every CALL, as :meth:`ss_read`)."""
        view, off = self._ram_view(self._translate(linear, _SS_WRITE_USER if user else _SS_WRITE), size)
        LE_UINT[size].pack_into(view, off, value & ((1 << (8 * size)) - 1))

    def ss_cmpxchg(self, linear: int, expected: int, new: int, *, user: bool) -> tuple[bool, int]:
        access = Access.SHADOW_STACK | Access.WRITE | (Access.USER if user else Access.READ)
        gpa = self._translate(linear, access)
        old = int.from_bytes(self._uc.mem_read(gpa, 8), "little")
        if old == expected & U64_MASK:
            self._uc.mem_write(gpa, (new & U64_MASK).to_bytes(8, "little"))
            return True, old
        return False, old

    def mem_read(self, linear: int, size: int) -> int:
        return int.from_bytes(self._memory.read_virt(linear, size, self._mode.user_access()), "little")

    def update_active(self) -> None:
        """Recompute ``cet_active`` (after CR4.CET, U_CET or S_CET changed)."""
        regs = self.regs
        self._mode.cet_active = self._mode.cr4_cet and bool((regs.u_cet | regs.s_cet) & _CET_ENABLES)
