"""The seam between CET semantics (``cetvm.cpu.cet``) and the engine that runs guest code.

The CET semantics functions are pure with respect to this protocol: they read and write the
architectural state they need through a :class:`CetMachine` and raise
:class:`cetvm.cpu.faults.GuestFault` for every fault. The engine (``cetvm.cpu.vcpu``) implements
the protocol over Unicorn; unit tests implement it over a small fake.
"""

from __future__ import annotations

from typing import Protocol

from cetvm.arch import Msr


class CetMachine(Protocol):
    """What CET semantics needs from the processor.

    Shadow-stack accesses (``ss_read``/``ss_write``/``ss_cmpxchg``) translate ``linear`` through
    the guest's paging with the shadow-stack rules (leaf R/W=0 and D=1, U/S matching ``user``)
    and raise #PF with PfErr.SS on violation; with paging off they are plain physical accesses.
    """

    @property
    def cpl(self) -> int: ...

    @property
    def long_mode(self) -> bool:
        """64-bit mode (IA-32e with CS.L=1): shadow-stack entries are 8 bytes wide."""
        ...

    @property
    def cr4_cet(self) -> bool: ...

    @property
    def ssp(self) -> int: ...

    @ssp.setter
    def ssp(self, value: int) -> None: ...

    def cet_msr(self, msr: Msr) -> int:
        """Current value of a CET MSR (U_CET, S_CET, PL0-3_SSP, INT_SSP_TAB)."""
        ...

    def set_cet_msr(self, msr: Msr, value: int) -> None:
        """Set a CET MSR without architectural checks (the caller has done them)."""
        ...

    def ss_read(self, linear: int, size: int, *, user: bool) -> int: ...

    def ss_write(self, linear: int, value: int, size: int, *, user: bool) -> None: ...

    def ss_cmpxchg(self, linear: int, expected: int, new: int, *, user: bool) -> tuple[bool, int]:
        """Locked 8-byte compare-exchange on the shadow stack: (swapped, old value)."""
        ...

    def mem_read(self, linear: int, size: int) -> int:
        """Ordinary data read at the current CPL (for instructions that read normal memory)."""
        ...
