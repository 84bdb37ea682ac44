"""Test harness: load a guests/cpu ELF into a Vcpu in 64-bit mode with our own page tables,
GDT, TSS (RSP0/IST1) and an IDT whose stubs (guests/cpu/common.S) record each event in the
results page. The memory layout comes from guests/cpu/layout.h (parsed, one source of truth).
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cetvm.arch import CetCtl, Cr0, Cr4, Msr, Pte, Vector, supervisor_token
from cetvm.arch.msr import Efer
from cetvm.cpu.exits import ExitReason, VmExit
from cetvm.cpu.state import DescriptorTable, Segment, Sregs
from cetvm.cpu.vcpu import Vcpu
from cetvm.cpuid import get_model

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = REPO / "guests" / "cpu"
GUEST_BUILD = REPO / "guests" / "build" / "cpu"


def _parse_layout() -> dict[str, int]:
    text = (GUEST_SRC / "layout.h").read_text()
    return {m.group(1): int(m.group(2), 0) for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9A-Fa-f]+|\d+)", text, re.M)}


L = _parse_layout()
PAGE = 0x1000
PT_BASE = 0x2000  # PDPT 0x2000, PD 0x3000, PTs from 0x4000 (see build_page_tables)


def guest_path(name: str) -> Path:
    """Path of a built guest; builds guests/cpu with make when needed (skips without a toolchain)."""
    path = GUEST_BUILD / f"{name}.elf"
    sources = [GUEST_SRC / f"{name}.S", GUEST_SRC / "common.S", GUEST_SRC / "layout.h"]
    if not path.exists() or any(s.stat().st_mtime > path.stat().st_mtime for s in sources if s.exists()):
        try:
            subprocess.run(["make", "-s", "-C", str(GUEST_SRC)], check=True, capture_output=True, text=True)
        except OSError as exc:  # no make: nothing to build with
            pytest.skip(f"cannot build guests/cpu: {exc}")
        except subprocess.CalledProcessError as exc:  # a broken guest must fail the test, not hide it
            pytest.fail(f"make -C {GUEST_SRC} failed:\n{exc.stdout[-2000:]}{exc.stderr[-2000:]}")
    return path


@dataclass
class Elf:
    entry: int
    segments: list[tuple[int, bytes, int, int]]  # vaddr, data, memsz, flags
    symbols: dict[str, int]

    @classmethod
    def load(cls, path: Path) -> "Elf":
        raw = path.read_bytes()
        (e_entry, e_phoff, e_shoff) = struct.unpack_from("<QQQ", raw, 24)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", raw, 54)
        segments = []
        for i in range(e_phnum):
            p_type, p_flags, p_offset, p_vaddr, _pa, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", raw, e_phoff + i * e_phentsize)
            if p_type == 1:
                segments.append((p_vaddr, raw[p_offset:p_offset + p_filesz], p_memsz, p_flags))
        symbols: dict[str, int] = {}
        sections = [struct.unpack_from("<IIQQQQIIQQ", raw, e_shoff + i * e_shentsize) for i in range(e_shnum)]
        for sh in sections:
            if sh[1] == 2:  # SHT_SYMTAB
                strtab = sections[sh[6]]
                for off in range(sh[4], sh[4] + sh[5], 24):
                    st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", raw, off)
                    name_start = strtab[4] + st_name
                    name = raw[name_start:raw.index(b"\0", name_start)].decode()
                    if name:
                        symbols[name] = st_value
        return cls(e_entry, segments, symbols)


@dataclass
class Results:
    count: int
    vector: int
    error: int
    rip: int
    cs: int
    rsp: int
    ssp: int
    ss: int
    handler_rsp: int
    guest: list[int]


@dataclass
class Options:
    model: str = "sapphire-rapids"
    s_cet: int = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)
    u_cet: int = 0
    cr4_cet: bool = True
    ist_vectors: dict[int, int] = field(default_factory=dict)  # vector → IST index
    iret_vectors: tuple[int, ...] = ()  # vectors whose handler returns with IRETQ
    trace: bool = True
    start32: bool = False  # start in 32-bit protected mode with paging off (multiboot-like)


class Machine:
    """A Vcpu with a guest loaded and the harness's system structures in place."""

    def __init__(self, guest: str, options: Options | None = None) -> None:
        self.options = options or Options()
        self.elf = Elf.load(guest_path(guest))
        self.vcpu = Vcpu(get_model(self.options.model), trace=self.options.trace)
        self.vcpu.map_ram(0, L["MMIO_PAGE"])
        self.vcpu.map_mmio(L["MMIO_PAGE"], PAGE)
        for vaddr, data, memsz, _flags in self.elf.segments:
            self.vcpu.write_phys(vaddr, data + bytes(memsz - len(data)))
        self.build_page_tables()
        self.build_gdt_tss()
        self.build_idt()
        self.build_shadow_stacks()
        self.set_initial_state()

    # ------------------------------------------------------------------ structures
    def pte_flags(self, page: int) -> int:
        """Identity-map policy: code pages RX, shadow-stack pages R/W=0 D=1, the rest RW+NX, user."""
        if page == 0:
            return 0
        if page == L["MMIO_PAGE"]:
            return Pte.P | Pte.RW | Pte.NX | Pte.PCD
        kernel_shadow = (L["SSTK_KERNEL"], L["SSTK_KERNEL2"], L["SSTK_IST"], L["SSTK_SPARE"])
        if page in kernel_shadow:
            return Pte.P | Pte.D | Pte.NX
        if page == L["SSTK_USER"]:
            return Pte.P | Pte.D | Pte.US | Pte.NX
        if page == L["SUPERVISOR_PAGE"]:
            return Pte.P | Pte.RW | Pte.NX | Pte.A | Pte.D
        for vaddr, _data, memsz, flags in self.elf.segments:
            if vaddr <= page < vaddr + memsz and flags & 1:  # PF_X
                return Pte.P | Pte.US | Pte.A
        return Pte.P | Pte.RW | Pte.US | Pte.NX | Pte.A | Pte.D

    def build_page_tables(self) -> None:
        ram = L["RAM_SIZE"]
        n_pts = ram // (512 * PAGE)
        pml4, pdpt, pd = L["PML4_ADDR"], PT_BASE, PT_BASE + PAGE
        upper = Pte.P | Pte.RW | Pte.US
        self.write_u64(pml4, pdpt | upper)
        self.write_u64(pdpt, pd | upper)
        for i in range(n_pts):
            pt = PT_BASE + (2 + i) * PAGE
            assert pt < L["GDT_ADDR"], "page tables overlap the GDT"
            self.write_u64(pd + 8 * i, pt | upper)
            entries = b"".join(struct.pack("<Q", ((i * 512 + j) * PAGE) | int(self.pte_flags((i * 512 + j) * PAGE)))
                               for j in range(512))
            self.vcpu.write_phys(pt, entries)

    def set_pte(self, page: int, flags: int) -> None:
        pt = PT_BASE + (2 + page // (512 * PAGE)) * PAGE
        self.write_u64(pt + 8 * ((page // PAGE) % 512), page | flags)

    def build_gdt_tss(self) -> None:
        gdt = [0] * 8
        code64 = 0x00AF9A000000FFFF
        data = 0x00CF92000000FFFF
        gdt[L["KERNEL_CS"] // 8] = code64
        gdt[L["KERNEL_DS"] // 8] = data
        gdt[L["USER_DS"] // 8] = data | (3 << 45)
        gdt[L["USER_CS"] // 8] = code64 | (3 << 45)
        gdt[L["KERNEL_CS32"] // 8] = 0x00CF9A000000FFFF
        tss = L["TSS_ADDR"]
        limit = 0x67
        gdt[L["TSS_SEL"] // 8] = (limit | (tss & 0xFFFFFF) << 16 | 0x89 << 40 | ((tss >> 24) & 0xFF) << 56)
        gdt[L["TSS_SEL"] // 8 + 1] = tss >> 32
        self.vcpu.write_phys(L["GDT_ADDR"], b"".join(struct.pack("<Q", d) for d in gdt))
        self.write_u64(tss + 4, L["KSTACK_TOP"])                 # RSP0
        self.write_u64(tss + 36, L["IST1_STACK_TOP"])            # IST1

    def build_idt(self) -> None:
        stubs = self.elf.symbols.get("isr_stubs")
        if stubs is None:
            return
        entries = []
        for vector in range(256):
            handler = stubs + 16 * vector
            dpl = 3 if vector in (3, 0x80) else 0
            ist = self.options.ist_vectors.get(vector, 0)
            lo = (handler & 0xFFFF) | L["KERNEL_CS"] << 16 | ist << 32 | (0x8E | dpl << 5) << 40 | ((handler >> 16) & 0xFFFF) << 48
            entries.append(struct.pack("<QQ", lo, handler >> 32))
        self.vcpu.write_phys(L["IDT_ADDR"], b"".join(entries))
        for vector in self.options.iret_vectors:
            self.vcpu.write_phys(L["RESULTS_ADDR"] + L["R_ACTION"] + vector, b"\x01")

    def build_shadow_stacks(self) -> None:
        """Free supervisor tokens at the top of SSTK_KERNEL2 (PL0_SSP) and SSTK_IST (ISST[1])."""
        for page in (L["SSTK_KERNEL2"], L["SSTK_IST"]):
            token_at = page + PAGE - 8
            self.write_u64(token_at, supervisor_token(token_at))
        self.write_u64(L["ISST_ADDR"] + 8, L["SSTK_IST"] + PAGE - 8)

    def set_initial_state(self) -> None:
        vcpu = self.vcpu
        if self.options.start32:
            self.set_protected_mode_state()
            return
        cr4 = Cr4.PAE | Cr4.OSFXSR | Cr4.OSXMMEXCPT | Cr4.OSXSAVE | (Cr4.CET if self.options.cr4_cet else 0)
        tr = Segment(L["TSS_SEL"], L["TSS_ADDR"], 0x67, 0x8B00)
        vcpu.set_sregs(Sregs(
            cs=Segment.code64(L["KERNEL_CS"]), ss=Segment.data(L["KERNEL_DS"]), ds=Segment.data(L["KERNEL_DS"]),
            es=Segment.data(L["KERNEL_DS"]), fs=Segment.data(0), gs=Segment.data(0), tr=tr,
            gdt=DescriptorTable(L["GDT_ADDR"], 8 * 8 - 1), idt=DescriptorTable(L["IDT_ADDR"], 256 * 16 - 1),
            cr0=Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG, cr3=L["PML4_ADDR"], cr4=int(cr4),
            efer=Efer.LME | Efer.LMA | Efer.NXE | Efer.SCE))
        vcpu.set_msr(Msr.IA32_S_CET, self.options.s_cet)
        vcpu.set_msr(Msr.IA32_U_CET, self.options.u_cet)
        vcpu.set_msr(Msr.IA32_PL0_SSP, L["SSTK_KERNEL2"] + PAGE - 8)
        vcpu.set_msr(Msr.IA32_PL3_SSP, L["SSTK_USER"] + PAGE)
        vcpu.set_msr(Msr.IA32_INT_SSP_TAB, L["ISST_ADDR"])
        vcpu.set_msr(Msr.IA32_STAR, (0x10 << 48) | (L["KERNEL_CS"] << 32))
        vcpu.ssp = L["SSTK_KERNEL"] + PAGE
        vcpu.set_reg("rsp", L["KSTACK_TOP"])
        vcpu.set_reg("rflags", 0x2)
        vcpu.rip = self.elf.entry

    def set_protected_mode_state(self) -> None:
        """32-bit protected mode, paging off, flat segments, CPL 0 (EAX/EBX as multiboot sets them)."""
        vcpu = self.vcpu
        tr = Segment(L["TSS_SEL"], L["TSS_ADDR"], 0x67, 0x8B00)
        vcpu.set_sregs(Sregs(
            cs=Segment.code32(L["KERNEL_CS32"]), ss=Segment.data(L["KERNEL_DS"]), ds=Segment.data(L["KERNEL_DS"]),
            es=Segment.data(L["KERNEL_DS"]), fs=Segment.data(L["KERNEL_DS"]), gs=Segment.data(L["KERNEL_DS"]), tr=tr,
            gdt=DescriptorTable(L["GDT_ADDR"], 8 * 8 - 1), idt=DescriptorTable(L["IDT_ADDR"], 0),
            cr0=Cr0.PE | Cr0.ET, cr3=0, cr4=0, efer=0))
        vcpu.set_reg("rax", 0x2BADB002)
        vcpu.set_reg("rsp", L["KSTACK_TOP"])
        vcpu.set_reg("rflags", 0x2)
        vcpu.rip = self.elf.entry

    # ------------------------------------------------------------------ running
    def sym(self, name: str) -> int:
        return self.elf.symbols[name]

    def run_case(self, symbol: str, max_exits: int = 50) -> VmExit:
        self.vcpu.rip = self.sym(symbol)
        return self.run(max_exits)

    def run(self, max_exits: int = 50) -> VmExit:
        """Run to the first exit other than IO/CPUID (which the harness completes trivially)."""
        for _ in range(max_exits):
            exit_ = self.vcpu.run()
            if exit_.reason == ExitReason.CPUID:
                for reg in ("rax", "rbx", "rcx", "rdx"):
                    self.vcpu.set_reg(reg, 0)
                continue
            return exit_
        raise AssertionError("guest did not stop")

    @property
    def results(self) -> Results:
        raw = self.vcpu.read_phys(L["RESULTS_ADDR"], 0x300)
        q = lambda off: struct.unpack_from("<Q", raw, off)[0]  # noqa: E731
        return Results(q(L["R_COUNT"]), q(L["R_VECTOR"]), q(L["R_ERROR"]), q(L["R_RIP"]), q(L["R_CS"]),
                       q(L["R_RSP"]), q(L["R_SSP"]), q(L["R_SS"]), q(L["R_HANDLER_RSP"]),
                       [q(L["R_GUEST"] + 8 * i) for i in range(16)])

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.vcpu.read_phys(addr, 8))[0]

    def write_u64(self, addr: int, value: int) -> None:
        self.vcpu.write_phys(addr, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))


# ---------------------------------------------------------------- cases the CET paths must agree on
SHSTK_IBT = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN)
#: Guest cases whose end states every pair of CET paths must agree on (native vs Python,
#: Python fast path vs reference): (guest, case, options).
AGREEMENT_CASES = [
    ("shstk_ret", "case_calls", Options()),
    ("shstk_ret", "case_corrupt_ret", Options()),
    ("shstk_ret", "case_ret_to_unmapped", Options()),
    ("ibt", "case_good", Options()),
    ("ibt", "case_jmp_bad", Options()),
    ("ibt", "case_call_bad", Options()),
    ("ibt", "case_notrack_jmp", Options(s_cet=SHSTK_IBT | CetCtl.NO_TRACK_EN)),
    ("cet_insn", "case_rdssp_incssp", Options()),
    ("cet_insn", "case_pivot", Options()),
    ("paging_ss", "case_call_on_normal_page", Options(ist_vectors={Vector.PF: 1})),
    ("ring3", "case_user_events", Options(u_cet=int(CetCtl.SH_STK_EN), ist_vectors={0x80: 1}, iret_vectors=(3, 0x80))),
    ("ring3", "case_syscall", Options(u_cet=int(CetCtl.SH_STK_EN))),
    ("farret", "case_far_roundtrip", Options()),
    ("farret", "case_far_ret_mismatch", Options()),
    ("target_fault", "case_target_with_endbr", Options()),
    ("target_fault", "case_target_without_endbr", Options()),
]
SHADOW_STACK_PAGES = ("SSTK_KERNEL", "SSTK_KERNEL2", "SSTK_IST", "SSTK_SPARE", "SSTK_USER")
