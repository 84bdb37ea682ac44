/* Entered in 32-bit protected mode with paging off (as multiboot does); switches to long mode
 * itself: CR4.PAE, EFER.LME, CR3, CR0.PG, far jump to a 64-bit code segment. */
#include "layout.h"

        .text
        .code32
        .globl _start, long64
_start:
        mov %cr4, %eax
        or $0x20, %eax                 /* PAE */
        mov %eax, %cr4
        mov $PML4_ADDR, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx
        rdmsr
        or $0x900, %eax                /* LME | NXE */
        wrmsr
        mov %cr0, %eax
        or $0x80010000, %eax           /* PG | WP */
        mov %eax, %cr0
        ljmp $KERNEL_CS, $long64

        .code64
long64:
        mov $RESULTS_ADDR, %rbx
        movq $0x64, R_GUEST(%rbx)
        mov $0xC0000080, %ecx
        rdmsr
        mov %rax, R_GUEST+8(%rbx)
        hlt
