"""Vcpu.get_fpu / set_fpu: the x87/SSE/AVX register accessor the hypervisor uses for its FPU swap.

Checked against real guest code run by the engine: what the guest computed is what get_fpu
reports, and what set_fpu loads is what the guest computes with.
"""

from __future__ import annotations

import pytest

from cetvm import InputError
from cetvm.cpu.bootstrap import build_identity_map, code_page_flags, data_page_flags, enter_long_mode
from cetvm.cpu.exits import ExitReason
from cetvm.cpu.state import FpuState
from cetvm.cpu.vcpu import Vcpu
from cetvm.cpuid import get_model

RAM = 2 << 20
CODE = 0x20000
#: 80-bit values: sign+exponent << 64 | significand (explicit integer bit 63) [SDM Vol. 1 §4.2.2].
ONE = 0x3FFF << 64 | 1 << 63
TWO = 0x4000 << 64 | 1 << 63
FOUR = 0x4001 << 64 | 1 << 63
PI = 0x4000 << 64 | 0xC90F_DAA2_2168_C235  # FLDPI with round-to-nearest


def vcpu_running(code: bytes) -> Vcpu:
    vcpu = Vcpu(get_model("sapphire-rapids"))
    vcpu.map_ram(0, RAM)
    cr3 = build_identity_map(vcpu, 0x1000, RAM, lambda a: code_page_flags() if a == CODE else data_page_flags())
    enter_long_mode(vcpu, cr3=cr3, gdt=0x10000)
    vcpu.write_phys(CODE, code + b"\xf4")  # ... ; hlt
    vcpu.set_reg("rsp", 0x80000)
    vcpu.rip = CODE
    return vcpu


def run_to_hlt(vcpu: Vcpu) -> None:
    exit_ = vcpu.run(1000)
    assert exit_.reason == ExitReason.HLT, exit_


def test_get_fpu_reports_what_guest_x87_and_sse_code_left():
    vcpu = vcpu_running(bytes.fromhex(
        "dbe3"              # fninit
        "d9e8"              # fld1
        "d9eb"              # fldpi
        "b878563412"        # mov eax, 0x12345678
        "660f6ed8"          # movd xmm3, eax
    ))
    run_to_hlt(vcpu)
    fpu = vcpu.get_fpu()
    assert fpu.fcw == 0x037F                   # FNINIT
    assert (fpu.fsw >> 11) & 7 == 6           # two pushes from TOP = 0
    assert fpu.st[0] == PI and fpu.st[1] == ONE
    assert fpu.ftw == 0b1100_0000              # physical registers 6 and 7 valid, the rest empty
    assert fpu.xmm[3] == 0x12345678 and fpu.xmm[2] == 0


def test_guest_computes_with_the_state_set_fpu_loaded():
    vcpu = vcpu_running(bytes.fromhex(
        "d8c0"              # fadd st0, st0
        "66480f7ee8"        # movq rax, xmm5
    ))
    fpu = FpuState(fsw=7 << 11, ftw=0b1000_0000, st=[TWO] + [0] * 7)
    fpu.xmm[5] = 0xFEED_0000_CAFE_F00D | 0xAB << 64
    vcpu.set_fpu(fpu)
    run_to_hlt(vcpu)
    assert vcpu.reg("rax") == 0xFEED_0000_CAFE_F00D
    after = vcpu.get_fpu()
    assert after.st[0] == FOUR
    assert after.xmm[5] == fpu.xmm[5]


def test_set_fpu_round_trips_every_field_including_ymm_upper_halves():
    vcpu = vcpu_running(b"")
    fpu = FpuState(fcw=0x027F, fsw=3 << 11 | 0x20, ftw=0b0011_1000, fop=0x7FF, fip=0xFFFF_8000_0000_1234,
                   fdp=0x4000_5678, mxcsr=0x9FC0, st=[ONE, TWO, PI, 0, 0, 0, 0, FOUR],
                   xmm=[(i + 1) << 100 | i for i in range(16)], ymm_hi=[(i + 7) << 120 | i for i in range(16)])
    vcpu.set_fpu(fpu)
    assert vcpu.get_fpu() == fpu


@pytest.mark.parametrize("field,value,message", [
    ("fcw", 1 << 16, "fcw must be an unsigned 16-bit integer"),
    ("mxcsr", -1, "mxcsr must be an unsigned 32-bit integer"),
    ("st", [0] * 7, "st must have 8 entries, got 7"),
    ("ymm_hi", [0] * 15 + [1 << 128], "ymm_hi[15] must be an unsigned 128-bit integer"),
])
def test_set_fpu_rejects_values_that_do_not_fit(field, value, message):
    vcpu = vcpu_running(b"")
    before = vcpu.get_fpu()
    fpu = FpuState()
    setattr(fpu, field, value)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        vcpu.set_fpu(fpu)
    assert vcpu.get_fpu() == before  # nothing was loaded
