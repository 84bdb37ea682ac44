/*
 * smp.S - application-processor start-up: the real-mode trampoline and the 32 -> 64-bit path.
 *
 * The BSP copies smp_trampoline..smp_trampoline_end to physical address 0 and sends INIT and a
 * start-up IPI with vector 0 [SDM Vol. 3 §9.4.4]: the AP starts in real mode at 0000:0000
 * (CS.base = vector << 12 = 0).  It loads the trampoline's flat 32-bit GDT, sets CR0.PE and
 * far-jumps to smp_ap_start32, which turns on PAE, loads the BSP's CR3 (smp_ap_cr3), sets
 * EFER.LME/NXE and CR0.PG/WP (IA-32e compatibility mode), loads the kernel GDT and far-jumps
 * to 64-bit code: ap_start64 takes the stack in smp_ap_stack and calls smp_ap_entry() (smp.c).
 * CET is off after INIT (CR4.CET = 0), so nothing here needs ENDBR64 or a shadow stack.
 */
#include "gnuprop.h"
#include "long_mode.h"

    .text
    .code16
    .globl smp_trampoline, smp_trampoline_end
smp_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl tramp_gdt_desc - smp_trampoline      /* DS:offset = physical address after the copy */
    mov %cr0, %eax
    or $1, %eax                                /* CR0.PE */
    mov %eax, %cr0
    ljmpl $0x08, $smp_ap_start32
    .p2align 3
tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF                   /* 0x08 flat 32-bit code */
    .quad 0x00CF92000000FFFF                   /* 0x10 flat 32-bit data */
tramp_gdt_desc:
    .word tramp_gdt_desc - tramp_gdt - 1
    .long tramp_gdt - smp_trampoline
smp_trampoline_end:

    .code32
    .globl smp_ap_start32
smp_ap_start32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    ENTER_LONG_MODE smp_ap_cr3, ap_start64

    .code64
ap_start64:
    LOAD_KERNEL_DATA_SEGMENTS
    mov smp_ap_stack(%rip), %rsp
    and $-16, %rsp
    call smp_ap_entry
1:  hlt
    jmp 1b
