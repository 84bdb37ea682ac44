"""Benchmark and test rig (not part of the package): a bare Unicorn machine with CET for
measuring and checking the block-hook paths in isolation.

It is not the vCPU (that is :class:`cetvm.cpu.vcpu.Vcpu`): one 64-bit guest with its own
4-level page tables (code RX, data RW+NX, one shadow-stack page R/W=0 D=1 NX), started at ring 0
(supervisor shadow stack, S_CET) or ring 3 (user shadow stack, U_CET), run by raw Unicorn with
one of three block hooks:

- ``"off"``: no hook (the raw engine speed, CET not enforced);
- ``"python"``: a Python UC_HOOK_BLOCK running :func:`cetvm.cpu.cet.transfer.on_block_start`;
- ``"native"``: :class:`cetvm.cpu.native.NativeCet`, with hand-overs to the same function.

Both CET paths stop at the first fault and report it as :class:`RawResult`, so their
architectural results (registers, SSP, U_CET/S_CET, shadow-stack memory, the fault) can be
compared. Guest memory is mapped with ``mem_map_ptr`` from a buffer this object owns (so the
native code writes the guest's shadow stack directly), or with ``mem_map`` (``direct_ram=False``,
the native code then goes through ``uc_mem_read``/``uc_mem_write``).

The call-heavy loop (:func:`call_loop_code`) is the benchmark guest: per iteration 14
instructions in 5 translation blocks — a direct CALL and an indirect CALL (``call rax``) to two
ENDBR64 functions, 2 RET, ALU work, DEC/JNZ.
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass, field

from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from cetvm import InputError
from cetvm.arch import ENDBR64, CetCtl, Cr0, Cr4, Msr, Pte
from cetvm.arch.msr import Efer
from cetvm.arch.regs import U64_MASK
from cetvm.cpu import decode
from cetvm.cpu.blocks import BlockInfo, BlockTracker
from cetvm.cpu.cet.transfer import BlockAction, classify_terminator, on_block_start
from cetvm.cpu.faults import GuestFault
from cetvm.cpu.native import NativeCet, PagingKind
from cetvm.cpu.paging import Access, PagingMode, translate
from cetvm.cpu.state import CetState, Segment
from cetvm.cpu.uc_context import ContextBlob, segment_hflags

PAGE = 0x1000
MEMORY_SIZE = 0x100000
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
CODE = 0x10000
CODE_PAGES = 4
STACK = 0x20000
STACK_PAGES = 2
SHADOW_STACK = 0x30000
#: Initial SSP: top of the shadow-stack page.
SSP_TOP = SHADOW_STACK + PAGE
DATA = 0x40000
#: The loop's iteration counter register and the indirect-call target register.
ITERATIONS_PER_LOOP = 14
BLOCKS_PER_LOOP = 5
CALLS_PER_LOOP = 2
INDIRECT_CALLS_PER_LOOP = 1
PATHS = ("off", "python", "native")


@dataclass(frozen=True)
class GuestCode:
    """Machine code placed at ``CODE`` with named offsets; ``end`` is where the run stops."""

    code: bytes
    labels: dict[str, int] = field(default_factory=dict)

    def addr(self, label: str) -> int:
        return CODE + self.labels[label]

    @property
    def end(self) -> int:
        return self.addr("end")


def call_loop_code(*, f2_endbr: bool = True, corrupt_return: bool = False) -> GuestCode:
    """The call-heavy loop (RCX = iterations; RAX = f2 is set by the harness).

    loop: call f1; call rax; add r9, rdx; mov r10, rdi; dec rcx; jnz loop; end:
    f1:   endbr64; add rbx, 1; mov rdx, rbx; ret
    f2:   endbr64; add rsi, 1; xor rdi, rsi; ret
    ``f2_endbr=False`` drops f2's ENDBR64 (an IBT violation at the indirect call);
    ``corrupt_return=True`` makes f1 overwrite its return address with the address of f2 first
    (``mov qword [rsp], imm32`` — a ROP-style corruption the shadow stack must catch).
    """
    f1_body = ENDBR64
    if corrupt_return:
        f1_body += b"\x48\xc7\x04\x24" + b"\0\0\0\0"  # mov qword [rsp], imm32 (patched below)
    f1_body += b"\x48\x83\xc3\x01" + b"\x48\x89\xda" + b"\xc3"
    f2_body = (ENDBR64 if f2_endbr else b"") + b"\x48\x83\xc6\x01" + b"\x48\x31\xf7" + b"\xc3"
    loop_len = 5 + 2 + 3 + 3 + 3 + 2
    f1_off = loop_len + 16
    f2_off = f1_off + len(f1_body) + 16
    code = bytearray(f2_off + len(f2_body))
    body = bytearray()
    body += b"\xe8" + struct.pack("<i", f1_off - 5)        # call f1
    body += b"\xff\xd0"                                      # call rax
    body += b"\x4d\x01\xd1"                                  # add r9, r10 -> (r9 += r10)
    body += b"\x49\x89\xfa"                                  # mov r10, rdi
    body += b"\x48\xff\xc9"                                  # dec rcx
    body += b"\x75" + struct.pack("<b", -(len(body) + 2))   # jnz loop
    assert len(body) == loop_len
    code[0:loop_len] = body
    code[loop_len:loop_len + 1] = b"\xf4"                   # end: hlt (never executed: run stops here)
    if corrupt_return:
        f1_body = f1_body[:8] + struct.pack("<I", CODE + f2_off) + f1_body[12:]
    code[f1_off:f1_off + len(f1_body)] = f1_body
    code[f2_off:f2_off + len(f2_body)] = f2_body
    return GuestCode(bytes(code), {"loop": 0, "end": loop_len, "f1": f1_off, "f2": f2_off,
                                   "call_f1": 0, "call_rax": 5, "f1_ret": f1_off + len(f1_body) - 1})


def mixed_transfers_code(*, target_endbr: bool = True, f2_endbr: bool = True) -> GuestCode:
    """Every terminator kind the fast path handles, once per iteration (RAX = f2, RCX = count).

    loop: call .+5 (disp 0: pushes nothing on the shadow stack); pop r11;
          notrack call rax; push 0; call f3 (f3: endbr64; ret 8);
          lea rbx, [rip+tgt]; jmp rbx; tgt: [endbr64]; dec rcx; jnz loop; end:
    f2:   [endbr64]; add rsi, 1; xor rdi, rsi; ret
    """
    body = bytearray()
    body += b"\xe8\x00\x00\x00\x00" + b"\x41\x5b"           # call .+5; pop r11
    notrack_at = len(body)
    body += b"\x3e\xff\xd0"                                   # notrack call rax
    body += b"\x6a\x00"                                        # push 0
    call_f3_at = len(body)
    body += b"\xe8\x00\x00\x00\x00"                         # call f3 (patched)
    lea_at = len(body)
    body += b"\x48\x8d\x1d\x00\x00\x00\x00"                 # lea rbx, [rip+tgt] (patched)
    body += b"\xff\xe3"                                        # jmp rbx
    tgt = len(body)
    body += (ENDBR64 if target_endbr else b"") + b"\x48\xff\xc9"  # [endbr64]; dec rcx
    body += b"\x75" + struct.pack("<b", -(len(body) + 2))       # jnz loop
    end = len(body)
    body += b"\xf4"
    f2_off = end + 16
    f3_off = f2_off + 32
    struct.pack_into("<i", body, call_f3_at + 1, f3_off - (call_f3_at + 5))
    struct.pack_into("<i", body, lea_at + 3, tgt - (lea_at + 7))
    f2 = (ENDBR64 if f2_endbr else b"") + b"\x48\x83\xc6\x01" + b"\x48\x31\xf7" + b"\xc3"
    f3 = ENDBR64 + b"\xc2\x08\x00"                               # endbr64; ret 8
    code = bytearray(f3_off + len(f3))
    code[:len(body)] = body
    code[f2_off:f2_off + len(f2)] = f2
    code[f3_off:f3_off + len(f3)] = f3
    return GuestCode(bytes(code), {"loop": 0, "end": end, "f2": f2_off, "f3": f3_off, "tgt": tgt,
                                   "notrack_call": notrack_at})


@dataclass
class RawResult:
    """What a run left behind (compare between paths)."""

    path: str
    rip: int
    rsp: int
    rcx: int
    ssp: int
    cet_ctl: int
    fault: GuestFault | None
    shadow_stack: bytes
    instructions: int
    seconds: float

    @property
    def mips(self) -> float:
        return self.instructions / self.seconds / 1e6 if self.seconds > 0 else 0.0


class _RawCetMachine:
    """:class:`cetvm.cpu.cet.machine.CetMachine` over the raw Unicorn (reference path)."""

    def __init__(self, harness: "RawHarness", cet) -> None:
        self._h = harness
        self.cet = cet

    @property
    def cpl(self) -> int:
        return self._h.cpl

    @property
    def long_mode(self) -> bool:
        return True

    @property
    def cr4_cet(self) -> bool:
        return True

    @property
    def ssp(self) -> int:
        return self.cet.ssp

    @ssp.setter
    def ssp(self, value: int) -> None:
        self.cet.ssp = value & U64_MASK

    def cet_msr(self, msr: Msr) -> int:
        return self.cet.u_cet if msr == Msr.IA32_U_CET else self.cet.s_cet

    def set_cet_msr(self, msr: Msr, value: int) -> None:
        if msr == Msr.IA32_U_CET:
            self.cet.u_cet = value
        else:
            self.cet.s_cet = value

    def _translate(self, linear: int, access: Access) -> int:
        return self._h.translate(linear, access)

    def ss_read(self, linear: int, size: int, *, user: bool) -> int:
        gpa = self._translate(linear, Access.SHADOW_STACK | (Access.USER if user else Access.READ))
        return int.from_bytes(self._h.uc.mem_read(gpa, size), "little")

    def ss_write(self, linear: int, value: int, size: int, *, user: bool) -> None:
        gpa = self._translate(linear, Access.SHADOW_STACK | Access.WRITE | (Access.USER if user else Access.READ))
        self._h.uc.mem_write(gpa, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))

    def ss_cmpxchg(self, linear: int, expected: int, new: int, *, user: bool) -> tuple[bool, int]:
        old = self.ss_read(linear, 8, user=user)
        if old == expected:
            self.ss_write(linear, new, 8, user=user)
            return True, old
        return False, old

    def mem_read(self, linear: int, size: int) -> int:
        gpa = self._translate(linear, Access.USER if self.cpl == 3 else Access.READ)
        return int.from_bytes(self._h.uc.mem_read(gpa, size), "little")


class RawHarness:
    """One raw guest: ``cpl`` 0 or 3, ``path`` in :data:`PATHS`, CET on unless path is "off"."""

    def __init__(self, guest: GuestCode, *, cpl: int = 0, path: str = "native", direct_ram: bool = True,
                 ibt: bool = True, shstk: bool = True, paging: bool = True, tlb_fill: bool = False,
                 extra_ctl: int = 0) -> None:
        if path not in PATHS:
            raise InputError(f"path must be one of {', '.join(PATHS)}")
        if cpl not in (0, 3):
            raise InputError("cpl must be 0 or 3")
        self.guest = guest
        self.cpl = cpl
        self.path = path
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._buffer = None
        if direct_ram:
            self._buffer = ctypes.create_string_buffer(MEMORY_SIZE)
            self.uc.mem_map_ptr(0, MEMORY_SIZE, UC_PROT_ALL, ctypes.addressof(self._buffer))
        else:
            self.uc.mem_map(0, MEMORY_SIZE, UC_PROT_ALL)
        self.uc.mem_write(CODE, guest.code)
        if paging:
            self._write_page_tables()
            self._enter_long_mode()
        else:  # Unicorn's flat 64-bit start-up state, CR0.PG=0: linear = physical
            if cpl != 0:
                raise InputError("the flat (paging off) raw guest runs at CPL 0 only")
            self.uc.reg_write(X.UC_X86_REG_CR4, Cr4.CET)
        ctl = (CetCtl.SH_STK_EN if shstk else 0) | (CetCtl.ENDBR_EN if ibt else 0) | extra_ctl
        self.cet = CetState()
        self.native = None
        self.blocks = BlockTracker()
        self.fault: GuestFault | None = None
        if path == "native":
            self.native = NativeCet(self.uc, self._classify)
            if direct_ram:
                self.native.add_ram(0, MEMORY_SIZE, ctypes.addressof(self._buffer))
            self.native.sync_mode(cpl=cpl, long_mode=True, cr4_cet=True,
                                  paging=PagingKind.FOUR_LEVEL if paging else PagingKind.OFF,
                                  cr3=self.uc.reg_read(X.UC_X86_REG_CR3))
            self.cet = self.native.cet_state
            self.blocks = self.native.blocks
            self.native.install()
        if tlb_fill:
            if paging:
                raise InputError("the TLB-fill hook is for paging-off guests")
            if self.native is None:
                self.native = NativeCet(self.uc, self._classify)
            self.native.install_tlb_fill()
        if path == "python":
            self.uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        if path != "off":
            if cpl == 3:
                self.cet.u_cet = ctl
            else:
                self.cet.s_cet = ctl
        self.cet.ssp = SSP_TOP
        self.machine = _RawCetMachine(self, self.cet)
        self._mode = PagingMode(self.uc.reg_read(X.UC_X86_REG_CR0), self.uc.reg_read(X.UC_X86_REG_CR3),
                                self.uc.reg_read(X.UC_X86_REG_CR4), self.uc.msr_read(Msr.IA32_EFER))

    # ---------------------------------------------------------------- machine set-up
    def _pte(self, table: int, index: int, value: int) -> None:
        self.uc.mem_write(table + index * 8, struct.pack("<Q", value))

    def _write_page_tables(self) -> None:
        user = Pte.US if self.cpl == 3 else 0
        upper = Pte.P | Pte.RW | Pte.US  # U/S decided at the leaf (supervisor: leaf U/S=0)
        self._pte(PML4, 0, PDPT | upper)
        self._pte(PDPT, 0, PD | upper)
        self._pte(PD, 0, PT | upper)
        for page in range(MEMORY_SIZE // PAGE):
            addr = page * PAGE
            if CODE <= addr < CODE + CODE_PAGES * PAGE:
                flags = Pte.P | user  # RX
            elif SHADOW_STACK <= addr < SHADOW_STACK + PAGE:
                flags = Pte.P | Pte.D | Pte.NX | user  # shadow-stack page: R/W=0, D=1
            else:
                flags = Pte.P | Pte.RW | Pte.NX | user
            self._pte(PT, page, addr | int(flags))

    def _enter_long_mode(self) -> None:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR4, Cr4.PAE | Cr4.CET)
        uc.reg_write(X.UC_X86_REG_CR3, PML4)
        uc.msr_write(Msr.IA32_EFER, Efer.LME | Efer.NXE | Efer.LMA)
        uc.reg_write(X.UC_X86_REG_CR0, Cr0.PE | Cr0.PG | Cr0.WP)
        if self.cpl == 3:
            blob = ContextBlob.save(uc)
            cs, ss = Segment.code64(0x33, dpl=3), Segment.data(0x2B, dpl=3)
            blob.set_segment("cs", cs)
            blob.set_segment("ss", ss)
            blob.hflags = segment_hflags(blob.hflags, cs, ss, blob.segment("ds"), blob.segment("es"), True)
            blob.restore(uc)

    def translate(self, linear: int, access: Access) -> int:
        return translate(lambda gpa: int.from_bytes(self.uc.mem_read(gpa, 8), "little"), self._mode, linear, access)

    # ---------------------------------------------------------------- classification (both paths)
    def _classify(self, address: int, size: int) -> bool:
        code = bytes(self.uc.mem_read(address, max(size, 1)))
        instrs = decode.decode_block(code, address, 64)
        terminator = classify_terminator(instrs[-1]) if instrs else None
        self.blocks.store(BlockInfo(address, size, terminator, code[:4]))
        return True

    # ---------------------------------------------------------------- the Python reference hook
    def _on_block(self, uc: Uc, address: int, size: int, _data: object) -> None:
        info = self.blocks.lookup(address, size)
        if info is None:
            self._classify(address, size)
            info = self.blocks.lookup(address, size)
        prev = self.blocks.take_prev(info.terminator)
        decision = on_block_start(self.machine, prev, address, uc.reg_read(X.UC_X86_REG_RSP), info.first_bytes)
        if decision.action == BlockAction.FAULT:
            self._take_fault(decision)

    def _take_fault(self, decision) -> None:
        self.uc.reg_write(X.UC_X86_REG_RIP, decision.rip)
        if decision.rsp is not None:
            self.uc.reg_write(X.UC_X86_REG_RSP, decision.rsp)
        self.fault = decision.fault
        self.blocks.prev = None
        self.uc.emu_stop()

    def _apply_handover(self) -> bool:
        """Run on_block_start for the native hook's hand-over; True if the run may continue."""
        request = self.native.take_handover()
        if request is None:
            return False
        info = self.blocks.lookup(request.block_addr, 0) or None
        first = info.first_bytes if info else bytes(self.uc.mem_read(request.block_addr, 4))
        decision = on_block_start(self.machine, request.terminator, request.block_addr,
                                  self.uc.reg_read(X.UC_X86_REG_RSP), first)
        if decision.action == BlockAction.FAULT:
            self._take_fault(decision)
            return False
        return True

    # ---------------------------------------------------------------- running
    def run(self, iterations: int) -> RawResult:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RCX, iterations)
        uc.reg_write(X.UC_X86_REG_RAX, self.guest.addr("f2"))
        uc.reg_write(X.UC_X86_REG_RSP, STACK + STACK_PAGES * PAGE)
        self.fault = None
        rip = self.guest.addr("loop")
        start = time.perf_counter()
        while True:
            uc.emu_start(rip, self.guest.end)
            if self.path == "native":
                self.native.raise_callback_error()
                if self._apply_handover():
                    rip = uc.reg_read(X.UC_X86_REG_RIP)
                    continue
            break
        seconds = time.perf_counter() - start
        done = iterations - uc.reg_read(X.UC_X86_REG_RCX)
        ctl = self.cet.u_cet if self.cpl == 3 else self.cet.s_cet
        return RawResult(self.path, uc.reg_read(X.UC_X86_REG_RIP), uc.reg_read(X.UC_X86_REG_RSP),
                         uc.reg_read(X.UC_X86_REG_RCX), self.cet.ssp, ctl, self.fault,
                         bytes(uc.mem_read(SHADOW_STACK, PAGE)), done * ITERATIONS_PER_LOOP, seconds)
