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
  (:meth:`TimeStampCounter.sync`) and extrapolated from the vCPU's own instruction counter,
  with no Python call (an RDTSC costs ~6 µs through Python, a busy-wait loop on it far more);
- otherwise Python callbacks that read the source (any clock, e.g. a test's).
"""

from __future__ import annotations

import ctypes
from typing import Callable

from unicorn import UC_HOOK_INSN, Uc
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError
from cetvm.arch import Msr
from cetvm.cpu.native.loader import INSN_HOOK, InsnCounter, TscStruct, native_tsc_hooks

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_reg_write = uclib.uc_reg_write


def _stopped() -> int:
    """The counter of a CPU nobody gave a clock: it stands at 0."""
    return 0


class TimeStampCounter:
    """IA32_TIME_STAMP_COUNTER of one logical processor (see the module docstring).
    ``counter``: the vCPU's instruction counter (its ``retired`` field); ``use_native``: the
    native hooks when the library is built (False: the Python hooks only)."""

    def __init__(self, uc: Uc, counter: InsnCounter, use_native: bool = True) -> None:
        self._uc = uc
        self._counter = counter
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
        self._state.retired = ctypes.addressof(counter) + InsnCounter.retired.offset
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
        self._state.ticks_per_insn = ticks_per_insn if self.native else 0
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
        self.sync()

    def read(self) -> int:
        """The TSC the guest sees now (RDTSC, RDMSR IA32_TIME_STAMP_COUNTER)."""
        return (self._source() + self._offset) & _U64

    def sync(self) -> None:
        """Sample the TSC for the native hooks (at the start of each run, after a change)."""
        if self._state.ticks_per_insn:
            self._state.base_tsc = self.read()
            self._state.base_retired = self._counter.retired

    # ------------------------------------------------------------------ the Python hooks
    def _write(self, reg: int, value: int) -> None:
        self._buf.value = value
        _reg_write(self._uch, reg, self._ref)

    def _result(self) -> int:
        value = self.read()
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
