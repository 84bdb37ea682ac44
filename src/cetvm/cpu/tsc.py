"""The processor's time-stamp counter, as VMX hardware offers it to a hypervisor [SDM Vol. 3
§18.17 "Time-Stamp Counter"; SDM Vol. 3 §25.3 / §26.6.5 "TSC offsetting"; SDM Vol. 2B RDTSC,
RDTSCP].

The counter the CPU runs on (the *source*, the "host TSC") is given by whoever owns the
hardware: cetvm's KVM hands it the host clock of the VM (:mod:`cetvm.kvm.timekeeping`), so the
cpu layer never knows where time comes from. A guest reads ``source() + offset`` (VMCS
TSC_OFFSET with "use TSC offsetting"; no TSC scaling: the guest runs at the host TSC's rate).

RDTSC and RDTSCP are executed by Unicorn, which (2.1.4, helper_rdtsc/helper_rdtscp) checks
CR4.TSD at CPL > 0 first — #GP(0) reaches cetvm's interrupt hook as any other exception — and
then calls UC_HOOK_INSN hooks for UC_X86_INS_RDTSC / UC_X86_INS_RDTSCP with RIP synchronised
to the instruction; a hook returning 1 replaces the instruction's result. The hooks write
EDX:EAX (and ECX = IA32_TSC_AUX[31:0] for RDTSCP). They are Unicorn instruction hooks,
independent of the block hooks, so the native C CET path, the Python paths and untraced runs all
read the same counter. The instruction counter has already counted the RDTSC, so the value is
the time after it retires.

Two ways to answer, with the same values:

- the native hooks (``cetfast_rdtsc``/``cetfast_rdtscp``, when the library is built) when the
  source *counts retired instructions* (``ticks_per_insn`` > 0: the source advances exactly that
  many ticks per instruction this vCPU retires while it runs, and only between runs otherwise —
  what KVM declares for cetvm's clocks): the TSC is sampled at the start of every run
  (:meth:`TimeStampCounter.sync`) and extrapolated from the run's budget counter, which the
  budget counting decrements by every instruction the vCPU retires (per block or per
  instruction, :mod:`cetvm.cpu.budget`), with no Python call (an RDTSC costs ~6 µs through Python, a busy-wait loop on it far more);
- otherwise Python callbacks that read the source (any clock, e.g. a test's).

Guest reads strictly increase (a decision, as on hardware, where every RDTSC is a later tick):
instructions are counted per translated block (:mod:`cetvm.cpu.budget`), so two reads in one
block, or an RDTSC and the RDMSR emulated right after it, see the same instruction count; such a
read returns the previous guest read + 1. The clock itself is unchanged (the next block's read
is the clock's value again, which is larger), and host-initiated reads (KVM_GET_MSRS, kvmclock)
see the clock as it is.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from unicorn import UC_HOOK_INSN, Uc
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError
from cetvm.arch import Msr
from cetvm.cpu.native.loader import INSN_HOOK, TscStruct, native_tsc_hooks

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_reg_write = uclib.uc_reg_write


def _stopped() -> int:
    """The counter of a CPU nobody gave a clock: it stands at 0."""
    return 0


class TimeStampCounter:
    """IA32_TIME_STAMP_COUNTER of one logical processor (see the module docstring).
    ``budget_counter``: the address of the vCPU's current budget counter (an int64 the budget
    counting decrements per retired instruction), None when it has none in memory (the Python
    block hook's); ``use_native``: the native hooks when the library is built (False: the
    Python hooks only)."""

    def __init__(self, uc: Uc, budget_counter: Callable[[], int | None], use_native: bool = True) -> None:
        self._uc = uc
        self._budget_counter = budget_counter
        self._ticks_per_insn = 0
        self._source: Callable[[], int] = _stopped
        self._offset = 0
        #: An exception a hook could not pass through Unicorn (re-raised by the vCPU).
        self.error: BaseException | None = None
        # The Python hooks write registers through the C API directly: the Python binding's
        # reg_write costs ~8 us per call (measured: 21 -> 6 us per RDTSC).
        self._uch = uc._uch
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        self._callbacks = (INSN_HOOK(self._on_rdtsc), INSN_HOOK(self._on_rdtscp))
        self._state = TscStruct()
        self._state.reg_write = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p).value
        self._state.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
        self._state.slow_rdtsc, self._state.slow_rdtscp = (ctypes.cast(c, ctypes.c_void_p).value
                                                           for c in self._callbacks)
        native = native_tsc_hooks() if use_native else None
        insns = (X.UC_X86_INS_RDTSC, X.UC_X86_INS_RDTSCP)
        hooks = self._callbacks if native is None else native
        user = None if native is None else ctypes.c_void_p(ctypes.addressof(self._state))
        for insn, hook in zip(insns, hooks):
            handle = uc_hook_h()
            status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN, ctypes.cast(hook, ctypes.c_void_p),
                                       user, ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
            if status != 0:
                raise CetvmError(f"cannot hook RDTSC/RDTSCP (unicorn error {status})")
        self.native = native is not None

    # ------------------------------------------------------------------ the counter
    def set_source(self, source: Callable[[], int], ticks_per_insn: int = 0) -> None:
        """The hardware counter before offsetting; ``ticks_per_insn`` > 0 declares that it
        counts this vCPU's retired instructions while it runs (module docstring)."""
        self._source = source
        self._ticks_per_insn = ticks_per_insn if self.native else 0
        self.sync()

    @property
    def source(self) -> Callable[[], int]:
        return self._source

    @property
    def offset(self) -> int:
        """VMCS TSC_OFFSET (64-bit, wraps): the guest reads source() + offset."""
        return self._offset

    @offset.setter
    def offset(self, value: int) -> None:
        self._offset = value & _U64
        self._state.last = (self.read() - 1) & _U64  # a written TSC is read from its value on
        self.sync()

    def read(self) -> int:
        """The TSC now (a host-initiated read: KVM_GET_MSRS, kvmclock's timestamps)."""
        return (self._source() + self._offset) & _U64

    def guest_read(self) -> int:
        """The TSC a guest read returns (RDTSC, RDTSCP, RDMSR): :meth:`read`, or the previous
        guest read + 1 when the instruction count has not moved since (module docstring)."""
        value = self.read()
        advance = (value - self._state.last) & _U64
        if advance == 0 or advance >> 63:  # not later than the last read (mod 2^64)
            value = (self._state.last + 1) & _U64
        self._state.last = value
        return value

    def sync(self) -> None:
        """Sample the TSC for the native hooks (at the start of each run, after its budget is
        set, and after a change); without a budget counter in memory the Python hooks answer."""
        address = self._budget_counter() if self._ticks_per_insn else None
        self._state.ticks_per_insn = self._ticks_per_insn if address is not None else 0
        if address is not None:
            self._state.base_tsc = self.read()
            self._state.budget_left = address
            self._state.base_left = ctypes.c_int64.from_address(address).value

    # ------------------------------------------------------------------ the Python hooks
    def _write(self, reg: int, value: int) -> None:
        self._buf.value = value
        _reg_write(self._uch, reg, self._ref)

    def _result(self) -> int:
        value = self.guest_read()
        self._write(X.UC_X86_REG_RAX, value & _U32)
        self._write(X.UC_X86_REG_RDX, value >> 32)
        return 1

    def _on_rdtsc(self, _uc: int, _data: int) -> int:
        try:
            return self._result()
        except BaseException as err:  # noqa: BLE001 - cannot propagate through Unicorn
            self.error = err
            self._uc.emu_stop()
            return 1

    def _on_rdtscp(self, _uc: int, _data: int) -> int:
        try:
            self._write(X.UC_X86_REG_RCX, self._uc.msr_read(Msr.IA32_TSC_AUX) & _U32)
            return self._result()
        except BaseException as err:  # noqa: BLE001 - cannot propagate through Unicorn
            self.error = err
            self._uc.emu_stop()
            return 1
