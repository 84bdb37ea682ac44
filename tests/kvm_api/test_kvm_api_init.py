"""RESET and INIT through the API (kvm_vcpu_reset, kvm_xstate_reset from seeds/004,
vmx_vcpu_reset) [KVM vmx.c/x86.c; SDM Vol. 3 Table 10-1]."""

from __future__ import annotations

import struct

from conftest import make_guest

from cetvm.arch import Msr, VmcsField
from cetvm.arch.vmx import KVM_REG_GUEST_SSP_ID
from cetvm.kvm.api import KvmExitReason, MpState

CET_VALUES = {Msr.IA32_U_CET: 0x1, Msr.IA32_S_CET: 0x5, Msr.IA32_PL0_SSP: 0x7F00_0000_0000,
              Msr.IA32_PL1_SSP: 0x7F00_0000_1000, Msr.IA32_PL2_SSP: 0x7F00_0000_2000,
              Msr.IA32_PL3_SSP: 0x7F00_0000_3000, Msr.IA32_INT_SSP_TAB: 0x7F00_0000_4000}
AVX_OFFSET = 0x240  # SDM Vol. 1 ch. 13: AVX (YMM_Hi128) at 0x240 in the standard format
MPX_OFFSET = 0x3C0  # SDM Vol. 1 ch. 13: BNDREGS at 0x3C0 on Skylake-SP


def _with_component(image: bytes, bit: int, offset: int, payload: bytes) -> bytes:
    buf = bytearray(image)
    buf[offset:offset + len(payload)] = payload
    bv = struct.unpack_from("<Q", buf, 512)[0] | 1 << bit | 0x3
    struct.pack_into("<Q", buf, 512, bv)
    return bytes(buf)


def _init(vcpu) -> None:
    vcpu.set_mp_state(MpState.INIT_RECEIVED)
    assert vcpu.get_mp_state() is MpState.INIT_RECEIVED
    assert vcpu.run(immediate_exit=True).exit_reason is KvmExitReason.INTR
    assert vcpu.get_mp_state() is MpState.RUNNABLE


def test_init_clears_exactly_the_cet_state():
    g = make_guest("cet_msrs")
    vcpu = g.vcpu
    assert vcpu.set_msrs([(0xDA0, 0x1800), (Msr.IA32_LSTAR, 0xFFFF_8000_0000_1000)]) == 2
    assert vcpu.set_msrs(list(CET_VALUES.items())) == len(CET_VALUES)
    vcpu.set_one_reg(KVM_REG_GUEST_SSP_ID, 0x7F00_0000_5000)
    vcpu.set_xcrs([(0, 0x7)])
    vcpu.set_xsave(_with_component(vcpu.get_xsave(), 2, AVX_OFFSET, b"\xA5" * 256))
    touches = vcpu.state.fpu.touches
    _init(vcpu)
    assert vcpu.state.fpu.touches > touches
    assert dict(vcpu.get_msrs(list(CET_VALUES))) == {m: 0 for m in CET_VALUES}
    assert vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID) == 0
    vmcs = vcpu.state.vmcs
    assert (vmcs.read(VmcsField.GUEST_S_CET), vmcs.read(VmcsField.GUEST_SSP),
            vmcs.read(VmcsField.GUEST_INTR_SSP_TABLE)) == (0, 0, 0)
    assert not vcpu.state.fpu.xstate_bv & 0x1800
    # preserved by INIT: AVX state, XCR0, XSS, other MSRs
    assert vcpu.get_xsave()[AVX_OFFSET:AVX_OFFSET + 256] == b"\xA5" * 256
    assert vcpu.get_xcrs() == [(0, 0x7)]
    assert dict(vcpu.get_msrs([0xDA0, Msr.IA32_LSTAR])) == {0xDA0: 0x1800, Msr.IA32_LSTAR: 0xFFFF_8000_0000_1000}


def test_init_register_state():
    g = make_guest("cet_msrs")
    g.vcpu.run(budget=10_000)
    _init(g.vcpu)
    regs, sregs = g.vcpu.get_regs(), g.vcpu.get_sregs()
    assert regs.rip == 0xFFF0 and regs.rflags == 0x2 and regs.rsp == 0
    assert regs.rdx == g.vcpu.get_cpuid2().get(1)[0]
    assert (sregs.cs.selector, sregs.cs.base) == (0xF000, 0xFFFF_0000)
    assert sregs.cr0 == 0x10  # ET; CD/NW kept from the old CR0 (clear here)
    assert sregs.cr3 == 0 and sregs.cr4 == 0


def test_reset_state_at_creation():
    g = make_guest("cet_msrs")
    fresh = g.kvm.create_vm().create_vcpu()
    sregs = fresh.get_sregs()
    assert sregs.cr0 == 0x6000_0010 and fresh.get_regs().rip == 0xFFF0
    assert fresh.get_xcrs() == [(0, 1)]
    assert fresh.state.fpu.touches == 0  # RESET relies on the zero-allocated fpstate


def test_init_clears_mpx_when_supported():
    g = make_guest("cet_msrs", host="skylake-sp", shstk=False, ibt=False)
    vcpu = g.vcpu
    vcpu.set_xcrs([(0, 0x1F)])
    vcpu.set_xsave(_with_component(vcpu.get_xsave(), 3, MPX_OFFSET, b"\x11" * 64))
    assert vcpu.get_xsave()[MPX_OFFSET:MPX_OFFSET + 64] == b"\x11" * 64
    _init(vcpu)
    assert vcpu.get_xsave()[MPX_OFFSET:MPX_OFFSET + 64] == bytes(64)
    assert not struct.unpack_from("<Q", vcpu.get_xsave(), 512)[0] & 0x8


def test_init_does_not_touch_the_fpu_without_mpx_or_cet():
    g = make_guest("cet_msrs", host="ice-lake", shstk=False, ibt=False)
    before = g.vcpu.state.fpu.touches
    _init(g.vcpu)
    assert g.vcpu.state.fpu.touches == before
