"""The parts the Vcpu is composed of, used on their own: GuestMemory and InstructionBudget.

GuestMemory: regions are page-aligned and disjoint; the hot-path RAM reads see what Unicorn
wrote; translations are cached like a TLB until flushed or the mode changes [SDM Vol. 3 §4.10.4].
InstructionBudget: retire/unretire move the retired count and the budget together, only while a
run has a budget.
"""

from __future__ import annotations

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from cetvm import InputError
from cetvm.arch import Cr0, Cr4, Pte, Vector
from cetvm.arch.msr import Efer
from cetvm.cpu.budget import InstructionBudget
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.memory import GuestMemory
from cetvm.cpu.paging import Access, PagingMode

PAGE = 0x1000
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
LINEAR = 0x5000  # PML4[0] → PDPT[0] → PD[0] → PT[5]
FLAGS = int(Pte.P | Pte.RW)


def _memory_with_tables() -> GuestMemory:
    memory = GuestMemory(Uc(UC_ARCH_X86, UC_MODE_64))
    memory.map_ram(0, 16 * PAGE)
    memory.write_phys(PML4, (PDPT | FLAGS).to_bytes(8, "little"))
    memory.write_phys(PDPT, (PD | FLAGS).to_bytes(8, "little"))
    memory.write_phys(PD, (PT | FLAGS).to_bytes(8, "little"))
    _map(memory, 0x6000)
    memory.set_mode(PagingMode(int(Cr0.PE | Cr0.PG), PML4, int(Cr4.PAE), int(Efer.LME | Efer.LMA)))
    return memory


def _map(memory: GuestMemory, gpa: int | None) -> None:
    entry = 0 if gpa is None else gpa | FLAGS
    memory.write_phys(PT + 8 * (LINEAR >> 12), entry.to_bytes(8, "little"))


@pytest.mark.parametrize("gpa,size", [(0x800, PAGE), (0, 0x1800), (0, 0)])
def test_unaligned_or_empty_region_is_input_error(gpa, size):
    memory = GuestMemory(Uc(UC_ARCH_X86, UC_MODE_64))
    with pytest.raises(InputError, match="not page-aligned"):
        memory.map_ram(gpa, size)


def test_overlapping_region_names_the_existing_one():
    memory = GuestMemory(Uc(UC_ARCH_X86, UC_MODE_64))
    memory.map_ram(0x10000, 4 * PAGE)
    with pytest.raises(InputError, match="overlaps ram 0x10000"):
        memory.map_mmio(0x13000, PAGE)
    memory.map_mmio(0x14000, PAGE)  # adjacent is fine
    assert [(r.gpa, r.size, r.kind) for r in memory.regions] == [(0x10000, 0x4000, "ram"), (0x14000, 0x1000, "mmio")]


def test_hot_path_ram_access_agrees_with_unicorn():
    memory = GuestMemory(Uc(UC_ARCH_X86, UC_MODE_64))
    memory.map_ram(0x20000, PAGE)
    memory.write_phys(0x20010, bytes(range(1, 9)))
    assert memory.phys_read_int(0x20010, 8) == 0x0807060504030201
    assert memory.phys_read_int(0x20011, 3) == 0x040302
    memory.phys_write_int(0x20100, -1, 2)  # truncated to the access size
    assert memory.read_phys(0x20100, 3) == b"\xff\xff\x00"


def test_translation_cached_until_flush():
    memory = _memory_with_tables()
    assert memory.translate(LINEAR + 0x123) == 0x6123
    _map(memory, 0x7000)
    assert memory.translate(LINEAR + 0x123) == 0x6123  # a TLB may keep the stale entry
    memory.flush()
    assert memory.translate(LINEAR + 0x123) == 0x7123


def test_mode_change_flushes_and_faults_are_not_cached():
    memory = _memory_with_tables()
    assert memory.translate(LINEAR, Access.WRITE) == 0x6000
    _map(memory, None)
    memory.set_mode(memory.mode)
    with pytest.raises(GuestFault) as fault:
        memory.translate(LINEAR, Access.WRITE)
    assert fault.value.vector == Vector.PF and fault.value.cr2 == LINEAR
    _map(memory, 0x8000)
    assert memory.translate(LINEAR, Access.WRITE) == 0x8000


def test_virtual_write_spanning_pages_is_all_or_nothing():
    memory = _memory_with_tables()
    _map(memory, 0x6000)
    with pytest.raises(GuestFault):
        memory.write_virt(LINEAR + PAGE - 2, b"abcd")  # the next page is not mapped
    assert memory.read_phys(0x6FFE, 2) == b"\x00\x00"
    memory.write_virt(LINEAR + 8, b"abcd")
    assert memory.read_virt(LINEAR + 8, 4) == b"abcd"


def test_budget_retire_and_unretire_only_count_while_budgeting():
    budget = InstructionBudget("instruction")
    assert budget.left is None
    budget.retire()
    budget.unretire()  # no budget: an unretire is not counted back
    assert budget.retired == 1 and budget.left is None
    budget.left = 5
    budget.retire()
    budget.retire()
    budget.unretire()
    assert (budget.retired, budget.left) == (2, 4)
    budget.left = None
    assert budget.left is None and budget.retired == 2


def test_block_budget_takes_back_what_a_block_did_not_run():
    budget = InstructionBudget("block")
    budget.retire()
    assert budget.retired == 1 and budget.left is None
    budget.left = 10
    budget.store.budget_left -= 7  # the block hook retired a block of 7 instructions
    budget.uncount(3)  # the engine stopped at its fifth: 4 ran
    assert (budget.retired, budget.left) == (5, 6)
    budget.left = None
    assert budget.left is None and budget.retired == 5
