"""String instructions that touch memory without RAM: one iteration at a time, MMIO by MMIO.

Unicorn executes MOVS/LODS/STOS/CMPS/SCAS (with or without REP) on RAM itself; when an element
lies in guest-physical memory with no RAM (a device page such as the xAPIC's, or nothing at
all) the engine stops at the instruction — after the iterations that completed, whose register
updates stand, as string instructions are restartable [SDM Vol. 2 "REP/REPE/REPZ/REPNE/REPNZ"].
This module then performs exactly one iteration, the way KVM's emulator does for string MMIO
(one exit per MMIO element, RIP kept at the instruction while a REP count remains):

- the accesses of the iteration, in order: MOVS reads [seg:rSI] then writes [ES:rDI]; CMPS reads
  both; LODS reads [seg:rSI]; STOS writes and SCAS reads [ES:rDI]. Each is translated with the
  current paging mode at the current privilege; RAM is accessed directly, anything else is an
  MMIO exit (:class:`~cetvm.cpu.exits.MmioExit`);
- :func:`string_iteration` is replayed from the start after each MMIO exit with the values the
  hypervisor returned so far (``completed``, in access order); nothing architectural is changed
  until the last access is done (a RAM write before an MMIO exit is repeated with the same value);
- then rSI/rDI advance by ±element size (RFLAGS.DF), RAX is loaded (LODS), the arithmetic flags
  of ``src - dst`` are set (CMPS, SCAS: ``rAX - [ES:rDI]``); with a REP prefix rCX is decremented
  and RIP advances only when rCX reaches 0 — or, for CMPS/SCAS, when REPE finds ZF = 0 / REPNE
  finds ZF = 1. A REP instruction with rCX = 0 does nothing but advance RIP.
- every iteration counts as one instruction against the vCPU's budget, as the engine counts the
  iterations of a REP on RAM (QEMU's TCG runs each iteration as one pass of the instruction): a
  REP over MMIO with a huge count ends at ``--max-instructions`` like any other loop.

INS/OUTS (string port I/O) are handled by :func:`port_string_iteration`, one I/O exit per element.

Decisions: the
address size (16/32/64-bit rSI/rDI/rCX) follows the instruction's operands; only the source
segment may be overridden, and only FS/GS have a base in 64-bit mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from iced_x86 import Instruction, MemorySizeExt, Mnemonic as M, OpKind, Register

from cetvm import NotSupportedError
from cetvm.arch import Msr, u64
from cetvm.arch.vmx import io_qualification
from cetvm.arch.regs import RFLAGS_AF, RFLAGS_CF, RFLAGS_DF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF, RFLAGS_ZF
from cetvm.cpu.exits import Direction, ExitReason, IoExit, MmioExit, VmExit
from cetvm.cpu.paging import Access

_ARITH_FLAGS = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

_MOVS = frozenset({M.MOVSB, M.MOVSW, M.MOVSD, M.MOVSQ})
_CMPS = frozenset({M.CMPSB, M.CMPSW, M.CMPSD, M.CMPSQ})
_LODS = frozenset({M.LODSB, M.LODSW, M.LODSD, M.LODSQ})
_STOS = frozenset({M.STOSB, M.STOSW, M.STOSD, M.STOSQ})
_SCAS = frozenset({M.SCASB, M.SCASW, M.SCASD, M.SCASQ})
_PORT_STRINGS = frozenset({M.INSB, M.INSW, M.INSD, M.OUTSB, M.OUTSW, M.OUTSD})

#: address size of a string operand's implicit register
_ADDRESS_BITS = {
    OpKind.MEMORY_SEG_RSI: 64, OpKind.MEMORY_SEG_ESI: 32, OpKind.MEMORY_SEG_SI: 16,
    OpKind.MEMORY_ESRDI: 64, OpKind.MEMORY_ESEDI: 32, OpKind.MEMORY_ESDI: 16,
}


def is_memory_string(instr: Instruction) -> bool:
    """MOVS, CMPS, LODS, STOS or SCAS (any element size, any prefix)."""
    return instr.is_string_instruction and instr.mnemonic not in _PORT_STRINGS


@dataclass(frozen=True)
class StringShape:
    """What one iteration of ``instr`` does: element size, address size, which operands."""

    element: int
    address_bits: int
    reads_source: bool        # [seg:rSI]
    reads_destination: bool   # [ES:rDI]
    writes_destination: bool
    loads_accumulator: bool   # LODS
    compares: bool            # CMPS / SCAS (flags)
    uses_source: bool

    @classmethod
    def of(cls, instr: Instruction) -> "StringShape":
        mnemonic = instr.mnemonic
        if mnemonic in _PORT_STRINGS or not instr.is_string_instruction:
            raise NotSupportedError(f"string port I/O or a non-string instruction ({instr}) is not supported here")
        element = MemorySizeExt.size(instr.memory_size)
        kinds = [instr.op_kind(i) for i in range(instr.op_count)]
        bits = next((_ADDRESS_BITS[k] for k in kinds if k in _ADDRESS_BITS), 64)
        return cls(element=element, address_bits=bits,
                   reads_source=mnemonic in _MOVS or mnemonic in _CMPS or mnemonic in _LODS,
                   reads_destination=mnemonic in _CMPS or mnemonic in _SCAS,
                   writes_destination=mnemonic in _MOVS or mnemonic in _STOS,
                   loads_accumulator=mnemonic in _LODS,
                   compares=mnemonic in _CMPS or mnemonic in _SCAS,
                   uses_source=mnemonic in _MOVS or mnemonic in _CMPS or mnemonic in _LODS)


def sub_flags(a: int, b: int, bits: int) -> int:
    """CF, PF, AF, ZF, SF, OF of ``a - b`` at operand size ``bits`` [SDM Vol. 1 3.4.3.1]."""
    mask = (1 << bits) - 1
    a, b = a & mask, b & mask
    result = (a - b) & mask
    sign = 1 << (bits - 1)
    flags = 0
    if a < b:
        flags |= RFLAGS_CF
    if bin(result & 0xFF).count("1") % 2 == 0:
        flags |= RFLAGS_PF
    if (a ^ b ^ result) & 0x10:
        flags |= RFLAGS_AF
    if result == 0:
        flags |= RFLAGS_ZF
    if result & sign:
        flags |= RFLAGS_SF
    if (a ^ b) & (a ^ result) & sign:
        flags |= RFLAGS_OF
    return flags


class _Accesses:
    """The memory accesses of one replayed iteration: RAM directly, MMIO from ``completed``."""

    def __init__(self, vcpu, completed: list[int | None]) -> None:
        self.vcpu = vcpu
        self.completed = completed
        self.mmio_index = 0
        self.user = Access.USER if vcpu.cpl == 3 else Access.READ

    def _gpa(self, linear: int, size: int, write: bool) -> tuple[int, bool]:
        access = self.user | (Access.WRITE if write else Access.READ)
        gpa = self.vcpu.translate(linear, access)
        if (linear & 0xFFF) + size > 0x1000:
            self.vcpu.translate(u64(linear + size - 1), access)  # the second page must translate too
        return gpa, self.vcpu.is_ram(gpa, size)

    def read(self, linear: int, size: int) -> int | MmioExit:
        gpa, ram = self._gpa(linear, size, write=False)
        if ram:
            return int.from_bytes(self.vcpu.read_virt(linear, size, self.user), "little")
        return self._mmio(MmioExit(gpa, size, Direction.IN, 0))

    def write(self, linear: int, size: int, value: int) -> MmioExit | None:
        gpa, ram = self._gpa(linear, size, write=True)
        if ram:
            self.vcpu.write_virt(linear, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"),
                                 self.user | Access.WRITE)
            return None
        result = self._mmio(MmioExit(gpa, size, Direction.OUT, value & ((1 << (8 * size)) - 1)))
        return result if isinstance(result, MmioExit) else None

    def _mmio(self, exit_: MmioExit) -> int | MmioExit:
        index = self.mmio_index
        self.mmio_index += 1
        if index < len(self.completed):
            return self.completed[index] or 0
        return exit_


def string_iteration(vcpu, instr: Instruction, completed: list[int | None]) -> MmioExit | None:
    """Replay one iteration of ``instr`` at ``vcpu.rip`` (see the module docstring). Returns the
    next MMIO access the hypervisor must perform, or None when the iteration is complete (its
    registers, flags and RIP are then committed and the instruction retired if RIP advanced).
    Raises GuestFault for a translation fault (the iteration then did not happen)."""
    shape = StringShape.of(instr)
    amask = (1 << shape.address_bits) - 1
    rflags = vcpu.reg("rflags")
    count = vcpu.reg("rcx") & amask
    repeated = instr.has_rep_prefix or instr.has_repe_prefix or instr.has_repne_prefix
    if repeated and count == 0:
        _advance(vcpu, instr)
        return None
    step = -shape.element if rflags & RFLAGS_DF else shape.element
    rsi, rdi = vcpu.reg("rsi"), vcpu.reg("rdi")
    source = u64(_segment_base(vcpu, instr) + (rsi & amask))
    destination = rdi & amask  # ES has no base in 64-bit mode; cetvm's engine is 64-bit here
    accesses = _Accesses(vcpu, completed)
    src_value = dst_value = 0
    if shape.reads_source:
        value = accesses.read(source, shape.element)
        if isinstance(value, MmioExit):
            return value
        src_value = value
    if shape.reads_destination:
        value = accesses.read(destination, shape.element)
        if isinstance(value, MmioExit):
            return value
        dst_value = value
    if shape.writes_destination:
        data = src_value if instr.mnemonic in _MOVS else vcpu.reg("rax")
        pending = accesses.write(destination, shape.element, data)
        if pending is not None:
            return pending
    # -- commit
    if shape.loads_accumulator:
        _write_accumulator(vcpu, src_value, shape.element)
    if shape.compares:
        left = src_value if instr.mnemonic in _CMPS else vcpu.reg("rax")
        rflags = (rflags & ~_ARITH_FLAGS) | sub_flags(left, dst_value, 8 * shape.element)
        vcpu.set_reg("rflags", rflags)
    if shape.uses_source:
        vcpu.set_reg("rsi", (rsi & ~amask) | ((rsi + step) & amask) if shape.address_bits != 32 else (rsi + step) & amask)
    if shape.reads_destination or shape.writes_destination:
        vcpu.set_reg("rdi", (rdi & ~amask) | ((rdi + step) & amask) if shape.address_bits != 32 else (rdi + step) & amask)
    vcpu.retire_emulated()  # one iteration, as the engine counts a REP iteration on RAM
    if not repeated:
        vcpu.rip = instr.next_ip
        return None
    count = (count - 1) & amask
    rcx = vcpu.reg("rcx")
    vcpu.set_reg("rcx", (rcx & ~amask) | count if shape.address_bits != 32 else count)
    zf = bool(rflags & RFLAGS_ZF)
    ends = count == 0 or (shape.compares and ((instr.has_repe_prefix and not zf) or (instr.has_repne_prefix and zf)))
    if ends:
        vcpu.rip = instr.next_ip
    return None


def _segment_base(vcpu, instr: Instruction) -> int:
    segment = instr.memory_segment
    if segment == Register.FS:
        return vcpu.msr(Msr.IA32_FS_BASE)
    if segment == Register.GS:
        return vcpu.msr(Msr.IA32_GS_BASE)
    return 0


def _write_accumulator(vcpu, value: int, size: int) -> None:
    """AL/AX merge into RAX; EAX zero-extends; RAX whole."""
    rax = vcpu.reg("rax")
    if size == 8:
        vcpu.set_reg("rax", value)
    elif size == 4:
        vcpu.set_reg("rax", value & 0xFFFF_FFFF)
    else:
        mask = (1 << (8 * size)) - 1
        vcpu.set_reg("rax", (rax & ~mask) | (value & mask))


def _advance(vcpu, instr: Instruction) -> None:
    vcpu.rip = instr.next_ip
    vcpu.retire_emulated()


# --------------------------------------------------------------------------- string port I/O
def is_port_string(instr: Instruction) -> bool:
    """INS or OUTS (any element size, any prefix)."""
    return instr.mnemonic in _PORT_STRINGS


def port_string_iteration(vcpu, instr: Instruction) -> VmExit | None:
    """One iteration of INS/OUTS [SDM Vol. 2 INS/OUTS, REP]: an I/O exit for the element at
    [ES:rDI] (INS, written when the exit completes) or [seg:rSI] (OUTS); the completion advances
    rDI/rSI by ±size (RFLAGS.DF), decrements rCX with REP and moves RIP past the instruction when
    the count ends — so a REP INS/OUTS is one exit per element and restartable, as on a CPU.
    An element in MMIO takes an MMIO exit as well (OUTS: read before the I/O exit; INS: stored
    after it), as KVM's emulator does. I/O permission is not checked (as IN/OUT, see
    cetvm.cpu.emulate.port_io)."""
    size = MemorySizeExt.size(instr.memory_size)
    kinds = [instr.op_kind(i) for i in range(instr.op_count)]
    bits = next((_ADDRESS_BITS[k] for k in kinds if k in _ADDRESS_BITS), 64)
    amask = (1 << bits) - 1
    repeated = instr.has_rep_prefix or instr.has_repe_prefix or instr.has_repne_prefix
    if repeated and vcpu.reg("rcx") & amask == 0:
        _advance(vcpu, instr)
        return None
    step = -size if vcpu.reg("rflags") & RFLAGS_DF else size
    port = vcpu.reg("rdx") & 0xFFFF
    user = Access.USER if vcpu.cpl == 3 else Access.READ
    outs = instr.mnemonic in (M.OUTSB, M.OUTSW, M.OUTSD)
    index = "rsi" if outs else "rdi"
    pointer = vcpu.reg(index)
    linear = u64(_segment_base(vcpu, instr) + (pointer & amask)) if outs else pointer & amask
    gpa = vcpu.translate(linear, user | (Access.READ if outs else Access.WRITE))  # a #PF comes first
    in_ram = vcpu.is_ram(gpa, size) and (linear & 0xFFF) + size <= 0x1000

    def finish() -> None:
        _step_register(vcpu, index, pointer, step, bits)
        vcpu.retire_emulated()
        if repeated:
            count = (vcpu.reg("rcx") - 1) & amask
            _step_register(vcpu, "rcx", vcpu.reg("rcx"), -1, bits)
            if count:
                return
        vcpu.rip = instr.next_ip

    def io_exit(data: int) -> VmExit:
        io = IoExit(port, size, Direction.OUT, data) if outs else IoExit(port, size, Direction.IN)

        def complete() -> VmExit | None:
            if outs:
                finish()
                return None
            value = io.data & ((1 << (8 * size)) - 1)
            if in_ram:
                vcpu.write_virt(linear, value.to_bytes(size, "little"), user | Access.WRITE)
                finish()
                return None
            store = MmioExit(gpa, size, Direction.OUT, value)  # INS into MMIO: the store exits too
            vcpu.add_completion(finish)
            return VmExit(ExitReason.MMIO, instr.ip, mmio=store)
        vcpu.add_completion(complete)
        qualification = io_qualification(size, not outs, port, string=True, rep=repeated)
        return VmExit(ExitReason.IO, instr.ip, instr.len, io=io, qualification=qualification)

    if not outs or in_ram:
        return io_exit(int.from_bytes(vcpu.read_virt(linear, size, user), "little") if outs else 0)
    load = MmioExit(gpa, size, Direction.IN)  # OUTS from MMIO: the element is read by an exit first
    vcpu.add_completion(lambda: io_exit(load.data))
    return VmExit(ExitReason.MMIO, instr.ip, mmio=load)


def _step_register(vcpu, name: str, value: int, delta: int, bits: int) -> None:
    """Add ``delta`` to an implicit address/count register at address size ``bits`` (a 32-bit
    update zero-extends, a 16-bit one keeps the upper bits)."""
    mask = (1 << bits) - 1
    new = (value + delta) & mask
    vcpu.set_reg(name, new if bits == 32 else (value & ~mask) | new)
