"""XSAVES / XRSTORS / XSAVEC emulation (Unicorn raises #UD for all three) [SDM Vol. 1 ch. 13,
Vol. 2 XSAVES/XRSTORS/XSAVEC].

Layout, header checks and CET value checks come from :mod:`cetvm.xstate`. Components handled:
x87 (0) and SSE (1) through Unicorn's registers, AVX (2: the upper YMM halves), CET_U (11) and
CET_S (12) from/to the vCPU's CET MSRs. Any other component requested by RFBM raises
NotSupportedError naming it (decision: better than silently saving it as init state).

Decisions: XSTATE_BV reports x87/SSE/AVX as in use whenever requested (XINUSE = 1 is always
allowed); CET components are in use when non-zero. The x87 tag word is saved in abridged
form (1 = valid) and restored as valid/empty only.
"""

from __future__ import annotations

import struct

from iced_x86 import Instruction, Mnemonic as M
from unicorn import x86_const as X

from cetvm import NotSupportedError
from cetvm.arch import Cr4
from cetvm.arch.vmx import SecondaryControls
from cetvm.arch.xfeatures import XFeature, xfeature_name
from cetvm.cpu.faults import gp, ud
from cetvm.xstate import CetKernelState, CetUserState, XsaveArea, XsaveFormat, XsaveLayout
from cetvm.xstate.restore import xrstor_fault, xrstors_value_fault

XCOMP_BV_COMPACTED = 1 << 63
SUPPORTED = 0b111 | XFeature.CET_USER.mask | XFeature.CET_KERNEL.mask
CPUID_XSAVEC = 1 << 1
CPUID_XSAVES = 1 << 3


def _is_supervisor(instr: Instruction) -> bool:
    return instr.mnemonic in (M.XSAVES, M.XSAVES64, M.XRSTORS, M.XRSTORS64)


def check_usable(vcpu, instr: Instruction) -> None:
    """The faults before the memory operand is formed: #UD without CPUID XSAVES/XSAVEC or
    CR4.OSXSAVE or with LOCK, #GP(0) for XSAVES/XRSTORS at CPL > 0 [SDM Vol. 2 XSAVES]; in VMX
    non-root operation XSAVES/XRSTORS are #UD unless the VMCS enables them [SDM Vol. 3 §26.3]."""
    supervisor = _is_supervisor(instr)
    leaf_d1 = vcpu.model.get(0xD, 1)[0]
    if not leaf_d1 & (CPUID_XSAVES if supervisor else CPUID_XSAVEC) or not vcpu.cr4 & Cr4.OSXSAVE:
        raise ud()
    if supervisor and not vcpu.vmcs.secondary(SecondaryControls.ENABLE_XSAVES):
        raise ud()
    if instr.has_lock_prefix:
        raise ud()
    if supervisor and vcpu.cpl != 0:
        raise gp(0)


def execute(vcpu, instr: Instruction, address: int) -> None:
    """The instruction on the area at linear ``address`` (after :func:`check_usable`): #GP(0)
    unless 64-byte aligned, then save or restore the requested-feature bitmap's components."""
    mn = instr.mnemonic
    supervisor = _is_supervisor(instr)
    if address & 63:
        raise gp(0)
    edx_eax = (vcpu.reg("rdx") & 0xFFFF_FFFF) << 32 | (vcpu.reg("rax") & 0xFFFF_FFFF)
    xcr0 = vcpu.xcr0
    allowed = xcr0 | vcpu.xss if supervisor else xcr0
    rfbm = edx_eax & allowed
    layout = XsaveLayout.from_cpuid(vcpu.model)
    if mn in (M.XRSTORS, M.XRSTORS64):
        xrstors(vcpu, layout, address, rfbm, xcr0)
    else:
        xsave_compacted(vcpu, layout, address, rfbm)


def _check_supported(rfbm: int) -> None:
    extra = rfbm & ~SUPPORTED
    if extra:
        names = ", ".join(xfeature_name(n) for n in range(64) if extra >> n & 1)
        raise NotSupportedError(f"XSAVES/XRSTORS/XSAVEC of component(s) {names} is not implemented")


def xsave_compacted(vcpu, layout: XsaveLayout, address: int, rfbm: int) -> None:
    """XSAVES / XSAVEC: write the compacted image with XCOMP_BV = RFBM | bit 63.

    Only the components in RFBM (and the header) are written; bytes of the legacy region that
    belong to components not in RFBM are left untouched, as the SDM specifies.
    """
    _check_supported(rfbm)
    area = XsaveArea.new(layout, rfbm, XsaveFormat.COMPACTED)
    # the legacy region is read-modify-write: start from what is in memory
    area.data[:512] = vcpu.read_virt(address, 512)
    in_use = 0
    if rfbm & 1:
        _save_x87(vcpu, area.data)
        in_use |= 1
    if rfbm & 2:
        _save_sse(vcpu, area.data)
        in_use |= 2
    if rfbm & 4:
        area.set_component_bytes(2, _save_avx(vcpu))
        in_use |= 4
    cet = vcpu.cet
    if rfbm & XFeature.CET_USER.mask and (cet.u_cet or cet.pl_ssp[3]):
        area.cet_user = CetUserState(cet.u_cet, cet.pl_ssp[3])
        in_use |= XFeature.CET_USER.mask
    if rfbm & XFeature.CET_KERNEL.mask and any(cet.pl_ssp[:3]):
        area.cet_kernel = CetKernelState(*cet.pl_ssp[:3])
        in_use |= XFeature.CET_KERNEL.mask
    area.xstate_bv = in_use
    vcpu.write_virt(address, bytes(area.data))


def xrstors(vcpu, layout: XsaveLayout, address: int, rfbm: int, xcr0: int) -> None:
    """XRSTORS: header checks (:func:`xrstor_fault`), CET value checks (:func:`xrstors_value_fault`),
    then for each RFBM component load it (XSTATE_BV set) or put it in its init state."""
    header = vcpu.read_virt(address, 576)
    if xrstor_fault(header, address, xcr0, vcpu.xss, compacted_insn=True):
        raise gp(0)
    xcomp_bv = struct.unpack_from("<Q", header, 520)[0] & ~XCOMP_BV_COMPACTED
    size = layout.compacted_size(xcomp_bv)
    area = XsaveArea.from_bytes(layout, vcpu.read_virt(address, size), XsaveFormat.COMPACTED)
    if xrstors_value_fault(area, rfbm):
        raise gp(0)
    _check_supported(rfbm & area.xstate_bv)
    loaded = rfbm & area.xstate_bv
    if rfbm & 1:
        _restore_x87(vcpu, area.data if loaded & 1 else bytes(512))
    if rfbm & 2:
        _restore_sse(vcpu, area.data if loaded & 2 else bytes(512), init=not loaded & 2)
    if rfbm & 4:
        _restore_avx(vcpu, area.component_bytes(2) if loaded & 4 else bytes(256))
    if rfbm & XFeature.CET_USER.mask:
        state = area.cet_user if loaded & XFeature.CET_USER.mask else CetUserState()
        vcpu.set_cet_msr(0x6A0, state.u_cet)
        vcpu.set_cet_msr(0x6A7, state.pl3_ssp)
    if rfbm & XFeature.CET_KERNEL.mask:
        state = area.cet_kernel if loaded & XFeature.CET_KERNEL.mask else CetKernelState()
        for i, value in enumerate((state.pl0_ssp, state.pl1_ssp, state.pl2_ssp)):
            vcpu.set_cet_msr(0x6A4 + i, value)


# ----------------------------------------------------------------------------- x87 / SSE / AVX
def _save_x87(vcpu, data: bytearray) -> None:
    uc = vcpu.unicorn
    struct.pack_into("<HH", data, 0, uc.reg_read(X.UC_X86_REG_FPCW), uc.reg_read(X.UC_X86_REG_FPSW))
    tag = uc.reg_read(X.UC_X86_REG_FPTAG)
    abridged = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)
    data[4] = abridged
    for i in range(8):
        mantissa, exponent = uc.reg_read(X.UC_X86_REG_FP0 + i)
        struct.pack_into("<QH", data, 32 + 16 * i, mantissa, exponent)


def _restore_x87(vcpu, data: bytes) -> None:
    uc = vcpu.unicorn
    fcw, fsw = struct.unpack_from("<HH", data, 0)
    uc.reg_write(X.UC_X86_REG_FPCW, fcw if any(data[:32]) else 0x37F)
    uc.reg_write(X.UC_X86_REG_FPSW, fsw)
    uc.reg_write(X.UC_X86_REG_FPTAG, sum((0 if data[4] >> i & 1 else 3) << (2 * i) for i in range(8)))
    for i in range(8):
        mantissa, exponent = struct.unpack_from("<QH", data, 32 + 16 * i)
        uc.reg_write(X.UC_X86_REG_FP0 + i, (mantissa, exponent))


def _save_sse(vcpu, data: bytearray) -> None:
    uc = vcpu.unicorn
    struct.pack_into("<II", data, 24, uc.reg_read(X.UC_X86_REG_MXCSR), 0xFFFF)
    for i in range(16):
        data[160 + 16 * i:176 + 16 * i] = uc.reg_read(X.UC_X86_REG_XMM0 + i).to_bytes(16, "little")


def _restore_sse(vcpu, data: bytes, init: bool) -> None:
    uc = vcpu.unicorn
    uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80 if init else struct.unpack_from("<I", data, 24)[0])
    for i in range(16):
        uc.reg_write(X.UC_X86_REG_XMM0 + i, int.from_bytes(data[160 + 16 * i:176 + 16 * i], "little"))


def _save_avx(vcpu) -> bytes:
    uc = vcpu.unicorn
    return b"".join((uc.reg_read(X.UC_X86_REG_YMM0 + i) >> 128).to_bytes(16, "little") for i in range(16))


def _restore_avx(vcpu, data: bytes) -> None:
    uc = vcpu.unicorn
    for i in range(16):
        low = uc.reg_read(X.UC_X86_REG_XMM0 + i)
        high = int.from_bytes(data[16 * i:16 * i + 16], "little")
        uc.reg_write(X.UC_X86_REG_YMM0 + i, high << 128 | low)
