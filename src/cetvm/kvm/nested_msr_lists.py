"""vmcs12's MSR-load and MSR-store lists: the VM-entry MSR-load list, the VM-exit MSR-store and
MSR-load lists [K nested.c nested_vmx_check_msr_switch, nested_vmx_load_msr,
nested_vmx_store_msr, nested_vmx_msr_check_common; SDM Vol. 3 §25.7.2, §25.8.2, §28.4, §29.4].

A list is ``count`` 16-byte entries at a guest-physical address: the MSR index (bits 31:0),
reserved bits 63:32 that must be 0, and the value (bits 127:64).

- Control check at VMLAUNCH/VMRESUME (VMfailValid 7): a list with entries starts 16-byte
  aligned and lies below MAXPHYADDR.
- VM entry loads the entry list after L2's state (each entry a WRMSR KVM makes for L2: the MSR
  filter and KVM's checks apply). An entry that cannot be read, has reserved bits set, names an
  x2APIC MSR while x2APIC is on, the microcode MSRs, FS_BASE, GS_BASE or IA32_SMM_MONITOR_CTL,
  is beyond the list limit, or whose WRMSR fails, fails the VM entry: exit reason 34
  (EXIT_REASON_MSR_LOAD_FAIL) with bit 31 and the entry's 1-based number as exit qualification;
  the entries before it stay loaded.
- VM exit stores L2's values into the exit MSR-store list (an entry naming IA32_SMBASE or failing
  the common checks is refused), then, after L1's host state, loads the exit MSR-load list; a
  failure there is a VMX abort (nested_vmx_abort: KVM_REQ_TRIPLE_FAULT → shutdown).
- The list limit is 512 entries: KVM reports IA32_VMX_MISC bits 27:25 = 0
  (nested_vmx_max_atomic_switch_msrs).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cetvm.arch.apic import X2APIC_MSRS, ApicMode, apic_mode
from cetvm.arch.msr import Msr
from cetvm.arch.vmx import VmcsField as F
from cetvm.kvm.msr import guest_maxphyaddr
from cetvm.kvm.nested import NestedVcpu
from cetvm.kvm.vmcs12 import Vmcs12

MSR_ENTRY_SIZE = 16
#: (IA32_VMX_MISC[27:25] + 1) * 512 with KVM's bits 27:25 = 0 (VMX_MISC_MSR_LIST_MULTIPLIER).
MAX_MSR_LIST_ENTRIES = 512
#: MSRs no list may name (nested_vmx_msr_check_common): the microcode-update MSRs.
_NEVER_IN_A_LIST = frozenset({int(Msr.IA32_UCODE_WRITE), int(Msr.IA32_UCODE_REV)})
#: MSRs a load list may not name (nested_vmx_load_msr_check) [SDM Vol. 3 §28.4].
_NEVER_LOADED = frozenset({int(Msr.IA32_FS_BASE), int(Msr.IA32_GS_BASE), int(Msr.IA32_SMM_MONITOR_CTL)})
#: MSRs a store list may not name (nested_vmx_store_msr_check) [SDM Vol. 3 §29.4].
_NEVER_STORED = frozenset({int(Msr.IA32_SMBASE)})
#: (count field, address field) of each list.
ENTRY_LOAD = (F.VM_ENTRY_MSR_LOAD_COUNT, F.VM_ENTRY_MSR_LOAD_ADDR)
EXIT_STORE = (F.VM_EXIT_MSR_STORE_COUNT, F.VM_EXIT_MSR_STORE_ADDR)
EXIT_LOAD = (F.VM_EXIT_MSR_LOAD_COUNT, F.VM_EXIT_MSR_LOAD_ADDR)


@dataclass(frozen=True)
class MsrListEntry:
    """struct vmx_msr_entry."""

    index: int
    reserved: int
    value: int


def nested_vmx_check_msr_switch(vcpu: NestedVcpu, count: int, addr: int) -> bool:
    """nested_vmx_check_msr_switch(): an empty list, or 16-byte aligned and wholly below MAXPHYADDR."""
    if count == 0:
        return True
    limit = 1 << guest_maxphyaddr(vcpu.state)
    return addr % MSR_ENTRY_SIZE == 0 and addr + count * MSR_ENTRY_SIZE - 1 < limit


def nested_vmx_check_msr_switch_controls(vcpu: NestedVcpu, vmcs12: Vmcs12) -> bool:
    """nested_vmx_check_exit_msr_switch_controls + nested_vmx_check_entry_msr_switch_controls."""
    return all(nested_vmx_check_msr_switch(vcpu, vmcs12.read(count), vmcs12.read(addr))
               for count, addr in (EXIT_LOAD, EXIT_STORE, ENTRY_LOAD))


def read_msr_entry(vcpu: NestedVcpu, gpa: int) -> MsrListEntry | None:
    """One entry from L1's memory (None when it is not all RAM: kvm_vcpu_read_guest fails)."""
    if not vcpu.cpu.is_ram(gpa, MSR_ENTRY_SIZE):
        return None
    index, reserved, value = struct.unpack("<IIQ", vcpu.cpu.read_phys(gpa, MSR_ENTRY_SIZE))
    return MsrListEntry(index, reserved, value)


def nested_vmx_msr_check_common(vcpu: NestedVcpu, entry: MsrListEntry) -> bool:
    """nested_vmx_msr_check_common(): no x2APIC MSR while x2APIC is on, no microcode MSR, reserved 0."""
    if apic_mode(vcpu.msrs.apic_base) is ApicMode.X2APIC and entry.index in X2APIC_MSRS:
        return False
    return entry.index not in _NEVER_IN_A_LIST and entry.reserved == 0


def nested_vmx_load_msr(vcpu: NestedVcpu, vmcs12: Vmcs12, which: tuple[F, F]) -> int:
    """nested_vmx_load_msr(): load the list; 0 when every entry loaded, else the 1-based
    number of the entry that failed (the entries before it stay loaded)."""
    count, addr = vmcs12.read(which[0]), vmcs12.read(which[1])
    for i in range(count):
        entry = read_msr_entry(vcpu, addr + i * MSR_ENTRY_SIZE) if i < MAX_MSR_LIST_ENTRIES else None
        if (entry is None or not nested_vmx_msr_check_common(vcpu, entry) or entry.index in _NEVER_LOADED
                or not vcpu.kvm_msr_with_filter(entry.index, entry.value)[0]):
            return i + 1
    return 0


def nested_vmx_store_msr(vcpu: NestedVcpu, vmcs12: Vmcs12) -> bool:
    """nested_vmx_store_msr(): the exit MSR-store list gets L2's values; False when an entry fails."""
    count, addr = vmcs12.read(EXIT_STORE[0]), vmcs12.read(EXIT_STORE[1])
    for i in range(count):
        gpa = addr + i * MSR_ENTRY_SIZE
        entry = read_msr_entry(vcpu, gpa) if i < MAX_MSR_LIST_ENTRIES else None
        if entry is None or not nested_vmx_msr_check_common(vcpu, entry) or entry.index in _NEVER_STORED:
            return False
        ok, value = vcpu.kvm_msr_with_filter(entry.index)
        if not ok:
            return False
        vcpu.cpu.write_phys(gpa + 8, struct.pack("<Q", value))
    return True
