"""Many VM exits in a row must not grow memory (issue 9: ~0.8 KB per port I/O exit).

The growth was native: every KVM_RUN with an instruction budget adds Unicorn's UC_HOOK_CODE
count hook and deletes it afterwards, and Unicorn 2.1.4 keeps each deleted hook (on its list of
hooks to delete) until no translated block refers to it, i.e. until the translation cache is
flushed. :data:`cetvm.cpu.budget.DELETED_HOOKS_PER_FLUSH` bounds that list."""

from __future__ import annotations

import gc

import pytest

from cetvm.cpu import budget
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from spec_images import elf64_kernel

#: out 0x80, al; jmp back: one KVM_EXIT_IO per two instructions.
OUT_LOOP = b"\xE6\x80\xEB\xFC"
EXITS = 3000


def _resident_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4


def _growth_over_exits(tmp_path, exits: int) -> int:
    kernel = tmp_path / "out_loop.elf"
    kernel.write_bytes(elf64_kernel(OUT_LOOP))
    machine = Machine.boot(kernel, MachineConfig(memory="4M"))
    machine.run(max_instructions=1000)  # warm up: translations, caches
    gc.collect()
    before = _resident_kib()
    machine.run(max_instructions=1000 + 2 * exits)
    gc.collect()
    assert machine.instructions == 1000 + 2 * exits
    return _resident_kib() - before


def test_port_io_exits_do_not_accumulate_deleted_count_hooks(tmp_path):
    growth = _growth_over_exits(tmp_path, EXITS)
    # before the fix: ~1.4 KB per exit here (over 4 MB for 3000 exits)
    assert growth < 1024, f"resident memory grew {growth} KiB over {EXITS} port I/O exits"


def test_the_bound_is_what_keeps_memory_flat(tmp_path, monkeypatch):
    """The test above can fail: without the periodic flush the same run grows by megabytes."""
    monkeypatch.setattr(budget, "DELETED_HOOKS_PER_FLUSH", 1 << 30)
    assert _growth_over_exits(tmp_path, 2000) > 1024
