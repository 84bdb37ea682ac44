"""Interrupt and exception delivery through the guest IDT in 64-bit mode (Unicorn does not).

[SDM Vol. 3 §6.14 "Exception and interrupt handling in 64-bit mode", §6.15 (#DF), §6.12.1.2
(stack switching), §7.7 (64-bit TSS); SDM Vol. 2 INT n pseudo-code for the CET steps, done by
:func:`cetvm.cpu.cet.far_transfers.ssp_on_event`.]

The native path delivers the common #PF (a 64-bit gate without IST to CPL 0) inside the engine
(cetfast.c, "page faults"), with the same rules; this module decides every other case.

Decisions (documented simplifications):
- only 64-bit interrupt and trap gates (IA-32e mode: from 64-bit or compatibility mode, with the
  32-bit CS and EIP in the frame); delivery outside IA-32e mode ends the run with a SHUTDOWN
  exit naming the reason;
- the error code of a fault raised while reading the IDT/GDT/TSS sets EXT (bit 0) for hardware
  events; #GP/#NP on a bad gate use the IDT form (vector·8 + 2);
- double faults per SDM Table 6-5 (contributory = #DE #TS #NP #SS #GP #CP; #PF then #PF or
  contributory → #DF); a fault while delivering #DF is a triple fault.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch import Cr0, Vector, VECTORS_WITH_ERROR_CODE
from cetvm.arch.regs import RFLAGS_AC, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF, RFLAGS_VM, is_fault_exception
from cetvm.arch.msr import Efer, Msr
from cetvm.cpu.cet.far_transfers import ssp_on_event
from cetvm.cpu.exits import ExitReason, VmExit
from cetvm.cpu.faults import GuestFault, NoRamAccess, gp
from cetvm.cpu.paging import Access
from cetvm.cpu.state import Segment, SegAttr
from cetvm.arch.regs import U64_MASK as _U64

GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF
CONTRIBUTORY = frozenset({Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.CP})
#: 64-bit TSS: RSP0 at +4 (RSPn at 4 + 8n), IST1 at +36 (ISTn at 36 + 8(n-1)) [SDM Vol. 3 §8.7].
TSS_RSP0 = 4
TSS_IST1 = 36


@dataclass
class PendingEvent:
    """An exception or interrupt waiting for delivery through the IDT (the vCPU holds at most one)."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None
    software: bool = False  # INT n / INT3 / INTO: gate DPL check, RIP already past the instruction
    injected: bool = False  # by the hypervisor: not subject to the exception bitmap (VM entry)
    #: software events: the address of the INT instruction itself. A fault while delivering
    #: the event is a fault of the INT: it is reported (and its shadow-stack frame names the
    #: LIP) at this address, not past the INT [SDM vol. 3 6.5 "faults ... the return address
    #: points to the faulting instruction"; INT n is the instruction being executed].
    instruction_rip: int | None = None
    #: a non-maskable interrupt (VM-entry interruption type NMI): delivered through vector 2
    #: whatever RFLAGS.IF says, and it blocks further NMIs until the next IRET [SDM Vol. 3 §6.7.1]
    nmi: bool = False


@dataclass(frozen=True)
class IdtGate:
    """A 64-bit IDT gate descriptor (16 bytes)."""

    offset: int
    selector: int
    ist: int
    gate_type: int
    dpl: int
    present: bool

    @classmethod
    def decode(cls, raw: bytes) -> "IdtGate":
        lo = int.from_bytes(raw[0:8], "little")
        hi = int.from_bytes(raw[8:16], "little")
        offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32)
        return cls(offset, (lo >> 16) & 0xFFFF, (lo >> 32) & 7, (lo >> 40) & 0xF, (lo >> 45) & 3, bool(lo >> 47 & 1))


def double_fault_class(first: int, second: int) -> str:
    """SDM Table 6-5: "double" (deliver #DF), or "serial" (deliver the second one)."""
    if first == Vector.PF and (second == Vector.PF or second in CONTRIBUTORY):
        return "double"
    if first in CONTRIBUTORY and second in CONTRIBUTORY:
        return "double"
    return "serial"


def deliver(vcpu, event) -> VmExit | None:
    """Deliver ``event`` (a vcpu PendingEvent) through the IDT of IA-32e mode or the IVT of
    real-address mode; nested faults become #DF, then a triple fault."""
    if vcpu.msr(Msr.IA32_EFER) & Efer.LMA:
        deliver_one = deliver_64
    elif not vcpu.cr0 & Cr0.PE:
        deliver_one = deliver_real
    else:
        return VmExit(ExitReason.EMULATION_FAILED, vcpu.rip,
                      detail=f"vector {event.vector} raised in legacy protected mode (IDT delivery is implemented "
                             "in IA-32e mode and real-address mode only)")
    current = event
    chain = [_describe(event.vector, event.error_code, event.cr2)]
    for _attempt in range(3):
        try:
            deliver_one(vcpu, current.vector, current.error_code, current.cr2, software=current.software)
            return None
        except NoRamAccess as err:
            if current.software and current.instruction_rip is not None:
                vcpu.rip = current.instruction_rip
            return VmExit(ExitReason.DELIVERY_FAILED, vcpu.rip,
                          detail=f"delivering {_describe(current.vector, current.error_code, current.cr2)}: {err}")
        except GuestFault as fault:
            chain.append(str(fault))
            if current.software and current.instruction_rip is not None:
                vcpu.rip = current.instruction_rip
            if current.vector == Vector.DF:
                return VmExit(ExitReason.TRIPLE_FAULT, vcpu.rip,
                              detail=f"{fault} while delivering #DF (fault chain: {' -> '.join(chain)})")
            if not current.software and double_fault_class(current.vector, fault.vector) == "double":
                current = type(event)(Vector.DF, 0)
                chain.append("#DF(0x0)")
            else:
                current = type(event)(fault.vector, fault.error_code, fault.cr2)
    return VmExit(ExitReason.TRIPLE_FAULT, vcpu.rip,
                  detail=f"nested faults during event delivery (fault chain: {' -> '.join(chain)})")


def _describe(vector: int, error_code: int | None, cr2: int | None) -> str:
    """The first event of a chain, named like a GuestFault ('#UD', '#PF(0x2) at 0x...')."""
    return str(GuestFault(vector, error_code, cr2))


def _supervisor_read(vcpu, linear: int, size: int) -> bytes:
    return vcpu.read_virt(linear, size, Access.READ)


def read_descriptor(vcpu, selector: int) -> Segment:
    """Load the GDT code/data descriptor of ``selector`` (LDT selectors are not supported)."""
    gdt = vcpu.descriptor_table("gdt")
    index = selector & ~7
    if selector & 4 or index + 7 > gdt.limit or index == 0:
        raise gp(selector & ~3)
    raw = _supervisor_read(vcpu, gdt.base + index, 8)
    low, high = int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:], "little")
    return Segment.from_descriptor(selector, low, high)


def real_mode_stack(vcpu) -> tuple[Segment, int]:
    """SS and the stack-pointer mask of real-address mode: SP (wrapping at 64 KiB), or ESP when
    SS.B is set (a "big real mode" SS loaded in protected mode) [SDM Vol. 3 §21.1.1]."""
    ss = vcpu.segment("ss")
    return ss, 0xFFFF_FFFF if ss.attributes & SegAttr.DB else 0xFFFF


def deliver_real(vcpu, vector: int, error_code: int | None, cr2: int | None, *, software: bool) -> None:
    """Deliver one event in real-address mode [SDM Vol. 3 §21.1.4; Vol. 2A INT n
    "REAL-ADDRESS-MODE"]: the IVT entry (offset, segment words) at IDTR.base + 4 * vector, #GP
    beyond IDTR.limit; FLAGS, CS and IP pushed as words on SS:SP; IF, TF and AC cleared; CS =
    the segment (base = selector << 4; limit and attributes kept), IP = the offset. No error code
    is pushed (``error_code`` and ``cr2`` of a fault are dropped; CR2 is already written)."""
    del error_code, cr2
    idt = vcpu.descriptor_table("idt")
    if vector * 4 + 3 > idt.limit:
        raise gp(vector * 8 + 2 + (0 if software else 1))
    entry = vcpu.read_virt(idt.base + vector * 4, 4, Access.READ)
    offset, selector = int.from_bytes(entry[:2], "little"), int.from_bytes(entry[2:], "little")
    ss, mask = real_mode_stack(vcpu)
    rsp = vcpu.reg("rsp")
    sp = rsp & mask
    rflags = vcpu.reg("rflags")
    cs = vcpu.segment("cs")
    for word in (rflags & 0xFFFF, cs.selector, vcpu.rip & 0xFFFF):
        sp = (sp - 2) & mask
        vcpu.write_virt((ss.base + sp) & 0xFFFF_FFFF, word.to_bytes(2, "little"), Access.WRITE)
    vcpu.set_reg("rsp", (rsp & ~mask) | sp)
    vcpu.set_reg("rflags", rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC))
    vcpu.load_segments(cs=Segment(selector, selector << 4, cs.limit, cs.attributes))
    vcpu.rip = offset


def deliver_64(vcpu, vector: int, error_code: int | None, cr2: int | None, *, software: bool) -> None:
    """Deliver one event through a 64-bit IDT gate (raises GuestFault for a nested fault)."""
    ext = 0 if software else 1
    idt = vcpu.descriptor_table("idt")
    if vector * 16 + 15 > idt.limit:
        raise gp(vector * 8 + 2 + ext)
    gate = IdtGate.decode(_supervisor_read(vcpu, idt.base + vector * 16, 16))
    if gate.gate_type not in (GATE_INTERRUPT, GATE_TRAP):
        raise gp(vector * 8 + 2 + ext)
    old_cpl = vcpu.cpl
    if software and gate.dpl < old_cpl:
        raise gp(vector * 8 + 2)
    if not gate.present:
        raise GuestFault(Vector.NP, vector * 8 + 2 + ext)
    code = read_descriptor(vcpu, gate.selector)
    if not code.attributes & SegAttr.CODE or code.dpl > old_cpl:
        raise gp(gate.selector & ~3 | ext)
    if not code.present:  # [SDM Vol. 2A INT n "IA-32e mode": #NP(new code-segment selector, EXT)]
        raise GuestFault(Vector.NP, gate.selector & ~3 | ext)
    if not code.long:
        raise gp(gate.selector & ~3 | ext)
    new_cpl = code.dpl
    rsp = vcpu.reg("rsp")
    if gate.ist or new_cpl < old_cpl:
        tss = vcpu.task_register().base
        slot = TSS_IST1 + 8 * (gate.ist - 1) if gate.ist else TSS_RSP0 + 8 * new_cpl
        rsp = int.from_bytes(_supervisor_read(vcpu, tss + slot, 8), "little")
    rsp &= ~0xF & _U64
    rip = vcpu.rip
    rflags = vcpu.reg("rflags")
    pushed_rflags = rflags | RFLAGS_RF if not software and is_fault_exception(vector) else rflags
    old_cs, old_ss = vcpu.segment("cs"), vcpu.segment("ss")
    frame = [old_ss.selector, vcpu.reg("rsp"), pushed_rflags, old_cs.selector, rip]
    if error_code is not None and vector in VECTORS_WITH_ERROR_CODE and not software:
        frame.append(error_code)
    new_rsp = (rsp - 8 * len(frame)) & _U64
    data = b"".join((v & _U64).to_bytes(8, "little") for v in reversed(frame))
    access = Access.WRITE | (Access.USER if new_cpl == 3 else Access.READ)
    vcpu.write_virt(new_rsp, data, access)
    new_cs = Segment(gate.selector & ~3 | new_cpl, code.base, code.limit, code.attributes)
    if new_cpl != old_cpl:
        vcpu.load_segments(cs=new_cs, ss=Segment(new_cpl, 0, 0, new_cpl << 13))
    else:
        vcpu.load_segments(cs=new_cs)
    try:
        ssp_on_event(vcpu.cet_machine, old_cpl, new_cpl, gate.ist, True, old_cs.selector, (old_cs.base + rip) & _U64)
    except GuestFault:
        vcpu.load_segments(cs=old_cs, ss=old_ss)
        raise
    if vector == Vector.PF and cr2 is not None:
        vcpu.write_cr(2, cr2)
    vcpu.set_reg("rsp", new_rsp)
    clear = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM | (RFLAGS_IF if gate.gate_type == GATE_INTERRUPT else 0)
    vcpu.set_reg("rflags", rflags & ~clear)
    vcpu.rip = gate.offset
    vcpu.reset_old_exception()
