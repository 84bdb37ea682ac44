/* long_mode.h - the 32-bit protected mode -> IA-32e step shared by the BSP's multiboot entry
 * (boot.S) and the APs' trampoline (smp.S) [SDM Vol. 3 §10.8.5 "Initializing IA-32e Mode"]:
 * CR4.PAE, CR3 = the page tables, EFER.LME|NXE, CR0.PG|WP|PE, the kernel GDT, far jump to 64-bit
 * code. Clobbers EAX, ECX, EDX. */
#ifndef LONG_MODE_H
#define LONG_MODE_H

    .macro ENTER_LONG_MODE cr3, target
    mov %cr4, %eax
    or $0x20, %eax                   /* CR4.PAE */
    mov %eax, %cr4
    mov \cr3, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x900, %eax                  /* EFER.LME | EFER.NXE */
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax             /* CR0.PG | CR0.WP | CR0.PE */
    mov %eax, %cr0
    lgdt gdt_desc                    /* the kernel GDT (its base is below 4 GiB) */
    ljmp $0x08, $\target
    .endm

/* LOAD_KERNEL_DATA_SEGMENTS: DS/ES/SS = the GDT's kernel data selector 0x10, FS/GS = null
 * (the BSP's two 64-bit entry paths and the APs', after CS is reloaded); clobbers %eax. */
    .macro LOAD_KERNEL_DATA_SEGMENTS
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    .endm

#endif
