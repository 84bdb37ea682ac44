"""The vCPU's cached mode and its instruction fetch: two small parts every other part reads.

:class:`CpuMode` is the mode-defining state the hot paths read per block or per instruction
(CPL, 64-bit mode, the code segment's bitness and base, CR4.CET, whether CET is active), cached
from the registers by :meth:`cetvm.cpu.vcpu.Vcpu.refresh_mode` — the only writer of the
register-derived fields — so a block hook reads one plain attribute instead of decoding QEMU's
hflags. ``cet_active`` is written by the CET part (:class:`cetvm.cpu.vcpu_cet.VcpuCet`) whenever
CR4.CET, U_CET or S_CET change; ``stepping`` by the single step of
:meth:`cetvm.cpu.exit_emulation.ExitEmulation.step_in_engine`.

:class:`InstructionFetch` reads instruction bytes at the current privilege [SDM Vol. 3 §4.6:
an instruction fetch is a user-mode access at CPL 3] and decodes one instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Instruction

from cetvm.cpu import decode
from cetvm.cpu.memory import GuestMemory
from cetvm.cpu.paging import Access


@dataclass(slots=True)
class CpuMode:
    """The cached mode of a vCPU (read by every part; see the module docstring for the writers)."""

    #: current privilege level (0 with CR0.PE clear)
    cpl: int = 0
    #: 64-bit mode (IA-32e with CS.L = 1)
    long_mode: bool = True
    #: decoder bitness of the code segment: 64-bit mode, else CS.D (32) or real/16-bit (16)
    code_bits: int = 64
    #: CS.base (RIP is an offset from it)
    cs_base: int = 0
    #: CR4.CET
    cr4_cet: bool = False
    #: CR4.CET and SH_STK_EN or ENDBR_EN in U_CET or S_CET: every block hook tests it first
    cet_active: bool = False
    #: one instruction runs in the engine with the CET hooks off
    stepping: bool = False
    #: an interrupt waits for the window: the block hook stops the engine in front of the first
    #: block that starts with it open (:meth:`cetvm.cpu.block_hook.BlockHook.watch_interrupt_window`)
    irq_window_watch: bool = False

    def linear(self, rip: int) -> int:
        """The linear address of the instruction at offset ``rip`` of the code segment
        (CS.base + RIP) [SDM Vol. 3 §3.4 "Logical and linear addresses"]: the address the engine
        compares its exits with, reports to its hooks and keys its translations on, in every
        mode (QEMU's translation-block pc), whereas RIP (``emu_start``'s start address, register
        reads and writes) is the offset. They differ only while CS.base is not 0: real mode with
        a nonzero CS (an AP started by a SIPI runs at CS.base = vector << 12), a 16/32-bit
        segment with a base."""
        return self.cs_base + rip

    def user_access(self) -> Access:
        """The privilege of an ordinary access at the current CPL [SDM Vol. 3 §4.6]."""
        return Access.USER if self.cpl == 3 else Access.READ


class InstructionFetch:
    """Instruction bytes and decoded instructions at the vCPU's current mode."""

    def __init__(self, memory: GuestMemory, mode: CpuMode) -> None:
        self._memory = memory
        self._mode = mode

    def read_code(self, linear: int, size: int) -> bytes:
        """Instruction bytes; stops early at an untranslatable page (fewer bytes, no fault)."""
        return self._memory.read_code(linear, size, Access.FETCH | self._mode.user_access())

    def fetch_instruction(self, rip: int) -> Instruction:
        """Decode the instruction at offset ``rip`` of the code segment (fetched at its linear
        address, ``ip`` = ``rip``: what emulation reports and writes to RIP; raises GuestFault)."""
        mode = self._mode
        code = self.read_code(mode.linear(rip), decode.MAX_INSTRUCTION_LENGTH)
        return decode.decode_one(code, rip, mode.code_bits)

    def decode_block(self, address: int, size: int) -> list[Instruction]:
        """The instructions of the ``size`` bytes at linear ``address`` (fewer at a fetch fault)."""
        return decode.decode_block(self.read_code(address, size), address, self._mode.code_bits)
