"""KVM_SET_USER_MEMORY_REGION's checks (kvm_set_memory_region / __kvm_set_memory_region in
virt/kvm/kvm_main.c, kvm_arch_prepare_memory_region in arch/x86/kvm/x86.c).

Decision: cetvm's KVM has one address space (kvm_arch_nr_memslot_as_ids = 1): bits 31:16 of the
slot (the address-space id) must be 0. KVM gives SMM its own address space (as_id 1, which the
VMM fills with SMRAM); cetvm's SMM (:mod:`cetvm.kvm.smm`) uses ordinary RAM at SMBASE instead.
"""

from __future__ import annotations

from cetvm.arch.regs import U64_MASK

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
#: x86: KVM_MEM_SLOTS_NUM (SHRT_MAX) minus KVM_INTERNAL_MEM_SLOTS (3).
KVM_USER_MEM_SLOTS = 32764
#: KVM_MEM_MAX_NR_PAGES: a slot holds fewer than 2^31 pages.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
#: kvm_mmu_max_gfn() without TDP: shadow paging covers 52-bit guest-physical addresses.
SHADOW_PAGING_GPA_BITS = 52


def kvm_memory_region_invalid(slot: int, guest_phys_addr: int, memory_size: int, max_gpa_bits: int) -> str | None:
    """Why KVM_SET_USER_MEMORY_REGION returns -EINVAL for these (already u32/u64) fields, or None.

    In KVM's order: size and address page-aligned, the address-space id and slot id in range,
    no wrap-around of guest_phys_addr + memory_size, at most KVM_MEM_MAX_NR_PAGES pages, and
    (x86) the last page below kvm_mmu_max_gfn() — ``max_gpa_bits`` is the host's MAXPHYADDR
    with TDP (shadow_phys_bits), 52 without.
    """
    if memory_size % PAGE_SIZE:
        return f"memory_size {memory_size:#x} is not a multiple of the page size"
    if guest_phys_addr % PAGE_SIZE:
        return f"guest_phys_addr {guest_phys_addr:#x} is not page-aligned"
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id:
        return f"address space {as_id} does not exist (cetvm's KVM has no SMM address space: SMRAM is ordinary RAM)"
    if slot_id >= KVM_USER_MEM_SLOTS:
        return f"slot {slot_id} is not below KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})"
    if guest_phys_addr + memory_size > U64_MASK + 1:
        return f"guest_phys_addr {guest_phys_addr:#x} + memory_size {memory_size:#x} wraps around"
    if memory_size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES:
        return f"memory_size {memory_size:#x} is more than KVM_MEM_MAX_NR_PAGES pages"
    if memory_size and guest_phys_addr + memory_size > 1 << max_gpa_bits:
        return (f"{guest_phys_addr:#x}+{memory_size:#x} ends beyond the {max_gpa_bits}-bit guest-physical "
                "address space (kvm_mmu_max_gfn)")
    return None
