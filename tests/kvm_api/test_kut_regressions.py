"""Bugs kvm-unit-tests found in cetvm, kept fixed without kvm-unit-tests (each test names the
kvm-unit-tests entry and report that found it). CPUID/MSR/CR4 ones live in
test_guest_cpuid_honesty.py."""

from __future__ import annotations

import struct

from probe_guest import SLOTS, run_probe, vm_for

NONCANONICAL = 0xAAAA_AAAA_AAAA_AAAA


def _system_descriptor(base: int, limit: int, type_: int) -> bytes:
    """A 16-byte 64-bit system descriptor (LDT type 2, available TSS type 9), present, DPL 0."""
    low = (limit & 0xFFFF) | (base & 0xFFFF) << 16
    high = (base >> 16) & 0xFF | type_ << 8 | 1 << 15 | (limit >> 16 & 0xF) << 16 | (base >> 24 & 0xFF) << 24
    return struct.pack("<IIII", low, high, base >> 32 & 0xFFFF_FFFF, 0)


def test_lgdt_lidt_with_a_noncanonical_base_are_gp():
    """la57: "Write to GDTR_BASE/IDTR_BASE with value aaaaaaaaaaaaaaaa did NOT fail"."""
    vm, vcpu, _ = vm_for("sapphire-rapids")
    vm.put_memory(SLOTS, struct.pack("<HQ", 0xFFF, NONCANONICAL))
    assert run_probe(vm, vcpu, b"\x0f\x01\x16") == 13  # lgdt [rsi]
    assert run_probe(vm, vcpu, b"\x0f\x01\x1e") == 13  # lidt [rsi]
    assert vcpu.get_sregs().gdt.base == 0x4000 and vcpu.get_sregs().idt.base == 0x5000
    vm.put_memory(SLOTS, struct.pack("<HQ", 23, 0x4000))
    assert run_probe(vm, vcpu, b"\x0f\x01\x16") is None  # a canonical base loads


def test_ltr_lldt_with_a_noncanonical_descriptor_base_are_gp():
    """la57: "Write to TR_BASE / LDT_BASE with value ... did NOT fail"."""
    vm, vcpu, _ = vm_for("sapphire-rapids")
    gdt = struct.pack("<QQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF) + _system_descriptor(NONCANONICAL, 0x67, 9) + _system_descriptor(NONCANONICAL, 0xFFF, 2)
    gdt += _system_descriptor(0x7000, 0x67, 9)
    vm.put_memory(0x6000, gdt)
    vm.put_memory(SLOTS, struct.pack("<HQ", len(gdt) - 1, 0x6000))
    assert run_probe(vm, vcpu, b"\x0f\x01\x16") is None  # lgdt [rsi]: our GDT
    assert run_probe(vm, vcpu, b"\x0f\x00\xd8", rax=0x18) == 13  # ltr ax: TSS with a bad base
    assert run_probe(vm, vcpu, b"\x0f\x00\xd0", rax=0x28) == 13  # lldt ax: LDT with a bad base
    assert run_probe(vm, vcpu, b"\x0f\x00\xd8", rax=0x38) is None  # ltr ax: a good TSS loads


def test_single_step_trap_after_an_emulated_instruction():
    """debug: "Single-step #DB on emulated instructions": with RFLAGS.TF, CPUID (which cetvm
    emulates) is followed by #DB with DR6.BS, RIP at the next instruction (pushed on the stack)."""
    vm, vcpu, _ = vm_for("sapphire-rapids")
    code = b"\x68\x02\x01\x00\x00\x9d" + b"\x0f\xa2" + b"\x90"  # push 0x102; popf; cpuid; nop
    assert run_probe(vm, vcpu, code, rax=0) == 1
    regs = vcpu.get_regs()
    pushed_rip = struct.unpack("<Q", vm.get_memory(regs.rsp, 8))[0]
    assert pushed_rip & 0x3F == 6 + 2  # the instruction after CPUID
    assert vcpu.get_sregs() is not None and vcpu.cpu.reg("dr6") & (1 << 14)
