"""The native CET fast path: the block hook of :mod:`cetvm.cpu.cet.transfer` in C.

Build with ``python -m cetvm.cpu.native.build``; see :mod:`.loader` for the Python side and
``cetfast.c`` for what runs natively and what is handed over to the Python layer (the block
hook, and :class:`NativeEvents`: SYSCALL, SYSRETQ, IRETQ and #PF delivered inside the engine).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from cetvm import InputError, NotSupportedError
from cetvm.cpu.native.loader import (
    Handover, HandoverRequest, NativeBlockTracker, NativeCet, NativeCetState, NativeEvents, PagingKind, is_built,
    load_library,
)

#: Accepted values of ``Vcpu(cet_path=...)`` and ``--cet-path``.
CET_PATHS = ("auto", "native", "python")


def native_events_requested() -> bool:
    """``$CETVM_NATIVE_EVENTS`` is "1": deliver SYSCALL, SYSRETQ, IRETQ and the common #PF inside
    the engine (:class:`NativeEvents`). Opt-in (a decision, session 4), taken while Debian's kernel
    plus the shadow-stack selftest failed its first map_shadow_stack (EINVAL) with it. Cause,
    since fixed: a run that went from CPL3 through a native SYSCALL and ended on an engine error
    (the kernel's WRUSSQ as an invalid instruction) left the vCPU's cached CPL at 3, so the stop
    was decoded with user rights (#PF on kernel code, taken by the kernel as the WRUSS's fault).
    guests/tests/fast_events.c checks it. Still opt-in: with runs cut into short slices
    (``cetvm boot --timeout``) and native SYSCALL the same kernel oopses at init's first clone
    (PUSHF with RFLAGS.VM set) — not yet found."""
    return os.environ.get("CETVM_NATIVE_EVENTS") == "1"


def native_available() -> bool:
    """True if the library is built and loads with the ABI this cetvm expects."""
    if not is_built():
        return False
    try:
        load_library()
    except Exception:
        return False
    return True


def select_cet_path(requested: str, notice: TextIO | None = None) -> str:
    """Resolve ``requested`` ("auto" | "native" | "python") to "native" or "python".

    "auto" picks native when it is available, else python with a one-line notice on
    ``notice`` (default stderr). "native" raises NotSupportedError when it is not built.
    """
    if requested not in CET_PATHS:
        raise InputError(f"cet path must be one of {', '.join(CET_PATHS)}, not {requested!r}")
    if requested == "python":
        return "python"
    if native_available():
        return "native"
    if requested == "native":
        if not is_built():
            raise NotSupportedError("the native CET fast path is not built; run: python -m cetvm.cpu.native.build")
        load_library()  # raises the precise error (e.g. an ABI mismatch)
        raise NotSupportedError("the native CET fast path could not be loaded")
    print("cetvm: native CET fast path not built (python -m cetvm.cpu.native.build); using the Python CET layer",
          file=notice if notice is not None else sys.stderr)
    return "python"


__all__ = [
    "CET_PATHS", "Handover", "HandoverRequest", "NativeBlockTracker", "NativeCet", "NativeCetState", "NativeEvents",
    "PagingKind",
    "is_built", "load_library", "native_available", "native_events_requested", "select_cet_path",
]
