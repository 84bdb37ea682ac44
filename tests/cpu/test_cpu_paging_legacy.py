"""cetvm's own page walks in PAE and 32-bit paging (an L2 guest of a nested hypervisor runs in
them: kvm-unit-tests vmx_pae_test / vmx_pse_test) [SDM Vol. 3 §4.3, §4.4]; the PDPTE checks of a
nested VM entry into PAE paging."""

import pytest

from cetvm.arch import Cr0, Cr4, PfErr
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access, PagingMode, mapping_of, pae_pdptes_valid, translate

P, RW, US, PS = 1, 2, 4, 0x80
NX = 1 << 63


class Memory:
    """Sparse guest-physical memory of 8-byte little-endian words (4-byte tables use the low half)."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def put64(self, gpa: int, value: int) -> None:
        for i in range(8):
            self.bytes[gpa + i] = value >> 8 * i & 0xFF

    def put32(self, gpa: int, value: int) -> None:
        for i in range(4):
            self.bytes[gpa + i] = value >> 8 * i & 0xFF

    def read_u64(self, gpa: int) -> int:
        return sum(self.bytes.get(gpa + i, 0) << 8 * i for i in range(8))


def pae_mode(cr3: int, cr0_extra: int = 0) -> PagingMode:
    return PagingMode(cr0=int(Cr0.PE | Cr0.PG) | cr0_extra, cr3=cr3, cr4=int(Cr4.PAE), efer=0x800)  # NXE


def test_pae_walk_4k_2m_and_rights():
    mem = Memory()
    mem.put64(0x1000, 0x2000 | P)                          # PDPTE 0 -> page directory
    mem.put64(0x2000 + 1 * 8, 0x3000 | P | RW | US)        # PDE 1 -> page table (0x200000..)
    mem.put64(0x3000 + 5 * 8, 0x7000 | P | US)             # PTE 5: read-only user page
    mem.put64(0x2000 + 2 * 8, 0x40_0000 | P | RW | PS | NX)  # PDE 2: 2 MiB page, NX
    mode = pae_mode(0x1000)
    assert translate(mem.read_u64, mode, 0x205123, Access.READ | Access.USER) == 0x7123
    assert translate(mem.read_u64, mode, 0x412345, Access.WRITE) == 0x412345
    with pytest.raises(GuestFault) as write:
        translate(mem.read_u64, mode, 0x205000, Access.WRITE | Access.USER)
    assert write.value.error_code == int(PfErr.P | PfErr.W | PfErr.U)
    with pytest.raises(GuestFault) as fetch:
        translate(mem.read_u64, mode, 0x400000, Access.FETCH)
    assert fetch.value.error_code == int(PfErr.P | PfErr.I)
    with pytest.raises(GuestFault) as missing:  # PDPTE 1 not present
        translate(mem.read_u64, mode, 0x4000_0000, Access.READ)
    assert missing.value.error_code == 0
    assert mapping_of(mem.read_u64, mode, 0x412345).page_size == 2 << 20


def test_32bit_walk_4k_and_4m_pages():
    mem = Memory()
    mem.put32(0x1000 + 0 * 4, 0x2000 | P | RW)             # PDE 0 -> page table
    mem.put32(0x2000 + 3 * 4, 0x9000 | P | RW)             # PTE 3
    mem.put32(0x1000 + 1 * 4, 0x80_0000 | P | RW | PS)     # PDE 1: 4 MiB page at 8 MiB
    mode = PagingMode(cr0=int(Cr0.PE | Cr0.PG), cr3=0x1000, cr4=int(Cr4.PSE), efer=0)
    assert translate(mem.read_u64, mode, 0x3456, Access.READ) == 0x9456
    assert translate(mem.read_u64, mode, 0x41_2345, Access.READ) == 0x81_2345
    assert mapping_of(mem.read_u64, mode, 0x41_2345).page_size == 4 << 20
    without_pse = PagingMode(cr0=mode.cr0, cr3=mode.cr3, cr4=0, efer=0)  # PS ignored: a page table at 8 MiB
    with pytest.raises(GuestFault):
        translate(mem.read_u64, without_pse, 0x41_2345, Access.READ)


def test_pdpte_reserved_bits_fail_the_check():
    mem = Memory()
    mem.put64(0x1000, 0x2000 | P)
    assert pae_pdptes_valid(mem.read_u64, 0x1000, 46)
    for bit in (1, 5, 52, 63):
        mem.put64(0x1008, 0x2000 | P | 1 << bit)
        assert not pae_pdptes_valid(mem.read_u64, 0x1000, 46), bit
    mem.put64(0x1008, 0x2000 | 1 << 63)  # not present: not checked
    assert pae_pdptes_valid(mem.read_u64, 0x1000, 46)
