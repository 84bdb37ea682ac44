"""Alignment checking: #AC(0) for a misaligned data access at CPL 3 with CR0.AM = 1 and
RFLAGS.AC = 1 [SDM Vol. 3 §6.15 "Interrupt 17 — Alignment Check Exception", Table 6-7].

The engine (Unicorn 2.1.4, QEMU TCG) checks no alignment, so while the three conditions hold
the vCPU runs one instruction at a time and checks the data accesses of each before it runs
(:meth:`cetvm.cpu.vcpu.Vcpu`'s run loop): a word, doubleword or quadword access (explicit
operands and the implicit stack accesses of PUSH, POP, CALL, RET...) must be aligned on its
size, an 80-bit x87 value on 8 bytes. Other sizes (SSE vectors, far pointers, descriptor-table
images) are not checked (decision: the SDM leaves several of them model-specific).

Decision: the conditions are checked at every stop of the engine, and the instruction-by-
instruction mode follows them from there; an IRETQ or SYSRET into user mode with RFLAGS.AC set
stops (the native event path hands it to Python, which emulates it), a POPF that sets RFLAGS.AC
inside an engine run takes effect at the next stop.
"""

from __future__ import annotations

from iced_x86 import Instruction, InstructionInfoFactory, MemorySizeExt, Register

from cetvm.arch import Cr0
from cetvm.arch.regs import RFLAGS_AC

#: Access size → the alignment #AC requires (Table 6-7).
ALIGNMENT_BY_SIZE = {2: 2, 4: 4, 8: 8, 10: 8}
_U64 = (1 << 64) - 1
_INFO = InstructionInfoFactory()


def alignment_checked(cpl: int, cr0: int, rflags: int) -> bool:
    """Alignment checking is on: CPL 3, CR0.AM and RFLAGS.AC."""
    return cpl == 3 and bool(cr0 & Cr0.AM) and bool(rflags & RFLAGS_AC)


def misaligned_access(instr: Instruction, read_register, segment_base) -> bool:
    """Does ``instr`` access data at an address not aligned for its size? ``read_register(reg)``
    gives an iced register's value, ``segment_base(reg)`` the base of FS/GS (0 otherwise)."""
    for used in _INFO.info(instr).used_memory():
        alignment = ALIGNMENT_BY_SIZE.get(MemorySizeExt.size(used.memory_size))
        if alignment is None:
            continue
        if used.base in (Register.RIP, Register.EIP):
            address = instr.ip_rel_memory_address
        else:
            address = used.displacement
            if used.base != Register.NONE:
                address += read_register(used.base)
            if used.index != Register.NONE:
                address += read_register(used.index) * used.scale
        address = (address + segment_base(used.segment)) & _U64
        if address % alignment:
            return True
    return False
