"""Architectural register sets of the vCPU as plain dataclasses (read/written between runs).

Segment attributes use the layout of a descriptor's high dword with the base bits removed (the
layout QEMU keeps in its segment cache and VMX's access-rights field shifted left by 8):
type 11:8, S 12, DPL 14:13, P 15, AVL 20, L 21, D/B 22, G 23 [SDM Vol. 3 §3.4.5].
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


class SegAttr(enum.IntFlag):
    """Segment-descriptor attribute bits (descriptor high dword positions)."""

    ACCESSED = 1 << 8
    WRITABLE_READABLE = 1 << 9
    CODE = 1 << 11
    S = 1 << 12  # code/data (not system)
    P = 1 << 15
    AVL = 1 << 20
    L = 1 << 21
    DB = 1 << 22
    G = 1 << 23


SEG_ATTR_MASK = 0x00F0FF00
DPL_SHIFT = 13
#: System-segment type of an available / busy 64-bit TSS (descriptor type field).
TSS64_AVAILABLE = 0x9
TSS64_BUSY = 0xB


@dataclass
class Segment:
    """A segment register with its hidden descriptor cache."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF_FFFF
    attributes: int = 0

    @property
    def dpl(self) -> int:
        return (self.attributes >> DPL_SHIFT) & 3

    @property
    def long(self) -> bool:
        return bool(self.attributes & SegAttr.L)

    @property
    def default_big(self) -> bool:
        return bool(self.attributes & SegAttr.DB)

    @property
    def present(self) -> bool:
        return bool(self.attributes & SegAttr.P)

    @classmethod
    def code64(cls, selector: int, dpl: int = 0) -> "Segment":
        """A flat 64-bit code segment (L=1, D=0)."""
        attrs = SegAttr.P | SegAttr.S | SegAttr.CODE | SegAttr.WRITABLE_READABLE | SegAttr.ACCESSED | SegAttr.L | SegAttr.G
        return cls(selector, 0, 0xFFFF_FFFF, int(attrs) | dpl << DPL_SHIFT)

    @classmethod
    def code32(cls, selector: int, dpl: int = 0) -> "Segment":
        """A flat 32-bit code segment (D=1)."""
        attrs = SegAttr.P | SegAttr.S | SegAttr.CODE | SegAttr.WRITABLE_READABLE | SegAttr.ACCESSED | SegAttr.DB | SegAttr.G
        return cls(selector, 0, 0xFFFF_FFFF, int(attrs) | dpl << DPL_SHIFT)

    @classmethod
    def data(cls, selector: int, dpl: int = 0) -> "Segment":
        """A flat writable data segment (D/B=1)."""
        attrs = SegAttr.P | SegAttr.S | SegAttr.WRITABLE_READABLE | SegAttr.ACCESSED | SegAttr.DB | SegAttr.G
        return cls(selector, 0, 0xFFFF_FFFF, int(attrs) | dpl << DPL_SHIFT)

    @classmethod
    def from_descriptor(cls, selector: int, low: int, high: int, upper: int = 0) -> "Segment":
        """Decode an 8-byte GDT/LDT descriptor (``upper`` = bits 95:64 of a 16-byte system one)."""
        base = ((low >> 16) & 0xFFFF) | ((high & 0xFF) << 16) | (high & 0xFF00_0000) | (upper << 32)
        limit = (low & 0xFFFF) | (high & 0x000F_0000)
        attributes = high & SEG_ATTR_MASK
        if attributes & SegAttr.G:
            limit = (limit << 12) | 0xFFF
        return cls(selector, base, limit, attributes)


@dataclass
class DescriptorTable:
    """GDTR / IDTR: base and limit."""

    base: int = 0
    limit: int = 0xFFFF


#: General-purpose register names in encoding order.
GPR_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)


@dataclass
class Regs:
    """General-purpose registers, RIP and RFLAGS (KVM's struct kvm_regs)."""

    rax: int = 0
    rcx: int = 0
    rdx: int = 0
    rbx: int = 0
    rsp: int = 0
    rbp: int = 0
    rsi: int = 0
    rdi: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2


@dataclass
class Sregs:
    """Segment, descriptor-table and control registers (KVM's struct kvm_sregs)."""

    cs: Segment = field(default_factory=Segment)
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=Segment)
    ldt: Segment = field(default_factory=Segment)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    efer: int = 0


class CetRegisters(Protocol):
    """The vCPU's CET registers: :class:`CetState`, or the native hook's stand-in that keeps
    SSP, U_CET and S_CET in its shared state (:class:`cetvm.cpu.native.loader.NativeCetState`)."""

    u_cet: int
    s_cet: int
    pl_ssp: list[int]
    int_ssp_tab: int
    ssp: int


@dataclass
class CetState:
    """The CET MSRs and SSP as the vCPU holds them (Unicorn has no CET state).

    ``pl_ssp[n]`` is IA32_PLn_SSP. ``ssp`` is the current shadow-stack pointer (VMCS GUEST_SSP).
    """

    u_cet: int = 0
    s_cet: int = 0
    pl_ssp: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    int_ssp_tab: int = 0
    ssp: int = 0


#: x87 control word and MXCSR after FNINIT / in the XSAVE init configuration [SDM Vol. 1 §8.1.5, §10.2.3].
FCW_INIT = 0x037F
MXCSR_INIT = 0x1F80


@dataclass
class FpuState:
    """x87, SSE and AVX register state (KVM's struct kvm_fpu plus the YMM upper halves).

    As in the FXSAVE legacy region [SDM Vol. 2 FXSAVE, Table 3-53]: ``st[i]`` is ST(i) in stack
    order (80-bit value: 64-bit significand | 16-bit sign+exponent << 64), ``ftw`` is the
    abridged tag word (bit i set = physical register i is valid, clear = empty), ``fsw`` holds
    TOP in bits 13:11, ``fip``/``fdp`` are the 64-bit last instruction / data pointers, ``fop``
    the last opcode. ``xmm[i]`` is XMM i (128 bits), ``ymm_hi[i]`` bits 255:128 of YMM i (the
    XSAVE AVX component). The defaults are the XSAVE init configuration.
    """

    fcw: int = FCW_INIT
    fsw: int = 0
    ftw: int = 0
    fop: int = 0
    fip: int = 0
    fdp: int = 0
    mxcsr: int = MXCSR_INIT
    st: list[int] = field(default_factory=lambda: [0] * 8)
    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    ymm_hi: list[int] = field(default_factory=lambda: [0] * 16)
