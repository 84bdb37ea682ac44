"""The vCPU's CET part: its implementation of the :class:`cetvm.cpu.cet.machine.CetMachine`
protocol (the seam to the CET semantics of :mod:`cetvm.cpu.cet`) and the CET MSR values.

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change): what the CET state
machine (:mod:`cetvm.cpu.cet`) reads and writes through the machine — CPL, 64-bit mode, CR4.CET,
SSP and the CET MSRs held in ``Vcpu.cet`` (:class:`cetvm.cpu.state.CetState`), shadow-stack
reads, writes and compare-exchange with the shadow-stack paging rules, and data reads — plus
``cet_active`` (CR4.CET and SH_STK_EN or ENDBR_EN in U_CET or S_CET), which every block hook
tests first.

A mixin of :class:`~cetvm.cpu.vcpu.Vcpu`: ``ss_read``/``ss_write`` run at every CALL/RET the
reference path handles, so they use the vCPU's pre-bound ``_translate`` and ``_ram_view``.
"""

from __future__ import annotations

from cetvm.arch import Msr
from cetvm.arch.msr import CetCtl
from cetvm.cpu.memory import LE_UINT
from cetvm.cpu.paging import Access
from cetvm.cpu.registers import cet_msr_value, store_cet_msr_value
from cetvm.arch.regs import U64_MASK

_SS_READ, _SS_READ_USER = int(Access.SHADOW_STACK), int(Access.SHADOW_STACK | Access.USER)
_SS_WRITE, _SS_WRITE_USER = _SS_READ | int(Access.WRITE), _SS_READ_USER | int(Access.WRITE)
_CET_ENABLES = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)


class CetMachineMixin:
    """CetMachine reads/writes and CET MSR storage for :class:`~cetvm.cpu.vcpu.Vcpu`."""

    @property
    def ssp(self) -> int:
        return self.cet.ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self.cet.ssp = value & U64_MASK

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
        return int.from_bytes(self.read_virt(linear, size, self._user_access()), "little")

    def _cet_msr_value(self, index: int) -> int:
        return cet_msr_value(self.cet, index)

    def _set_cet_msr_value(self, index: int, value: int) -> None:
        store_cet_msr_value(self.cet, index, value)
        self._update_cet_active()

    def _update_cet_active(self) -> None:
        self.cet_active = self.cr4_cet and bool((self.cet.u_cet | self.cet.s_cet) & _CET_ENABLES)
