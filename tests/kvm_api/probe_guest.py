"""A guest of a few bytes run at CPL0 in 64-bit mode through the KVM API (the harness of this
directory): each run gets a fresh 64-byte block with HLT stubs for #UD, #GP, #PF and #CP, so a
test learns whether its instruction faulted and with which vector."""

from __future__ import annotations

from conftest import CODE, SLOTS, _gate, build_machine, long_mode_sregs  # noqa: F401 (SLOTS re-exported)

from cetvm.cpu.state import Regs
from cetvm.cpuid import get_model
from cetvm.kvm.api import Kvm, KvmExitReason
from cetvm.kvm.host import Host
from cetvm.vmm.config import CetMode, guest_cpuid
from cetvm.vmm.guest_cpu import GuestCpuSpec

IDT = 0x5000
PROBE = CODE + 0x400
HLT = b"\xf4"

CR4_OSFXSR_OSXMMEXCPT_OSXSAVE_FSGSBASE = (1 << 9) | (1 << 10) | (1 << 18) | (1 << 16)


def vm_for(model: str, spec: str = ""):
    kvm = Kvm(Host(get_model(model)))
    vm = kvm.create_vm()
    build_machine(vm)
    cpuid = guest_cpuid(kvm.get_supported_cpuid(), CetMode.ON, GuestCpuSpec.parse(spec) if spec else None)
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid(cpuid)
    cr4 = CR4_OSFXSR_OSXMMEXCPT_OSXSAVE_FSGSBASE  # minus what KVM_SET_SREGS refuses for this CPUID
    cr4 &= ~((0 if cpuid.has("xsave") else 1 << 18) | (0 if cpuid.has("fsgsbase") else 1 << 16))
    vcpu.set_sregs(long_mode_sregs(cr4))
    return vm, vcpu, cpuid


_next_probe = [PROBE]
#: Offsets of the per-run fault stubs inside a probe block.
_STUB_OFFSETS = {1: 0x2C, 6: 0x30, 13: 0x34, 14: 0x38, 21: 0x3C}


def run_probe(vm, vcpu, code: bytes, **regs) -> int | None:
    """Run ``code`` + HLT in a fresh 64-byte block whose last bytes are HLT stubs for #UD,
    #GP, #PF and #CP (the IDT gates are pointed at them); the vector that faulted, or None.
    Neither code nor stubs are ever re-entered at an address used before: see the note on
    re-entering a HLT at a used address in the h3 report (engine)."""
    probe = _next_probe[0]
    _next_probe[0] = PROBE + (probe - PROBE + 0x40) % 0xE_0000
    assert len(code) < 0x2C
    block = bytearray(code + HLT) + bytearray(0x40 - len(code) - 1)
    for vector, offset in _STUB_OFFSETS.items():
        block[offset] = HLT[0]
        vm.put_memory(IDT + 16 * vector, _gate(probe + offset))
    vm.put_memory(probe, bytes(block))
    vcpu.set_regs(Regs(rip=probe, rsp=0x80000, rflags=0x2, rsi=SLOTS, **regs))
    exit_ = vcpu.run(budget=10_000)
    assert exit_.exit_reason is KvmExitReason.HLT, exit_
    vcpu.run(immediate_exit=True)  # complete the HLT (KVM's complete_userspace_io)
    rip = vcpu.get_regs().rip
    for vector, offset in _STUB_OFFSETS.items():
        if rip == probe + offset + 1:
            return vector
    assert rip == probe + len(code) + 1
    return None


