"""EFER after a reset to real mode: LMA = LME AND CR0.PG [SDM Vol. 3 §10.8.5].

Unicorn's 64-bit engine starts with EFER.LMA set and CR0.PG clear; QEMU only changes LMA when a
CR0 write toggles PG, so without the vCPU's fix-up a reset to real mode read back EFER = 0x400.
"""

from __future__ import annotations

from cetvm.arch import Cr0, Cr4, Msr
from cetvm.arch.msr import Efer
from cetvm.cpu.bootstrap import build_identity_map, code_page_flags, data_page_flags, enter_long_mode
from cetvm.cpu.exits import ExitReason
from cetvm.cpu.state import Segment, Sregs
from cetvm.cpu.vcpu import Vcpu
from cetvm.cpuid import get_model

RAM = 2 << 20
REAL_CODE = 0x7C00
LONG_CODE = 0x20000
#: Real-mode segment caches as after RESET (present, accessed; code: execute/read).
REAL_DATA_AR = 0x9300
REAL_CODE_AR = 0x9B00


def real_mode_sregs(cs_base: int = 0) -> Sregs:
    data = lambda: Segment(0, 0, 0xFFFF, REAL_DATA_AR)  # noqa: E731
    return Sregs(cs=Segment(cs_base >> 4, cs_base, 0xFFFF, REAL_CODE_AR), ds=data(), es=data(), fs=data(),
                 gs=data(), ss=data(), tr=Segment(0, 0, 0xFFFF, 0x8B00), ldt=Segment(0, 0, 0xFFFF, 0x8200),
                 cr0=int(Cr0.ET | Cr0.NW | Cr0.CD), efer=0)


def new_vcpu() -> Vcpu:
    vcpu = Vcpu(get_model("sapphire-rapids"))
    vcpu.map_ram(0, RAM)
    return vcpu


def test_reset_to_real_mode_reads_back_efer_zero():
    vcpu = new_vcpu()
    vcpu.set_sregs(real_mode_sregs())
    assert vcpu.get_sregs().efer == 0
    assert vcpu.msr(Msr.IA32_EFER) == 0
    assert not vcpu.long_mode


def test_real_mode_guest_rdmsr_of_efer_sees_zero():
    vcpu = new_vcpu()
    vcpu.set_sregs(real_mode_sregs())
    vcpu.write_phys(REAL_CODE, bytes.fromhex(
        "66b9800000c0"      # mov ecx, 0xC0000080
        "0f32"              # rdmsr
        "f4"                # hlt
    ))
    vcpu.set_reg("rax", 0xDEAD)
    vcpu.rip = REAL_CODE
    exit_ = vcpu.run(100)
    assert exit_.reason == ExitReason.HLT, exit_
    assert vcpu.reg("rax") & 0xFFFF_FFFF == 0 and vcpu.reg("rdx") & 0xFFFF_FFFF == 0


def test_long_mode_after_real_mode_sets_lma_and_runs_64_bit_code():
    vcpu = new_vcpu()
    vcpu.set_sregs(real_mode_sregs())
    cr3 = build_identity_map(vcpu, 0x1000, RAM, lambda a: code_page_flags() if a == LONG_CODE else data_page_flags())
    enter_long_mode(vcpu, cr3=cr3, gdt=0x10000)
    assert vcpu.get_sregs().efer & (Efer.LME | Efer.LMA) == Efer.LME | Efer.LMA
    vcpu.write_phys(LONG_CODE, bytes.fromhex("48b8efcdab8967452301f4"))  # mov rax, imm64; hlt
    vcpu.set_reg("rsp", 0x80000)
    vcpu.rip = LONG_CODE
    assert vcpu.run(100).reason == ExitReason.HLT
    assert vcpu.reg("rax") == 0x0123_4567_89AB_CDEF  # a 64-bit immediate: really 64-bit mode


def test_lma_follows_lme_and_paging_when_paging_was_already_on():
    """32-bit paging (CR0.PG=1, LMA=0) then a 64-bit load with CR0.PG still 1: no PG toggle."""
    vcpu = new_vcpu()
    vcpu.set_sregs(real_mode_sregs())
    sregs = vcpu.get_sregs()
    sregs.cr0 = int(Cr0.PE | Cr0.PG | Cr0.ET)
    sregs.cs = Segment.code32(8)
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs().efer & Efer.LMA == 0
    sregs.cr4 = int(Cr4.PAE)
    sregs.efer = int(Efer.LME)
    sregs.cs = Segment.code64(8)
    vcpu.set_sregs(sregs)
    assert vcpu.get_sregs().efer & Efer.LMA
    assert vcpu.long_mode
