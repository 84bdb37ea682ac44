"""KVM_INTERRUPT, kvm_run.if_flag / ready_for_interrupt_injection, request_interrupt_window and
KVM_EXIT_IRQ_WINDOW_OPEN (api.rst), and the CPU rules under them: delivery through the IDT only
with RFLAGS.IF = 1 and no STI / MOV SS shadow, HLT woken by a pending interrupt."""

from __future__ import annotations

import errno
import struct

import pytest

from cetvm.cpu.state import Regs
from cetvm.cpuid import get_model
from cetvm.kvm.api import Kvm
from cetvm.kvm.errors import KvmIoctlError
from cetvm.kvm.host import Host
from cetvm.kvm.vcpu_run import KvmExitReason
from conftest import CODE, SLOTS, _gate, build_machine, long_mode_sregs

from cetvm.cpu.native import native_available

VECTOR = 0x20
HANDLER = CODE + 0x200
IF = 1 << 9
# endbr64; inc dword [SLOTS]; mov rax, [rsp]; mov [SLOTS+8], rax; mov rax, [rsp+16]; mov [SLOTS+16], rax; iretq
HANDLER_CODE = bytes.fromhex("f30f1efa" "ff0425" + SLOTS.to_bytes(4, "little").hex()
                             + "488b0424" "48890425" + (SLOTS + 8).to_bytes(4, "little").hex()
                             + "488b442410" "48890425" + (SLOTS + 16).to_bytes(4, "little").hex() + "48cf")
STI, CLI, HLT, NOP, CPUID, JMP_SELF, MOV_SS_AX = "fb", "fa", "f4", "90", "0fa2", "ebfe", "8ed0"


@pytest.fixture(autouse=True, params=["python", "native"])
def cet_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The interrupt rules hold on both block-hook paths (checked only at exits, not per block)."""
    if request.param == "native" and not native_available():
        pytest.skip("native CET fast path not built")
    monkeypatch.setenv("CETVM_CET_PATH", request.param)
    return request.param


class IrqGuest:
    def __init__(self, code: str, rflags: int = 0x2) -> None:
        kvm = Kvm(Host(get_model("sapphire-rapids")))
        self.vm = kvm.create_vm()
        build_machine(self.vm)
        self.vm.put_memory(0x5000 + VECTOR * 16, _gate(HANDLER))
        self.vm.put_memory(CODE, bytes.fromhex(code))
        self.vm.put_memory(HANDLER, HANDLER_CODE)
        self.vcpu = self.vm.create_vcpu()
        self.vcpu.set_cpuid(kvm.get_supported_cpuid())
        self.vcpu.set_sregs(long_mode_sregs())
        self.vcpu.set_regs(Regs(rip=CODE, rsp=0x80000, rflags=rflags, rax=0x10))

    def handled(self) -> tuple[int, int, int]:
        """(interrupts the handler saw, return RIP of the last one, RFLAGS it saved)."""
        return struct.unpack("<QQQ", self.vm.get_memory(SLOTS, 24))


def test_interrupt_waits_for_if_then_wakes_hlt_after_sti_shadow() -> None:
    g = IrqGuest(HLT + STI + HLT + CLI + JMP_SELF)
    run = g.vcpu.run()
    assert run.exit_reason is KvmExitReason.HLT and run.rip == CODE
    assert not run.if_flag and not run.ready_for_interrupt_injection
    g.vcpu.interrupt(VECTOR)
    with pytest.raises(KvmIoctlError) as err:
        g.vcpu.interrupt(VECTOR + 1)
    assert err.value.errno == errno.EEXIST
    run = g.vcpu.run(budget=200)
    assert run.exit_reason is KvmExitReason.INTR
    count, ret_rip, saved_rflags = g.handled()
    # STI's shadow covers the HLT: it halts, and the interrupt wakes it (return address after it)
    assert (count, ret_rip) == (1, CODE + 3)
    assert saved_rflags & IF
    assert g.vcpu.cpu.pending_interrupt is None
    g.vcpu.interrupt(VECTOR)  # accepted again (the first was delivered), IF = 0 now: stays pending
    run = g.vcpu.run(budget=50)
    assert g.handled()[0] == 1 and not run.if_flag and not run.ready_for_interrupt_injection


def test_hlt_with_if_and_nothing_pending_exits_to_userspace() -> None:
    g = IrqGuest(STI + NOP + HLT + JMP_SELF)
    run = g.vcpu.run()
    assert run.exit_reason is KvmExitReason.HLT and run.rip == CODE + 2
    assert run.if_flag and run.ready_for_interrupt_injection
    g.vcpu.interrupt(VECTOR)
    g.vcpu.run(budget=100)
    assert g.handled()[:2] == (1, CODE + 3)


def test_sti_shadow_blocks_the_next_instruction_only() -> None:
    g = IrqGuest(STI + NOP + JMP_SELF)
    run = g.vcpu.run(budget=1)
    assert run.exit_reason is KvmExitReason.INTR and run.rip == CODE + 1
    assert run.if_flag and not run.ready_for_interrupt_injection  # in STI's shadow
    g.vcpu.interrupt(VECTOR)
    g.vcpu.run(budget=1)  # the NOP runs in the shadow
    assert g.handled()[0] == 0
    g.vcpu.run(budget=20)
    assert g.handled()[:2] == (1, CODE + 2)


def test_mov_ss_shadow() -> None:
    g = IrqGuest(MOV_SS_AX + NOP + JMP_SELF, rflags=0x2 | IF)
    run = g.vcpu.run(budget=1)
    assert run.if_flag and not run.ready_for_interrupt_injection


def test_request_interrupt_window_exits_when_the_window_opens() -> None:
    g = IrqGuest(CLI + CPUID + STI + NOP + CPUID + JMP_SELF)
    g.vcpu.request_interrupt_window = True
    run = g.vcpu.run()
    # the CPU's interrupt-window exit (KVM set the control) at the VM entry after the second CPUID
    assert run.exit_reason is KvmExitReason.IRQ_WINDOW_OPEN
    assert run.rip == CODE + 7 and run.if_flag and run.ready_for_interrupt_injection
    assert g.vcpu.run().exit_reason is KvmExitReason.IRQ_WINDOW_OPEN  # still open: at once
    g.vcpu.request_interrupt_window = False
    g.vcpu.interrupt(VECTOR)
    g.vcpu.run(budget=50)
    assert g.handled()[:2] == (1, CODE + 7)


def test_interrupt_rejects_bad_vector_and_reset_drops_pending() -> None:
    g = IrqGuest(JMP_SELF)
    with pytest.raises(KvmIoctlError) as err:
        g.vcpu.interrupt(256)
    assert err.value.errno == errno.EINVAL
    g.vcpu.interrupt(VECTOR)
    g.vcpu.kvm_vcpu_reset(init_event=True)
    g.vcpu.interrupt(VECTOR)  # no -EEXIST: RESET/INIT cleared the queue
