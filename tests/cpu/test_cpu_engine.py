"""Engine pieces without guests: paging rules, state round trips, Unicorn self-check, bench."""

from __future__ import annotations

import struct

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_MODE_64, Uc
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RIP

from cetvm import CetvmError
from cetvm.arch import Cr0, Cr4, Msr, PfErr, Pte
from cetvm.arch.msr import Efer
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.paging import Access, PagingMode, translate
from cetvm.cpu.state import Segment, SegAttr
from cetvm.cpu.uc_context import EngineCpu
from cetvm.cpu.vcpu import Vcpu
from cetvm.cpuid import get_model

MODE = PagingMode(int(Cr0.PG | Cr0.PE | Cr0.WP), 0x1000, int(Cr4.PAE), int(Efer.LME | Efer.LMA | Efer.NXE))


def tables(leaf_flags: int, upper: int = Pte.P | Pte.RW | Pte.US) -> dict[int, int]:
    """PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000 → page 0x5000 mapping linear 0."""
    return {0x1000: 0x2000 | upper, 0x2000: 0x3000 | upper, 0x3000: 0x4000 | upper, 0x4000: 0x5000 | leaf_flags}


def walk(mem: dict[int, int], access: Access, linear: int = 0x123) -> int:
    return translate(lambda a: mem.get(a, 0), MODE, linear, access)


def pf(mem, access) -> int:
    with pytest.raises(GuestFault) as info:
        walk(mem, access)
    assert info.value.vector == 14 and info.value.cr2 == 0x123
    return info.value.error_code


SS_PAGE = Pte.P | Pte.D            # R/W=0, D=1: a supervisor shadow-stack page
NORMAL = Pte.P | Pte.RW | Pte.D


def test_shadow_stack_access_to_a_shadow_stack_page_translates():
    assert walk(tables(SS_PAGE), Access.SHADOW_STACK | Access.WRITE) == 0x5123
    assert walk(tables(SS_PAGE | Pte.US), Access.SHADOW_STACK | Access.USER) == 0x5123


def test_shadow_stack_access_to_a_normal_page_is_pf_ss():
    assert pf(tables(NORMAL), Access.SHADOW_STACK | Access.WRITE) == PfErr.P | PfErr.W | PfErr.SS
    assert pf(tables(Pte.P), Access.SHADOW_STACK) == PfErr.P | PfErr.SS          # read-only, D=0


def test_shadow_stack_page_needs_writable_upper_levels():
    assert pf(tables(SS_PAGE, upper=Pte.P | Pte.US), Access.SHADOW_STACK) == PfErr.P | PfErr.SS


def test_supervisor_shadow_stack_access_to_a_user_page_faults():
    assert pf(tables(SS_PAGE | Pte.US), Access.SHADOW_STACK) == PfErr.P | PfErr.SS


def test_ordinary_write_to_a_shadow_stack_page_is_pf_without_ss_and_reads_work():
    assert pf(tables(SS_PAGE), Access.WRITE) == PfErr.P | PfErr.W
    assert walk(tables(SS_PAGE), Access.READ) == 0x5123


def test_not_present_user_and_nx_faults():
    assert pf(tables(0), Access.WRITE | Access.USER) == PfErr.W | PfErr.U
    assert pf(tables(NORMAL), Access.READ | Access.USER) == PfErr.P | PfErr.U   # U/S=0 leaf
    assert pf(tables(NORMAL | Pte.NX), Access.FETCH) == PfErr.P | PfErr.I


def test_non_canonical_address_is_gp():
    with pytest.raises(GuestFault) as info:
        walk(tables(NORMAL), Access.READ, linear=0x0000_8000_0000_0000)
    assert info.value.vector == 13


def test_segment_descriptor_decoding():
    seg = Segment.from_descriptor(0x23, 0x0000FFFF, 0x00AFFA00)
    assert seg.long and seg.dpl == 3 and seg.present and seg.limit == 0xFFFF_FFFF and seg.base == 0
    seg = Segment.from_descriptor(0x10, 0x1234FFFF, 0x56CF9278)
    assert seg.base == 0x56781234 and seg.default_big and not seg.attributes & SegAttr.CODE


def make_vcpu(**kw) -> Vcpu:
    vcpu = Vcpu(get_model("sapphire-rapids"), **kw)
    vcpu.map_ram(0, 0x10000)
    return vcpu


def test_sregs_round_trip_and_cpl_follows_ss_dpl():
    vcpu = make_vcpu()
    sregs = vcpu.get_sregs()
    sregs.cs = Segment.code64(0x33, dpl=3)
    sregs.ss = Segment.data(0x2B, dpl=3)
    sregs.cr0 |= Cr0.PE | Cr0.PG  # 64-bit mode needs LMA = LME AND CR0.PG (Unicorn starts with PG=0)
    sregs.cr4 |= Cr4.PAE
    vcpu.set_sregs(sregs)
    again = vcpu.get_sregs()
    assert again.cs == sregs.cs and again.ss == sregs.ss
    assert vcpu.cpl == 3 and vcpu.long_mode


def test_host_msr_access_and_memory_regions():
    vcpu = make_vcpu()
    vcpu.set_msr(Msr.IA32_PL0_SSP, 0x5000)
    vcpu.set_msr(Msr.IA32_LSTAR, 0xFFFF_8000_0000_1000)
    assert vcpu.msr(Msr.IA32_PL0_SSP) == 0x5000 and vcpu.msr(Msr.IA32_LSTAR) == 0xFFFF_8000_0000_1000
    vcpu.write_phys(0x100, b"abc")
    assert vcpu.read_phys(0x100, 3) == b"abc"
    from cetvm import InputError

    with pytest.raises(InputError, match="overlaps"):
        vcpu.map_ram(0x8000, 0x1000)
    with pytest.raises(InputError, match="page-aligned"):
        vcpu.map_mmio(0x10001, 0x1000)


def test_model_without_cet_makes_cr4_cet_reserved_and_cet_instructions_ud():
    from cetvm.cpu import emulate
    from cetvm.cpu.decode import decode_one

    model = get_model("zen4")  # no IBT; check which CET features it has
    vcpu = Vcpu(model)
    assert vcpu.has_ibt is False
    model = get_model("skylake-sp")
    vcpu = Vcpu(model)
    assert not vcpu.has_shstk and not vcpu.has_ibt and vcpu.traced
    vcpu.map_ram(0, 0x10000)
    vcpu.set_reg("rax", Cr4.CET | Cr4.PAE)
    mov_cr4 = decode_one(bytes.fromhex("0f22e0"), 0x1000)  # mov cr4, rax
    with pytest.raises(GuestFault) as info:
        emulate.emulate(vcpu, mov_cr4)
    assert info.value.vector == 13
    setssbsy = decode_one(bytes.fromhex("f30f01e8"), 0x1000)
    with pytest.raises(GuestFault) as info:
        emulate.emulate(vcpu, setssbsy)
    assert info.value.vector == 6


@pytest.mark.parametrize("index,value,faults", [
    (Msr.IA32_PL0_SSP, 0x1000, False),
    (Msr.IA32_PL0_SSP, 0x1004, False),          # 4-byte alignment is enough for the MSR
    (Msr.IA32_PL3_SSP, 0x1002, True),
    (Msr.IA32_PL1_SSP, 0x0000_8000_0000_0000, True),
    (Msr.IA32_S_CET, 1 << 6, True),              # reserved bits 9:6
    (Msr.IA32_S_CET, (1 << 10) | (1 << 11), True),
    (Msr.IA32_U_CET, 0x5, False),
    (Msr.IA32_INT_SSP_TAB, 0xFFFF_8000_0000_0000, False),
    (Msr.IA32_INT_SSP_TAB, 0x0000_8000_0000_0000, True),
])
def test_cet_msr_wrmsr_checks(index, value, faults):
    from cetvm.cpu.emulate import cet_msr_write_fault

    assert cet_msr_write_fault(None, index, value) is faults


def test_bench_workload_instruction_count_is_exact():
    from cetvm.cli.bench import instruction_count, make_vcpu as bench_vcpu

    vcpu = bench_vcpu(10, cet=True)
    exit_ = vcpu.run(budget=10_000)
    assert exit_.reason.value == "hlt"
    assert vcpu.instructions_retired == instruction_count(10)
    assert vcpu.ssp == 0x31000  # balanced shadow stack


def test_bench_command_json(capsys):
    import json

    from cetvm.cli.main import main

    assert main(["bench", "--json", "--iterations", "200"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # The documented keys scripts rely on (more may be added).
    assert set(doc) >= {"cet_on_mips", "cet_off_mips", "ratio", "instructions", "cet_on_native_mips",
                        "cet_on_python_mips", "cet_on_native_ring3_mips", "cet_off_ring3_mips"}
    assert doc["cet_on_mips"] > 0 and doc["cet_off_mips"] > 0 and doc["cet_on_python_mips"] > 0
    from cetvm.cpu.native import native_available

    if native_available():  # "cet_on_mips" is the best available path
        assert doc["cet_on_mips"] == doc["cet_on_native_mips"] > 0
    else:
        assert doc["cet_on_native_mips"] is None and doc["cet_on_mips"] == doc["cet_on_python_mips"]
    assert main(["bench", "--iterations", "0"]) == 2


def test_untraced_vcpu_runs_without_block_hook_and_halts():
    from cetvm.cli.bench import instruction_count, make_vcpu as bench_vcpu

    vcpu = bench_vcpu(1000, cet=False)
    assert not vcpu.traced
    exit_ = vcpu.run()
    assert exit_.reason.value == "hlt" and vcpu.reg("rdx") == 1000 and vcpu.block_count == 0
    assert instruction_count(1000) == 11 * 1000 + 2


def test_unicorn_self_check_refuses_another_version(monkeypatch):
    import unicorn

    from cetvm import CetvmError

    monkeypatch.setattr(unicorn, "__version__", "2.0.1")
    with pytest.raises(CetvmError, match="unicorn==2.1.4"):
        Vcpu(get_model("sapphire-rapids"))


def test_public_api_is_exported_lazily():
    import cetvm.cpu as cpu

    assert cpu.Vcpu is Vcpu and cpu.ExitReason.HLT.value == "hlt"
    with pytest.raises(AttributeError):
        cpu.NoSuchThing  # noqa: B018


def test_paging_off_guest_can_store_next_to_its_code_and_run_it():
    """Virtual-TLB mode (paging off): a page is R+X for fetches and R+W for data; switching
    between them must stay correct (a store into the code page, then executing it)."""
    from cetvm.cpu.exits import ExitReason
    from cetvm.cpu.state import DescriptorTable, Sregs

    vcpu = Vcpu(get_model("sapphire-rapids"))
    vcpu.map_ram(0, 0x10000)
    # 32-bit: mov byte [0x1020], 0xF4 (hlt); mov dword [0x1100], 0x1234; jmp 0x1020
    code = bytes.fromhex("c60520100000f4") + bytes.fromhex("c70500110000 34120000") + bytes.fromhex("eb00")
    jmp_at = 0x1000 + len(code) - 2
    code = code[:-1] + bytes([(0x1020 - (jmp_at + 2)) & 0xFF])
    vcpu.write_phys(0x1000, code)
    gdt = 0x8000
    vcpu.write_phys(gdt, struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF))
    vcpu.set_sregs(Sregs(cs=Segment.code32(0x08), ds=Segment.data(0x10), es=Segment.data(0x10), ss=Segment.data(0x10),
                         fs=Segment.data(0x10), gs=Segment.data(0x10), gdt=DescriptorTable(gdt, 23),
                         cr0=int(Cr0.PE | Cr0.ET)))
    vcpu.rip = 0x1000
    exit_ = vcpu.run()
    assert exit_.reason == ExitReason.HLT and exit_.rip == 0x1020
    assert vcpu.read_phys(0x1100, 4) == struct.pack("<I", 0x1234)


def _counting_engine():
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\x48\xff\xc0" * 6 + b"\xf4")  # 6 x INC RAX; HLT
    starts: list[tuple[int, int]] = []

    def block(engine, address, size, _data):
        starts.append((address, size))
        if len(starts) == 2:
            engine.emu_stop()
    uc.hook_add(UC_HOOK_BLOCK, block)
    return uc, starts


def test_the_engine_cpu_runs_a_block_of_the_first_instructions_beside_the_whole_one():
    """EngineCpu (cflags_next_tb): the next block holds exactly N instructions, the one after it
    starts behind them, and the block's own translation is not disturbed."""
    uc, starts = _counting_engine()
    engine_cpu = EngineCpu.find(uc)
    assert engine_cpu is not None  # the pinned Unicorn's layout
    uc.emu_start(0x1000, 0x1012)
    assert starts == [(0x1000, 18)] and uc.reg_read(UC_X86_REG_RAX) == 6
    for _ in range(2):  # the short block, then again from the cache
        starts.clear()
        uc.reg_write(UC_X86_REG_RAX, 0)
        engine_cpu.next_block_instructions(2)
        uc.emu_start(0x1000, 0x1012)
        assert starts == [(0x1000, 6), (0x1006, 12)]
        assert (uc.reg_read(UC_X86_REG_RAX), uc.reg_read(UC_X86_REG_RIP)) == (2, 0x1006)
    starts.clear()
    uc.reg_write(UC_X86_REG_RAX, 0)
    uc.emu_start(0x1000, 0x1012)  # no request: the whole block as before
    assert starts == [(0x1000, 18)] and uc.reg_read(UC_X86_REG_RAX) == 6
    with pytest.raises(CetvmError, match="1..32767"):
        engine_cpu.next_block_instructions(0)
