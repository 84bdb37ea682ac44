"""Harness for the KVM API tests: a Kvm on a model host and a vCPU put in 64-bit mode through
the API only (page tables, GDT and IDT written with Vm.put_memory, then set_sregs/set_regs).

Guests are the flat binaries of guests/kvm (built here with make if missing). Layout:
RAM 0-4 MiB identity-mapped with 2 MiB pages; PML4 0x1000, PDPT 0x2000, PD 0x3000; GDT 0x4000;
IDT 0x5000 (vectors 6/13/14/21 → the stubs of guests/kvm/common.S); stack top 0x80000;
code at 1 MiB; the guest's log at 0x200000 and value slots at 0x201000.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from cetvm.cpu.state import DescriptorTable, Regs, Segment, Sregs
from cetvm.cpuid import get_model
from cetvm.kvm.api import Kvm, KvmVcpu, Vm
from cetvm.kvm.host import Host
from guest_build import GUESTS, built_guest

CODE = 0x100000
LOG = 0x200000
SLOTS = 0x201000
STUBS = {6: 0x40, 13: 0x80, 14: 0xC0, 21: 0x100}


def guest_binary(name: str) -> bytes:
    """guests/build/kvm/<name>.bin, built by make in guests/kvm when missing or stale."""
    return built_guest(f"kvm/{name}.bin", GUESTS / "kvm").read_bytes()


def _gate(offset: int, selector: int = 8) -> bytes:
    lo = (offset & 0xFFFF) | selector << 16 | (0x8E << 40) | ((offset >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", lo, offset >> 32)


def build_machine(vm: Vm) -> None:
    """Identity-mapped page tables, GDT and IDT in guest memory."""
    vm.set_user_memory_region(0, 0, 0x400000)
    vm.put_memory(0x1000, struct.pack("<Q", 0x2000 | 0x3))
    vm.put_memory(0x2000, struct.pack("<Q", 0x3000 | 0x3))
    vm.put_memory(0x3000, struct.pack("<QQ", 0x0 | 0x83, 0x200000 | 0x83))
    vm.put_memory(0x4000, struct.pack("<QQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF))
    idt = bytearray(256 * 16)
    for vector, offset in STUBS.items():
        idt[vector * 16:vector * 16 + 16] = _gate(CODE + offset)
    vm.put_memory(0x5000, bytes(idt))


def long_mode_sregs(cr4_extra: int = 0) -> Sregs:
    data = Segment.data(0x10)
    return Sregs(cs=Segment.code64(0x8), ds=data, es=data, fs=data, gs=data, ss=data,
                 tr=Segment(0x18, 0, 0x67, 0x8B00), ldt=Segment(0, 0, 0xFFFF, 0x8200),
                 gdt=DescriptorTable(0x4000, 23), idt=DescriptorTable(0x5000, 0xFFF),
                 cr0=0x8001_0033, cr3=0x1000, cr4=0x620 | cr4_extra, efer=0x500)


@dataclass
class Guest:
    kvm: Kvm
    vm: Vm
    vcpu: KvmVcpu

    def slot(self, n: int) -> int:
        return struct.unpack("<Q", self.vm.get_memory(SLOTS + 8 * n, 8))[0]

    def log(self) -> list[tuple[int, int]]:
        """(vector, error code) of every exception the guest's handlers saw."""
        count = struct.unpack("<Q", self.vm.get_memory(LOG, 8))[0]
        raw = self.vm.get_memory(LOG + 8, 32 * count)
        return [struct.unpack_from("<QQ", raw, 32 * i) for i in range(count)]


def make_guest(name: str, host: str = "sapphire-rapids", shstk: bool = True, ibt: bool = True,
               code: bytes | None = None, **host_settings) -> Guest:
    """The guest binary ``name`` (or the bytes ``code``) at CODE in 64-bit mode."""
    kvm = Kvm(Host(get_model(host), **host_settings))
    vm = kvm.create_vm()
    build_machine(vm)
    vm.put_memory(CODE, guest_binary(name) if code is None else code)
    vcpu = vm.create_vcpu()
    cpuid = kvm.get_supported_cpuid()
    cpuid.set_feature("shstk", shstk)
    cpuid.set_feature("ibt", ibt)
    vcpu.set_cpuid(cpuid)
    vcpu.set_sregs(long_mode_sregs())
    vcpu.set_regs(Regs(rip=CODE, rsp=0x80000, rflags=0x2))
    return Guest(kvm, vm, vcpu)


def fresh_copy(g: Guest) -> Guest:
    """A fresh Kvm/VM/vCPU with g's RAM (0-4 MiB) and CPUID, ready for restore_vcpu_state."""
    kvm = Kvm(Host(get_model("sapphire-rapids")))
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, 0x400000)
    vm.put_memory(0, g.vm.get_memory(0, 0x400000))
    vcpu = vm.create_vcpu()
    vcpu.set_cpuid(g.vcpu.get_cpuid2())
    return Guest(kvm, vm, vcpu)


@pytest.fixture
def guest_factory():
    return make_guest
