"""Vcpu.complete_pending_exit / cancel_pending_exit with real guest code (an IN exit).

The hypervisor finishes an exiting instruction (KVM's complete_userspace_io) before it changes
anything else, or drops it so the instruction runs again.
"""

from __future__ import annotations

from cetvm.cpu.bootstrap import build_identity_map, code_page_flags, data_page_flags, enter_long_mode
from cetvm.cpu.exits import Direction, ExitReason
from cetvm.cpu.vcpu import Vcpu
from cetvm.cpuid import get_model

RAM = 2 << 20
CODE = 0x20000
GUEST = bytes.fromhex(
    "e460"      # CODE+0: in al, 0x60
    "ffc3"      # CODE+2: inc ebx
    "f4"        # CODE+4: hlt
)


def vcpu_at_in_exit() -> tuple[Vcpu, object]:
    vcpu = Vcpu(get_model("sapphire-rapids"))
    vcpu.map_ram(0, RAM)
    cr3 = build_identity_map(vcpu, 0x1000, RAM, lambda a: code_page_flags() if a == CODE else data_page_flags())
    enter_long_mode(vcpu, cr3=cr3, gdt=0x10000)
    vcpu.write_phys(CODE, GUEST)
    vcpu.set_reg("rsp", 0x80000)
    vcpu.set_reg("rax", 0x1111_1100)
    vcpu.rip = CODE
    exit_ = vcpu.run(100)
    assert exit_.reason == ExitReason.IO and exit_.rip == CODE
    assert exit_.io.port == 0x60 and exit_.io.direction == Direction.IN and exit_.io.size == 1
    return vcpu, exit_


def test_complete_pending_exit_finishes_the_in_without_running_guest_code():
    vcpu, exit_ = vcpu_at_in_exit()
    retired = vcpu.instructions_retired
    assert vcpu.exit_pending_completion
    exit_.io.data = 0x5A
    vcpu.complete_pending_exit()
    assert vcpu.reg("rax") == 0x1111_115A          # AL loaded, the rest of RAX kept
    assert vcpu.rip == CODE + 2                    # past the IN, the INC has not run
    assert vcpu.reg("rbx") == 0
    assert vcpu.instructions_retired == retired + 1
    assert not vcpu.exit_pending_completion


def test_complete_pending_exit_twice_and_then_run_finish_the_in_once():
    vcpu, exit_ = vcpu_at_in_exit()
    exit_.io.data = 0x5A
    vcpu.complete_pending_exit()
    vcpu.set_reg("rax", 0)                         # a second completion would reload AL
    vcpu.complete_pending_exit()
    assert vcpu.reg("rax") == 0 and vcpu.rip == CODE + 2
    exit_ = vcpu.run(100)
    assert exit_.reason == ExitReason.HLT and exit_.rip == CODE + 4
    assert vcpu.reg("rbx") == 1 and vcpu.reg("rax") == 0


def test_cancel_pending_exit_leaves_the_in_to_run_again():
    vcpu, exit_ = vcpu_at_in_exit()
    exit_.io.data = 0x5A
    vcpu.cancel_pending_exit()
    assert not vcpu.exit_pending_completion
    assert vcpu.rip == CODE and vcpu.reg("rax") == 0x1111_1100
    again = vcpu.run(100)
    assert again.reason == ExitReason.IO and again.rip == CODE   # the same IN exits again
    again.io.data = 0x33
    assert vcpu.run(100).reason == ExitReason.HLT
    assert vcpu.reg("rax") == 0x1111_1133 and vcpu.reg("rbx") == 1
