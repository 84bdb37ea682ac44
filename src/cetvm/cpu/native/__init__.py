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
    EXIT_PIO_READS,
    Handover, HandoverRequest, NativeBlockTracker, NativeCet, NativeCetState, NativeEvents, NativeExitInsns, PagingKind,
    decode_plain64, is_built, load_library,
)

#: Accepted values of ``Vcpu(cet_path=...)`` and ``--cet-path``.
CET_PATHS = ("auto", "native", "python")


def native_events_requested() -> bool:
    """Deliver SYSCALL, SYSRETQ, IRETQ and the common #PF inside the engine (:class:`NativeEvents`):
    the default; ``$CETVM_NATIVE_EVENTS=0`` leaves every event to the Python delivery (the
    reference; any value but "0", "1" or empty is an InputError).

    It was opt-in while Debian's kernel failed with it: first map_shadow_stack EINVAL (a stale
    cached CPL after a native SYSCALL in a run that ended on an engine error, fixed;
    guests/tests/fast_events.c), then, in 200,000-instruction run slices, a PUSHF with RFLAGS.VM
    set at init's first clone — the engine's CMPXCHG16B taking an ADD's operand for RFLAGS at
    the top of a run (not the native events': they only moved where runs start; the Python
    delivery, which now retires the same instructions, oopses there too without the repair),
    repaired by :mod:`cetvm.cpu.flag_sync` (guests/tests/lazy_flags.c)."""
    return _switch("CETVM_NATIVE_EVENTS", off="events delivered in Python", on="in the engine")


def native_classify_requested() -> bool:
    """Classify plain 64-bit blocks in the native hook (cetfast.c "plain blocks"): the default;
    ``$CETVM_NATIVE_CLASSIFY=0`` sends every new block to the Python classifier (the reference,
    :meth:`cetvm.cpu.block_hook.BlockHook.classify_block`; any value but "0", "1" or empty is an
    InputError). Both store the same block table entries (tests/cpu/test_native_classify.py)."""
    return _switch("CETVM_NATIVE_CLASSIFY", off="every block classified in Python", on="plain blocks in the engine")


def _switch(name: str, *, off: str, on: str) -> bool:
    """An on/off environment switch, on by default; a value other than "0", "1" or empty is an
    InputError that says what each means."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise InputError(f"{name} must be 0 ({off}) or 1 ({on}, the default), not {value!r}")
    return value != "0"


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
    "CET_PATHS", "EXIT_PIO_READS", "decode_plain64", "Handover", "HandoverRequest", "NativeBlockTracker", "NativeCet", "NativeCetState", "NativeEvents",
    "NativeExitInsns", "PagingKind",
    "is_built", "load_library", "native_available", "native_classify_requested", "native_events_requested",
    "select_cet_path",
]
