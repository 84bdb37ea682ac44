/*
 * boot.S - the two entry points of a test kernel.
 *
 *  _start   multiboot v1: 32-bit protected mode, paging off, EAX=0x2BADB002, EBX=info.
 *           Builds identity page tables for 0..1 GiB (2 MiB pages), enables PAE, EFER.LME/NXE,
 *           CR0.PG|WP, loads the GDT and far-jumps to 64-bit code.
 *  _start64 ELF64 entry (e_entry): already in 64-bit mode at CPL0 with identity-mapped low RAM;
 *           loads our GDT and reloads CS with a far return.
 * Both clear .bss, take the boot stack and call kmain() (kernel_init() builds the final tables).
 */
#include "gnuprop.h"
#include "long_mode.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010002          /* bit 1: memory info; bit 16: a.out kludge (address fields valid) */

    .section .multiboot, "a"
    .p2align 2
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long (-(MB_MAGIC + MB_FLAGS)) & 0xFFFFFFFF
    .long mb_header                  /* header_addr */
    .long __kernel_start             /* load_addr (== header_addr: header is first in the image) */
    .long __load_end                 /* load_end_addr */
    .long __kernel_end               /* bss_end_addr */
    .long _start                     /* entry_addr */

    .text
    .code32
    .globl _start
_start:
    cli
    cld
    mov %eax, %esi                   /* multiboot magic */
    mov %ebx, %ebp                   /* multiboot info */
    mov $__bss_start, %edi
    mov $__kernel_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl
    /* boot page tables: PML4[0] -> PDPT[0] -> PD of 512 x 2 MiB identity pages */
    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $3, %eax
    mov %eax, boot_pdpt
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                   /* P | RW | PS */
    mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    ENTER_LONG_MODE $boot_pml4, long_mode_entry

    .code64
long_mode_entry:
    LOAD_KERNEL_DATA_SEGMENTS
    mov $boot_stack_top, %rsp
    mov %esi, boot_mb_magic(%rip)
    mov %ebp, boot_mb_info(%rip)
    jmp common64

    .globl _start64
    .type _start64, @function
_start64:
    endbr64
    cli
    cld
    mov $__bss_start, %rdi
    mov $__kernel_end, %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    mov $boot_stack_top, %rsp
    lgdt gdt_desc
    pushq $0x08
    lea 2f(%rip), %rax
    push %rax
    lretq
2:  LOAD_KERNEL_DATA_SEGMENTS
    movl $0, boot_mb_magic(%rip)

common64:
    and $-16, %rsp
    call kmain
    mov $1, %edi
    call exit_qemu
3:  hlt
    jmp 3b

    .data
    .p2align 4
    .globl gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF         /* 0x08 kernel code, 64-bit */
    .quad 0x00CF93000000FFFF         /* 0x10 kernel data */
    .quad 0x00CFFA000000FFFF         /* 0x18 user code 32-bit (SYSRET base) */
    .quad 0x00CFF2000000FFFF         /* 0x20 user data */
    .quad 0x00AFFA000000FFFF         /* 0x28 user code, 64-bit */
    .quad 0, 0                       /* 0x30 TSS (filled by kernel_init) */
gdt_end:
    .p2align 3
    .globl gdt_desc
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl boot_mb_magic, boot_mb_info
boot_mb_magic: .long 0
boot_mb_info:  .long 0

    .bss
    .p2align 12
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd:   .skip 4096
    .p2align 4
boot_stack: .skip 16384
boot_stack_top:
