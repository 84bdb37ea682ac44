"""The exits part of a vCPU: the last exit and the unfinished instruction behind it.

An exiting instruction (IN, an MMIO access, CPUID, an intercepted RDMSR, MOV to CR4...) stops
before it retires; the hypervisor handles the exit and the instruction is finished at the start
of the next run, as KVM finishes it in complete_userspace_io() / the exit handlers' completion
callbacks. The hypervisor hands over its result with :meth:`ExitCompletion.set_result` (IN and
MMIO-read data, an RDMSR value, or an MSR access that must #GP instead); the exit objects
``run`` returned are otherwise only read by it.
"""

from __future__ import annotations

from typing import Callable

from cetvm.cpu.exits import MsrExit, VmExit

#: Finishes an exiting instruction; may return a further exit (a multi-access MMIO instruction).
Completion = Callable[[], "VmExit | None"]


class ExitCompletion:
    """The last exit of a vCPU, its pending completion, and a further exit a completion made."""

    def __init__(self) -> None:
        self._step: Completion | None = None
        self._further: VmExit | None = None
        self.last_exit: VmExit | None = None

    @property
    def pending(self) -> bool:
        """The instruction of the last exit still has to be finished."""
        return self._step is not None

    def set(self, completion: Completion) -> None:
        """``completion`` finishes the exiting instruction at the next run."""
        self._step = completion

    def cancel(self) -> None:
        """Forget the completion (an injected event replaces the instruction, a reset...)."""
        self._step = None

    def forget(self) -> None:
        """Forget the completion and a further exit not yet returned."""
        self._step = None
        self._further = None

    def complete(self) -> bool:
        """Finish the instruction now. True when it retired without a further exit (the STI /
        MOV SS shadow then ends); False when nothing was pending, a further exit is waiting or
        the completion made one."""
        if self._further is not None:
            return False  # the last completion's further exit has not reached the hypervisor yet
        step, self._step = self._step, None
        if step is None:
            return False
        self._further = step()
        return self._further is None

    def take_further_exit(self) -> VmExit | None:
        """The exit the last completion made, once (``run`` returns it before running)."""
        exit_, self._further = self._further, None
        return exit_

    def set_result(self, *, data: int | None = None, error: bool = False) -> None:
        """The hypervisor's result for the last exit: ``data`` for an IN, an MMIO read or an
        intercepted RDMSR; ``error`` for an intercepted RDMSR/WRMSR that must #GP(0)."""
        exit_ = self.last_exit
        if exit_ is None:
            return
        for part in (exit_.io, exit_.mmio, exit_.msr):
            if part is None:
                continue
            if data is not None:
                part.data = data
            if isinstance(part, MsrExit):
                part.error = error
