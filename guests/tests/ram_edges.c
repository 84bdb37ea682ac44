/* ram_edges: the CPU's own memory accesses reaching guest-physical memory without RAM [issue 9].
 * Select the case with the command line "case=NAME":
 *   rsp   - an exception while RSP points at a page with no RAM: event delivery writes its frame
 *           there -> KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_DELIVERY_EV (KVM cannot
 *           complete an EPT misconfiguration during event delivery);
 *   idt   - the IDT base on a page with no RAM: reading the gate -> DELIVERY_EV;
 *   iret  - IRETQ whose stack is the xAPIC page: the emulated IRET reads MMIO -> an emulation
 *           failure (KVM_INTERNAL_ERROR_EMULATION), as KVM's em_iret would be;
 *   callmmio - with supervisor shadow stacks and IBT on, CALL through a pointer in MMIO: KVM's
 *           emulator refuses CET-guarded instructions -> KVM_INTERNAL_ERROR_EMULATION.
 * Each case ends the run with exit status 126 and a one-line diagnosis — never a crash. */
#include "ktest.h"

#define NO_RAM_PA 0xD0000000ul
#define APIC_PA 0xFEE00000ul
#define VA_NORAM (CET_REGION_BASE + 0x100000)
#define VA_APIC (CET_REGION_BASE + 0x110000)

static void call_through_mmio(void)
{
    __asm__ volatile("call *(%0)" ::"r"(VA_NORAM + 0x20) : "memory");
}

void kmain(void)
{
    kernel_init();
    map_page(VA_NORAM, NO_RAM_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_APIC, APIC_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX | (1ul << 4));
    kprintf("# case: %s\n", kernel_cmdline());
    if (cmdline_has("case=rsp"))
        __asm__ volatile("mov %0, %%rsp; ud2" ::"r"(VA_NORAM + 0x800));
    if (cmdline_has("case=idt")) {
        struct { u16 limit; u64 base; } __attribute__((packed)) d = {0xFFF, VA_NORAM};
        __asm__ volatile("lidt %0; ud2" ::"m"(d));
    }
    if (cmdline_has("case=iret"))
        __asm__ volatile("mov %0, %%rsp; iretq" ::"r"(VA_APIC + 0x100));
    if (cmdline_has("case=callmmio"))
        cet_kernel_start(call_through_mmio, 0);
    puts_serial("Bail out! no case given (case=rsp|idt|iret|callmmio)\n");
    exit_qemu(1);
}
