"""The "host" model: this machine's real CPUID, read by executing the CPUID instruction.

No /dev/cpu/*/cpuid and no root: a 27-byte x86-64 stub is copied into an anonymous
executable mapping and called through ctypes as ``void cpuid(u32 leaf, u32 subleaf, u32 out[4])``
(System V ABI: EDI, ESI, RDX). Leaves 0..CPUID.0.EAX and 0x80000000..CPUID.0x80000000.EAX
are read, each subleaf-indexed leaf with the subleaves its own enumeration rule defines
(:func:`host_subleaves`). The thread is pinned to the lowest CPU it may run on while reading,
so per-CPU fields (APIC IDs) are consistent, like the CPU #0 of an InstLatx64 dump.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
from typing import Callable, Iterator

from cetvm import NotSupportedError
from cetvm.cpuid.model import CpuidModel
from cetvm.arch.cpuid_bits import SUBLEAF_INDEXED_LEAVES

#: push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi; cpuid;
#: mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret
CPUID_STUB = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")

#: Upper bounds that protect against a hypervisor reporting absurd maximum leaves.
MAX_BASIC_LEAVES = 0x100
MAX_EXT_LEAVES = 0x100
MAX_SUBLEAVES = 64

CpuidFn = Callable[[int, int], tuple[int, int, int, int]]

_CPUID_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))


def host_is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _until(fn: CpuidFn, leaf: int, stop: Callable[[tuple[int, int, int, int]], bool]) -> Iterator[int]:
    """Subleaves 0, 1, ... up to (not including) the first whose output satisfies ``stop``."""
    for sub in range(MAX_SUBLEAVES):
        if stop(fn(leaf, sub)):
            return
        yield sub


def host_subleaves(fn: CpuidFn, leaf: int) -> list[int]:
    """The subleaves of ``leaf`` worth reading, per each leaf's enumeration rule [SDM CPUID]."""
    regs0 = fn(leaf, 0)
    if leaf in (0x4, 0x8000_001D):  # deterministic cache parameters: until cache type 0
        return list(_until(fn, leaf, lambda r: r[0] & 0x1F == 0))
    if leaf in (0xB, 0x1F, 0x8000_0026):  # topology: until level type 0
        return [0] + [s for s in _until(fn, leaf, lambda r: (r[2] >> 8) & 0xFF == 0) if s > 0]
    if leaf == 0xD:  # 0, 1, then every state component that reports a size
        return [0, 1] + [n for n in range(2, 63) if fn(leaf, n)[0] != 0]
    if leaf == 0xF:  # RDT monitoring: subleaf 0, then each resource type set in EDX
        return [0] + [b for b in range(1, 32) if regs0[3] >> b & 1]
    if leaf == 0x10:  # RDT allocation: subleaf 0, then each resource id set in EBX
        return [0] + [b for b in range(1, 32) if regs0[1] >> b & 1]
    if leaf == 0x12:  # SGX: 0, 1, then EPC sections until type 0
        return [0, 1] + [s for s in _until(fn, leaf, lambda r: r[0] & 0xF == 0) if s > 1]
    if leaf in (0x7, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x20, 0x23, 0x24):  # EAX of subleaf 0 = max
        return list(range(min(regs0[0], MAX_SUBLEAVES - 1) + 1))
    if leaf == 0x8000_0020:  # AMD PQE: subleaf 0 and each resource set in EBX
        return [0] + [b for b in range(1, 32) if regs0[1] >> b & 1]
    return [0]


def read_host_model(fn: CpuidFn | None = None) -> CpuidModel:
    """A CpuidModel named "host" holding this CPU's CPUID (or ``fn``'s, for tests)."""
    if fn is not None:
        return _read_all(fn)
    if not host_is_x86_64():
        raise NotSupportedError(f"the 'host' CPU model needs an x86-64 host, this is {platform.machine()}")
    with _pinned_to_one_cpu(), _cpuid_function() as cpuid:
        return _read_all(cpuid)


def _read_all(fn: CpuidFn) -> CpuidModel:
    model = CpuidModel("host")
    for base, limit in ((0, MAX_BASIC_LEAVES), (0x8000_0000, MAX_EXT_LEAVES)):
        top = fn(base, 0)[0]
        if base and not base <= top < base + limit:
            continue
        for leaf in range(base, min(top, base + limit - 1) + 1):
            subs = host_subleaves(fn, leaf) if leaf in SUBLEAF_INDEXED_LEAVES else [0]
            for sub in subs:
                model.set(leaf, sub, *fn(leaf, sub))
    return model


class _pinned_to_one_cpu:
    """Pin the calling thread to its lowest allowed CPU; restore the affinity afterwards."""

    def __enter__(self) -> None:
        self.saved: set[int] | None = None
        if hasattr(os, "sched_getaffinity"):
            try:
                self.saved = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {min(self.saved)})
            except OSError:
                self.saved = None

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            try:
                os.sched_setaffinity(0, self.saved)
            except OSError:
                pass


class _cpuid_function:
    """Context manager yielding a callable that executes CPUID from an executable mapping."""

    def __enter__(self) -> CpuidFn:
        try:
            self.page = mmap.mmap(-1, mmap.PAGESIZE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except (OSError, ValueError) as exc:
            raise NotSupportedError(f"cannot map an executable page to run CPUID: {exc}") from None
        self.page.write(CPUID_STUB)
        self.anchor = ctypes.c_char.from_buffer(self.page)
        func = _CPUID_PROTO(ctypes.addressof(self.anchor))
        out = (ctypes.c_uint32 * 4)()

        def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
            func(leaf, subleaf, out)
            return (out[0], out[1], out[2], out[3])

        return cpuid

    def __exit__(self, *exc: object) -> None:
        del self.anchor
        self.page.close()
