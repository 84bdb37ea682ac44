"""The processor's time-stamp counter, as VMX hardware offers it to a hypervisor [SDM Vol. 3
§18.17 "Time-Stamp Counter"; SDM Vol. 3 §25.3 / §26.6.5 "TSC offsetting"; SDM Vol. 2B RDTSC,
RDTSCP].

The counter the CPU runs on (:attr:`TimeStampCounter.source`, the "host TSC") is given by whoever
owns the hardware: cetvm's KVM hands it the host clock of the VM (:mod:`cetvm.kvm.timekeeping`),
so the cpu layer never knows where time comes from. A guest reads ``source() + offset`` (VMCS
TSC_OFFSET with "use TSC offsetting"; no TSC scaling: the guest runs at the host TSC's rate).

RDTSC and RDTSCP are executed by Unicorn, which (2.1.4, helper_rdtsc/helper_rdtscp) checks
CR4.TSD at CPL > 0 first — #GP(0) reaches cetvm's interrupt hook as any other exception — and
then calls UC_HOOK_INSN hooks for UC_X86_INS_RDTSC / UC_X86_INS_RDTSCP with RIP synchronised
to the instruction; a hook returning 1 replaces the instruction's result. The hooks here write
EDX:EAX (and ECX = IA32_TSC_AUX[31:0] for RDTSCP) from :meth:`TimeStampCounter.read`. They are
Unicorn instruction hooks, independent of the block hooks, so the native C CET path, the Python
paths and untraced runs all read the same counter. The count hook has already counted the
RDTSC, so the value is the time after it retires.
"""

from __future__ import annotations

import ctypes
from typing import Callable

from unicorn import UC_HOOK_INSN, Uc
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from cetvm import CetvmError
from cetvm.arch import Msr

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_reg_write = uclib.uc_reg_write
#: int hook(uc_engine *, void *user_data): the RDTSC/RDTSCP instruction-hook signature.
_INSN_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _stopped() -> int:
    """The counter of a CPU nobody gave a clock: it stands at 0."""
    return 0


class TimeStampCounter:
    """IA32_TIME_STAMP_COUNTER of one logical processor (see the module docstring)."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        # The hooks write registers through the C API directly: the Python binding's reg_write
        # costs ~8 us per call, a third of an RDTSC otherwise (measured: 21 -> 6 us per RDTSC).
        self._uch = uc._uch
        self._buf = ctypes.c_uint64()
        self._ref = ctypes.byref(self._buf)
        #: The hardware counter before offsetting (a host TSC value, ticks).
        self.source: Callable[[], int] = _stopped
        #: VMCS TSC_OFFSET (64-bit, wraps): the guest reads source() + offset.
        self.offset = 0
        #: An exception a hook could not pass through Unicorn (re-raised by the vCPU).
        self.error: BaseException | None = None
        self._callbacks = (_INSN_HOOK(self._on_rdtsc), _INSN_HOOK(self._on_rdtscp))
        for insn, callback in zip((X.UC_X86_INS_RDTSC, X.UC_X86_INS_RDTSCP), self._callbacks):
            handle = uc_hook_h()
            status = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN, ctypes.cast(callback, ctypes.c_void_p),
                                       None, ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn))
            if status != 0:
                raise CetvmError(f"cannot hook RDTSC/RDTSCP (unicorn error {status})")

    def read(self) -> int:
        """The TSC the guest sees now (RDTSC, RDMSR IA32_TIME_STAMP_COUNTER)."""
        return (self.source() + self.offset) & _U64

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
