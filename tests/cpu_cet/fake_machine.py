"""A small dict-backed CetMachine for unit tests of cetvm.cpu.cet.

Contract (the page rules the real engine applies, reduced to single-level pages):

- Memory is sparse (byte address → byte, unset bytes read 0). Each 4 KiB page has one set of
  leaf attributes (``Pte`` flags); "upper levels" are taken as R/W=1, U/S=1.
- Shadow-stack access (``ss_read``/``ss_write``/``ss_cmpxchg``, argument ``user``): the page must
  be present with R/W=0 and D=1 (a shadow-stack page) and its U/S must equal ``user``; otherwise
  #PF with CR2 = address and error code SS | W (for writes and cmpxchg) | U (if ``user``) |
  P (if the page was present). With ``paging=False`` all accesses are plain physical accesses.
- ``mem_read`` (ordinary read at the current CPL): the page must be present and, at CPL 3, a
  user page; shadow-stack pages are readable. Otherwise #PF (P if present, U at CPL 3).
- ``poke``/``peek`` set up and inspect memory without any check.
- ``set_cet_msr`` stores the value unchecked (as the protocol says); ``msr_writes`` counts writes.
"""

from __future__ import annotations

from cetvm.arch import Msr, PfErr, Pte
from cetvm.cpu.faults import page_fault

PAGE = 4096


class FakeMachine:
    def __init__(self, *, cpl: int = 0, long_mode: bool = True, cr4_cet: bool = True, paging: bool = True) -> None:
        self._cpl = cpl
        self._long_mode = long_mode
        self._cr4_cet = cr4_cet
        self.paging = paging
        self._ssp = 0
        self.msrs: dict[Msr, int] = {msr: 0 for msr in (
            Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP,
            Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP, Msr.IA32_INT_SSP_TAB)}
        self.msr_writes = 0
        self.memory: dict[int, int] = {}
        self.pages: dict[int, Pte] = {}

    # --- CetMachine protocol -------------------------------------------------------------
    @property
    def cpl(self) -> int:
        return self._cpl

    @cpl.setter
    def cpl(self, value: int) -> None:
        self._cpl = value

    @property
    def long_mode(self) -> bool:
        return self._long_mode

    @long_mode.setter
    def long_mode(self, value: bool) -> None:
        self._long_mode = value

    @property
    def cr4_cet(self) -> bool:
        return self._cr4_cet

    @cr4_cet.setter
    def cr4_cet(self, value: bool) -> None:
        self._cr4_cet = value

    @property
    def ssp(self) -> int:
        return self._ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self._ssp = value

    def cet_msr(self, msr: Msr) -> int:
        return self.msrs[msr]

    def set_cet_msr(self, msr: Msr, value: int) -> None:
        self.msr_writes += 1
        self.msrs[msr] = value

    def ss_read(self, linear: int, size: int, *, user: bool) -> int:
        self._check_shadow_stack_page(linear, user=user, write=False)
        return self.peek(linear, size)

    def ss_write(self, linear: int, value: int, size: int, *, user: bool) -> None:
        self._check_shadow_stack_page(linear, user=user, write=True)
        self.poke(linear, value, size)

    def ss_cmpxchg(self, linear: int, expected: int, new: int, *, user: bool) -> tuple[bool, int]:
        self._check_shadow_stack_page(linear, user=user, write=True)
        old = self.peek(linear, 8)
        if old == expected:
            self.poke(linear, new, 8)
            return True, old
        return False, old

    def mem_read(self, linear: int, size: int) -> int:
        if self.paging:
            for addr in {linear // PAGE * PAGE, (linear + size - 1) // PAGE * PAGE}:
                flags = self.pages.get(addr // PAGE)
                user = self._cpl == 3
                if flags is None or not flags & Pte.P or (user and not flags & Pte.US):
                    err = (PfErr.P if flags is not None and flags & Pte.P else PfErr(0)) | (PfErr.U if user else PfErr(0))
                    raise page_fault(linear, err)
        return self.peek(linear, size)

    # --- test helpers --------------------------------------------------------------------
    def map_page(self, addr: int, flags: Pte) -> None:
        self.pages[addr // PAGE] = flags

    def map_shadow_stack(self, addr: int, *, user: bool = False, pages: int = 1) -> None:
        """Shadow-stack page(s): present, R/W=0, D=1, U/S = ``user``."""
        for i in range(pages):
            self.map_page(addr + i * PAGE, Pte.P | Pte.D | Pte.A | (Pte.US if user else Pte(0)))

    def map_data(self, addr: int, *, user: bool = False, pages: int = 1) -> None:
        """Ordinary writable data page(s)."""
        for i in range(pages):
            self.map_page(addr + i * PAGE, Pte.P | Pte.RW | Pte.D | Pte.A | (Pte.US if user else Pte(0)))

    def poke(self, addr: int, value: int, size: int = 8) -> None:
        for i in range(size):
            self.memory[addr + i] = (value >> (8 * i)) & 0xFF

    def peek(self, addr: int, size: int = 8) -> int:
        return sum(self.memory.get(addr + i, 0) << (8 * i) for i in range(size))

    def _check_shadow_stack_page(self, linear: int, *, user: bool, write: bool) -> None:
        if not self.paging:
            return
        flags = self.pages.get(linear // PAGE)
        present = flags is not None and bool(flags & Pte.P)
        ok = (
            present
            and not flags & Pte.RW
            and bool(flags & Pte.D)
            and bool(flags & Pte.US) == user
        )
        if not ok:
            err = PfErr.SS | (PfErr.W if write else PfErr(0)) | (PfErr.U if user else PfErr(0)) | (PfErr.P if present else PfErr(0))
            raise page_fault(linear, err)


def machine_with_shadow_stacks(
    *, cpl: int = 0, user_ss: int = 0x7000_0000, kernel_ss: int = 0x10000, pages: int = 2,
    long_mode: bool = True,
) -> FakeMachine:
    """CR4.CET=1, SH_STK_EN in both U_CET and S_CET, a user shadow stack at ``user_ss`` and a
    supervisor one at ``kernel_ss`` (``pages`` pages each), SSP at the top of the CPL's stack."""
    from cetvm.arch import CetCtl

    m = FakeMachine(cpl=cpl, long_mode=long_mode)
    m.msrs[Msr.IA32_U_CET] = int(CetCtl.SH_STK_EN)
    m.msrs[Msr.IA32_S_CET] = int(CetCtl.SH_STK_EN)
    m.map_shadow_stack(user_ss, user=True, pages=pages)
    m.map_shadow_stack(kernel_ss, user=False, pages=pages)
    m.ssp = (user_ss if cpl == 3 else kernel_ss) + pages * PAGE
    return m
