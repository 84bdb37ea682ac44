"""Architectural register access of a vCPU through Unicorn and its saved-context blob.

Owns (split out of :class:`cetvm.cpu.vcpu.Vcpu`, no behaviour change): general-purpose
registers, RIP/RFLAGS, segment registers with their descriptor caches, control registers,
EFER.LMA, XCR0, the x87/SSE/AVX state (KVM_GET/SET_FPU), the engine's ``old_exception`` and the
CET MSR values kept in :class:`cetvm.cpu.state.CetState`. Nothing here re-reads the vCPU's
cached mode: the vCPU calls ``refresh_mode`` after the writes that change it.
"""

from __future__ import annotations

import ctypes
from dataclasses import fields

from unicorn import Uc
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from cetvm import CetvmError, InputError
from cetvm.arch import Cr0, Cr4, Msr
from cetvm.arch.msr import Efer
from cetvm.cpu.state import CetState, DescriptorTable, FpuState, GPR_NAMES, Regs, Segment, Sregs
from cetvm.cpu.uc_context import OLD_EXCEPTION_OFFSET, ContextBlob, HFlags, HFlags2, live_env, segment_hflags
from cetvm.arch.regs import CR8_TPR, U64_MASK

_U128 = (1 << 128) - 1
_GPR_IDS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in GPR_NAMES}
REG_IDS = {**_GPR_IDS, "rip": X.UC_X86_REG_RIP, "rflags": X.UC_X86_REG_RFLAGS, "dr6": X.UC_X86_REG_DR6,
           "dr7": X.UC_X86_REG_DR7}
#: Blob offset of env->xcr0 in Unicorn 2.1.4 (measured; XCR0 has no reg id in the binding).
XCR0_OFFSET = 4904
#: Blob offset of env->efer in Unicorn 2.1.4 (measured: the bytes a WRMSR to EFER changes).
EFER_OFFSET = 592
_CR_IDS = {0: X.UC_X86_REG_CR0, 2: X.UC_X86_REG_CR2, 3: X.UC_X86_REG_CR3, 4: X.UC_X86_REG_CR4}
_FP_IDS = tuple(getattr(X, f"UC_X86_REG_FP{i}") for i in range(8))
_YMM_IDS = tuple(getattr(X, f"UC_X86_REG_YMM{i}") for i in range(16))
_XMM_IDS = tuple(getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16))
#: MXCSR and XMM0-15: one batched read or write (uc_reg_read_batch) for the guest FPU swap.
_SSE_COUNT = 17


class _SseBatch:
    """The argument arrays of a batched MXCSR + XMM0-15 access: register ids and 16-byte slots."""

    def __init__(self) -> None:
        self.ids = (ctypes.c_int * _SSE_COUNT)(X.UC_X86_REG_MXCSR, *_XMM_IDS)
        self.buffer = ctypes.create_string_buffer(16 * _SSE_COUNT)
        base = ctypes.addressof(self.buffer)
        self.pointers = (ctypes.c_void_p * _SSE_COUNT)(*(base + 16 * i for i in range(_SSE_COUNT)))
#: FpuState field → (bits per value, number of values or None for a scalar).
_FPU_FIELD_WIDTHS = {"fcw": (16, None), "fsw": (16, None), "ftw": (8, None), "fop": (11, None), "fip": (64, None),
                     "fdp": (64, None), "mxcsr": (32, None), "st": (80, 8), "xmm": (128, 16), "ymm_hi": (128, 16)}


def check_fpu_widths(fpu: FpuState) -> None:
    """InputError naming the first FpuState field whose value (or list length) does not fit."""
    for name, (bits, count) in _FPU_FIELD_WIDTHS.items():
        value = getattr(fpu, name)
        values = [value] if count is None else list(value)
        if count is not None and len(values) != count:
            raise InputError(f"FPU state: {name} must have {count} entries, got {len(values)}")
        for i, v in enumerate(values):
            if not isinstance(v, int) or not 0 <= v < 1 << bits:
                where = name if count is None else f"{name}[{i}]"
                raise InputError(f"FPU state: {where} must be an unsigned {bits}-bit integer, got {v!r}")


def cet_msr_value(cet: CetState, index: int) -> int:
    """The value of CET MSR ``index`` held in ``cet`` [SDM Vol. 3 §18.3.1]."""
    if index == Msr.IA32_U_CET:
        return cet.u_cet
    if index == Msr.IA32_S_CET:
        return cet.s_cet
    if Msr.IA32_PL0_SSP <= index <= Msr.IA32_PL3_SSP:
        return cet.pl_ssp[index - Msr.IA32_PL0_SSP]
    if index == Msr.IA32_INT_SSP_TAB:
        return cet.int_ssp_tab
    raise CetvmError(f"internal error: MSR {index:#x} is not a CET MSR")


def store_cet_msr_value(cet: CetState, index: int, value: int) -> None:
    """Store CET MSR ``index`` in ``cet`` (no checks: callers validate first)."""
    value &= U64_MASK
    if index == Msr.IA32_U_CET:
        cet.u_cet = value
    elif index == Msr.IA32_S_CET:
        cet.s_cet = value
    elif Msr.IA32_PL0_SSP <= index <= Msr.IA32_PL3_SSP:
        cet.pl_ssp[index - Msr.IA32_PL0_SSP] = value
    elif index == Msr.IA32_INT_SSP_TAB:
        cet.int_ssp_tab = value
    else:
        raise CetvmError(f"internal error: MSR {index:#x} is not a CET MSR")


#: CR4 bits the engine always runs with, whatever the guest loads (an engine quirk, measured):
#: QEMU 5.0's TCG decodes VEX-encoded instructions — BMI1/BMI2's ANDN, BEXTR, SHLX, SHRX, SARX,
#: RORX, BZHI, PDEP, PEXT, MULX, which use no SSE state — only with CR4.OSFXSR set, and raises
#: #UD otherwise; hardware executes them whatever CR4.OSFXSR is [SDM Vol. 2 §2.3.5 VEX: only
#: VEX instructions operating on XMM/YMM state require CR4.OSXSAVE]. Linux's decompressor runs
#: zstd's BMI2 code with CR4 = PAE alone. So the engine's CR4.OSFXSR stays set and the guest's
#: own value of the bit is kept beside it (the way VMX keeps a CR4 read shadow for host-owned
#: bits): MOV from CR4, KVM_GET_SREGS and every CR4 check see the guest's value. Deviation
#: (documented in the README): SSE instructions do not #UD while the guest's CR4.OSFXSR is 0.
ENGINE_FORCED_CR4 = int(Cr4.OSFXSR)


class Registers:
    """Register access to one Unicorn engine (no caching: every read asks the engine, except the
    guest's value of the :data:`ENGINE_FORCED_CR4` bits)."""

    def __init__(self, uc: Uc) -> None:
        self._uc = uc
        self._guest_forced_cr4 = 0
        self._sse_batch = _SseBatch()
        #: the engine's CPUX86State in place (exit-path reads and writes without a context copy)
        self.env = live_env(uc)
        self._u64 = ctypes.c_uint64()
        self._u64_ref = ctypes.byref(self._u64)
        self.write_cr(4, uc.reg_read(X.UC_X86_REG_CR4))
        self.write_cr(8, 0)  # the engine's MOV from CR8 reads cetvm's CR8 from now on

    @property
    def cr4(self) -> int:
        """The guest's CR4 (the engine's, with the guest's own :data:`ENGINE_FORCED_CR4` bits)."""
        return (self._read_u64(X.UC_X86_REG_CR4) & ~ENGINE_FORCED_CR4) | self._guest_forced_cr4

    # ------------------------------------------------------------------ GPRs
    def read(self, name: str) -> int:
        """A general-purpose register, ``rip`` or ``rflags`` by name (through Unicorn's C API
        into a reused buffer: the binding's reg_read is several times slower, and every exit
        reads a few of these)."""
        return self._read_u64(REG_IDS[name])

    def _read_u64(self, reg_id: int) -> int:
        """A 64-bit engine register through Unicorn's C API into the reused buffer."""
        status = uclib.uc_reg_read(self._uc._uch, reg_id, self._u64_ref)
        if status != 0:
            raise CetvmError(f"cannot read register {reg_id} (unicorn error {status})")
        return self._u64.value

    def write(self, name: str, value: int) -> None:
        self._u64.value = value & U64_MASK
        status = uclib.uc_reg_write(self._uc._uch, REG_IDS[name], self._u64_ref)
        if status != 0:
            raise CetvmError(f"cannot write register {name} (unicorn error {status})")

    def get_regs(self) -> Regs:
        return Regs(**{f.name: self._uc.reg_read(REG_IDS[f.name]) for f in fields(Regs)})

    def set_regs(self, regs: Regs) -> None:
        for f in fields(Regs):
            self._uc.reg_write(REG_IDS[f.name], getattr(regs, f.name) & U64_MASK)

    # ------------------------------------------------------------------ system registers
    def get_sregs(self) -> Sregs:
        blob = ContextBlob.save(self._uc)
        uc = self._uc
        tr = uc.reg_read(X.UC_X86_REG_TR)
        ldt = uc.reg_read(X.UC_X86_REG_LDTR)
        gdt = uc.reg_read(X.UC_X86_REG_GDTR)
        idt = uc.reg_read(X.UC_X86_REG_IDTR)
        return Sregs(
            cs=blob.segment("cs"), ds=blob.segment("ds"), es=blob.segment("es"),
            fs=blob.segment("fs"), gs=blob.segment("gs"), ss=blob.segment("ss"),
            tr=Segment(tr[0], tr[1], tr[2], tr[3]), ldt=Segment(ldt[0], ldt[1], ldt[2], ldt[3]),
            gdt=DescriptorTable(gdt[1], gdt[2]), idt=DescriptorTable(idt[1], idt[2]),
            cr0=uc.reg_read(X.UC_X86_REG_CR0), cr2=uc.reg_read(X.UC_X86_REG_CR2),
            cr3=uc.reg_read(X.UC_X86_REG_CR3), cr4=self.cr4,
            efer=uc.msr_read(Msr.IA32_EFER))

    def descriptor_table(self, name: str) -> DescriptorTable:
        """GDTR (``"gdt"``) or IDTR (``"idt"``) alone: event delivery and IRET read them per event,
        where :meth:`get_sregs` (every segment, CR and EFER) cost most of a delivery."""
        _selector, base, limit, _flags = self._uc.reg_read(X.UC_X86_REG_GDTR if name == "gdt" else X.UC_X86_REG_IDTR)
        return DescriptorTable(base, limit)

    def task_register(self) -> Segment:
        """TR with its descriptor cache (the TSS of event delivery's stack switch)."""
        tr = self._uc.reg_read(X.UC_X86_REG_TR)
        return Segment(tr[0], tr[1], tr[2], tr[3])

    def load_sregs(self, sregs: Sregs) -> None:
        """Load control registers, EFER, descriptor tables and TR/LDTR (the segment registers
        are the caller's: ``load_segments``). EFER.LMA is derived as hardware does: LME and
        CR0.PG [SDM Vol. 3 §10.8.5] (also in the engine, see :meth:`force_efer_lma`)."""
        uc = self._uc
        efer = sregs.efer & ~Efer.LMA
        if efer & Efer.LME and sregs.cr0 & Cr0.PG:
            efer |= Efer.LMA
        self.write_cr(4, sregs.cr4)
        uc.reg_write(X.UC_X86_REG_CR3, sregs.cr3)
        uc.msr_write(Msr.IA32_EFER, efer)
        uc.reg_write(X.UC_X86_REG_CR0, sregs.cr0)
        self.force_efer_lma(bool(efer & Efer.LMA))
        uc.reg_write(X.UC_X86_REG_CR2, sregs.cr2)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
        uc.reg_write(X.UC_X86_REG_TR, (sregs.tr.selector, sregs.tr.base, sregs.tr.limit, sregs.tr.attributes))
        uc.reg_write(X.UC_X86_REG_LDTR, (sregs.ldt.selector, sregs.ldt.base, sregs.ldt.limit, sregs.ldt.attributes))

    def force_efer_lma(self, lma: bool) -> None:
        """Make the engine's EFER.LMA (and QEMU's HF_LMA, with HF_CS64 cleared when leaving) ``lma``.

        Why: QEMU changes LMA only when a CR0 write toggles PG with LME set, and Unicorn's
        UC_MODE_64 starts with EFER = LME|LMA but CR0.PG = 0 — so a RESET to real mode
        (CR0 = 0x60000010, EFER = 0) kept LMA and EFER read back 0x400; a 64-bit load over a
        state that already had CR0.PG = 1 never set it. Hardware: LMA = LME AND CR0.PG
        [SDM Vol. 3 §10.8.5]. Patched in the saved context (env->efer at :data:`EFER_OFFSET`,
        checked against RDMSR first).
        """
        blob = ContextBlob.save(self._uc)
        efer = blob.u64(EFER_OFFSET)
        if efer != self._uc.msr_read(Msr.IA32_EFER):
            raise CetvmError("internal error: Unicorn's context does not hold EFER at the measured offset (not 2.1.4?)")
        if bool(efer & Efer.LMA) == lma:
            return
        lma_bit = int(Efer.LMA)
        ctypes.c_uint64.from_address(blob.address + EFER_OFFSET).value = efer | lma_bit if lma else efer & ~lma_bit
        blob.hflags = blob.hflags | HFlags.LMA if lma else blob.hflags & ~(HFlags.LMA | HFlags.CS64)
        blob.restore(self._uc)

    def load_segment_caches(self, segments: dict[str, Segment]) -> None:
        """Load segment registers with their descriptor caches and recompute QEMU's hflags
        (CPL, CS64, ...) from them (blob patch); FS/GS bases also through their registers."""
        blob = ContextBlob.save(self._uc)
        for name, seg in segments.items():
            blob.set_segment(name, seg)
        cr0_pe = bool(self._uc.reg_read(X.UC_X86_REG_CR0) & Cr0.PE)
        blob.hflags = segment_hflags(blob.hflags, blob.segment("cs"), blob.segment("ss"),
                                     blob.segment("ds"), blob.segment("es"), cr0_pe)
        blob.restore(self._uc)
        for name in ("fs", "gs"):
            if name in segments and segments[name].base:
                self._uc.reg_write(X.UC_X86_REG_FS_BASE if name == "fs" else X.UC_X86_REG_GS_BASE, segments[name].base)

    def segment(self, name: str) -> Segment:
        return self.env.segment(name)

    @property
    def cr0(self) -> int:
        return self._read_u64(X.UC_X86_REG_CR0)

    @property
    def cr8(self) -> int:
        """CR8 (the task-priority class, bits 3:0). It lives in the engine's env->v_tpr, which its
        own MOV from CR8 reads while hflags2 has HF2_VINTR (:meth:`write_cr` keeps it set; Unicorn
        2.1.4 otherwise reads its absent APIC as 0), so MOV from CR8 needs no exit."""
        return self.env.v_tpr

    def write_cr(self, n: int, value: int) -> None:
        """Write CR0/CR2/CR3/CR4/CR8 without checks (CR4: see :data:`ENGINE_FORCED_CR4`; CR8:
        :attr:`cr8`)."""
        if n == 8:
            self.env.v_tpr = value & CR8_TPR
            self.env.hflags2 = self.env.hflags2 | HFlags2.VINTR
            return
        if n == 4:
            self._guest_forced_cr4 = value & ENGINE_FORCED_CR4
            value |= ENGINE_FORCED_CR4
        self._uc.reg_write(_CR_IDS[n], value & U64_MASK)

    @property
    def xcr0(self) -> int:
        return self.env.u64(XCR0_OFFSET)

    @xcr0.setter
    def xcr0(self, value: int) -> None:
        ctypes.c_uint64.from_address(self.env.address + XCR0_OFFSET).value = value & U64_MASK

    # ------------------------------------------------------------------ engine exception state
    def clear_stale_old_exception(self) -> None:
        """After an engine stop with no exception: QEMU's old_exception must be -1.

        Measured on 2.1.4: a stop requested from a hook (RIP write + emu_stop, e.g. the block
        classification restart) and a single-stepped IRETQ can leave old_exception at 8 (#DF);
        the guest's next fault then becomes a #DF or a silent triple fault (EXCP_HLT).
        """
        if self.env.u32(OLD_EXCEPTION_OFFSET) != 0xFFFF_FFFF:
            self.env.reset_old_exception()

    def reset_old_exception(self) -> None:
        """Forget the last exception so the next fault is not promoted to #DF."""
        self.env.reset_old_exception()

    # ------------------------------------------------------------------ x87 / SSE / AVX
    def get_fpu(self) -> FpuState:
        """x87, SSE and AVX registers (KVM_GET_FPU plus the YMM upper halves).

        Unicorn keeps the x87 registers by physical number (FP0-7) with TOP in FSW[13:11] and a
        full 2-bit tag word; ST(i) is FP((TOP + i) mod 8), and bit i of the abridged tag word is
        set unless physical register i is tagged empty (11b) [SDM Vol. 1 §8.1.7; FXSAVE].
        """
        read = self.raw_read
        fsw = read(X.UC_X86_REG_FPSW, 2)
        top = (fsw >> 11) & 7
        tags = read(X.UC_X86_REG_FPTAG, 2)
        physical = [read(reg, 10) for reg in _FP_IDS]
        ymm = [read(reg, 32) for reg in _YMM_IDS]
        return FpuState(
            fcw=read(X.UC_X86_REG_FPCW, 2), fsw=fsw,
            ftw=sum(1 << i for i in range(8) if (tags >> 2 * i) & 3 != 3),
            fop=read(X.UC_X86_REG_FOP, 2), fip=read(X.UC_X86_REG_FIP, 8), fdp=read(X.UC_X86_REG_FDP, 8),
            mxcsr=read(X.UC_X86_REG_MXCSR, 4), st=[physical[(top + i) % 8] for i in range(8)],
            xmm=[y & _U128 for y in ymm], ymm_hi=[y >> 128 for y in ymm])

    def set_fpu(self, fpu: FpuState) -> None:
        """Load x87, SSE and AVX registers (KVM_SET_FPU plus the YMM upper halves; no
        architectural checks beyond field widths: InputError if a value does not fit).

        The abridged tag word is expanded as FXRSTOR does: a clear bit → empty (11b), a set bit
        → valid (the engine derives zero/special from the value itself).
        """
        check_fpu_widths(fpu)
        write = self.raw_write
        write(X.UC_X86_REG_FPCW, fpu.fcw, 2)
        write(X.UC_X86_REG_FPSW, fpu.fsw, 2)  # also sets TOP
        write(X.UC_X86_REG_FPTAG, sum(0 if fpu.ftw >> i & 1 else 3 << 2 * i for i in range(8)), 2)
        top = (fpu.fsw >> 11) & 7
        for i, value in enumerate(fpu.st):
            write(_FP_IDS[(top + i) % 8], value, 10)
        write(X.UC_X86_REG_FOP, fpu.fop, 2)
        write(X.UC_X86_REG_FIP, fpu.fip, 8)
        write(X.UC_X86_REG_FDP, fpu.fdp, 8)
        write(X.UC_X86_REG_MXCSR, fpu.mxcsr, 4)
        for reg, low, high in zip(_YMM_IDS, fpu.xmm, fpu.ymm_hi):
            write(reg, low | high << 128, 32)

    def get_sse(self) -> tuple[int, list[int]]:
        """(MXCSR, [XMM0..15]): the SSE part of :meth:`get_fpu`, without the x87 and YMM reads
        (the guest FPU load/put of every KVM_RUN needs only these), in one batched engine call."""
        sse = self._sse_batch
        status = uclib.uc_reg_read_batch(self._uc._uch, sse.ids, sse.pointers, _SSE_COUNT)
        if status != 0:
            raise CetvmError(f"cannot read the SSE registers (unicorn error {status})")
        raw = sse.buffer.raw
        return (int.from_bytes(raw[:4], "little"),
                [int.from_bytes(raw[off:off + 16], "little") for off in range(16, 16 * _SSE_COUNT, 16)])

    def set_sse(self, mxcsr: int, xmm: list[int]) -> None:
        """Load MXCSR and XMM0-15 (the YMM upper halves are kept), in one batched engine call."""
        sse = self._sse_batch
        ctypes.memmove(sse.buffer, mxcsr.to_bytes(16, "little") + b"".join(v.to_bytes(16, "little") for v in xmm),
                       16 * _SSE_COUNT)
        status = uclib.uc_reg_write_batch(self._uc._uch, sse.ids, sse.pointers, _SSE_COUNT)
        if status != 0:
            raise CetvmError(f"cannot write the SSE registers (unicorn error {status})")

    def raw_read(self, reg_id: int, size: int) -> int:
        """A register as a little-endian integer of ``size`` bytes, through Unicorn's C API (the
        binding's reg_read costs ~3 µs per register; this ~10x less)."""
        buf = ctypes.create_string_buffer(size)
        status = uclib.uc_reg_read(self._uc._uch, reg_id, buf)
        if status != 0:
            raise CetvmError(f"cannot read register {reg_id} (unicorn error {status})")
        return int.from_bytes(buf.raw, "little")

    def raw_write(self, reg_id: int, value: int, size: int) -> None:
        buf = ctypes.create_string_buffer(value.to_bytes(size, "little"), size)
        status = uclib.uc_reg_write(self._uc._uch, reg_id, buf)
        if status != 0:
            raise CetvmError(f"cannot write register {reg_id} (unicorn error {status})")
