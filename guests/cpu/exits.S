/* VM exits: port I/O, CPUID, intercepted MSRs, MMIO, VMCALL, XSETBV, MOV to CR4 and CR3, HLT
 * with interrupts on, a counted loop, and a triple fault. */
#include "common.S"

        .text
        .globl _start, case_io, case_cpuid, case_msr, case_mmio, case_vmcall, case_xsetbv, case_ud
        .globl case_loop, case_triple, unknown_rdmsr, ud_site, mmio_read, case_cr4, cr4_write
        .globl case_midblock, midblock_mmio, midblock_pf
        .globl case_hlt, hlt_site, hlt_after, case_cr3, cr3_write, case_window, window_site
_start:
case_io:
        endbr64
        mov $RESULTS_ADDR, %rbx
        mov $0x3F8, %dx
        mov $0x41, %al
        out %al, %dx
        in $0x60, %al
        mov %al, R_GUEST(%rbx)
        mov $0x510, %dx
        in %dx, %eax
        mov %rax, R_GUEST+8(%rbx)
        hlt

case_cpuid:
        endbr64
        mov $RESULTS_ADDR, %rbx
        mov $7, %eax
        xor %ecx, %ecx
        cpuid
        mov %rbx, %rsi
        mov $RESULTS_ADDR, %rbx
        mov %rsi, R_GUEST(%rbx)
        mov %rcx, R_GUEST+8(%rbx)
        hlt

case_msr:
        endbr64
        mov $RESULTS_ADDR, %rbx
        mov $0x4B564D00, %ecx          /* intercepted by the test */
        rdmsr
        mov %eax, R_GUEST(%rbx)
        mov %edx, R_GUEST+4(%rbx)
        mov $0x4B564D01, %ecx
        mov $0x11112222, %eax
        mov $0x33334444, %edx
        wrmsr
        mov $0x6A2, %ecx               /* IA32_S_CET: handled by the vCPU */
        rdmsr
        mov %eax, R_GUEST+8(%rbx)
        mov $0x9999, %ecx              /* exists nowhere: #GP */
unknown_rdmsr:
        rdmsr
        hlt

case_mmio:
        endbr64
        mov $RESULTS_ADDR, %rbx
        mov $MMIO_PAGE, %rdi
mmio_read:
        mov 0x10(%rdi), %eax
        mov %rax, R_GUEST(%rbx)
        movq $0x55AA, 0x20(%rdi)
        hlt

case_vmcall:
        endbr64
        mov $42, %eax
        vmcall
        mov $RESULTS_ADDR, %rbx
        mov %rax, R_GUEST(%rbx)
        hlt

case_xsetbv:
        endbr64
        xor %ecx, %ecx
        mov $7, %eax
        xor %edx, %edx
        xsetbv
        hlt

case_ud:
        endbr64
ud_site:
        ud2

/* Set CR4.CET (CR0.WP is set by the harness) with a MOV from RCX, then HLT. */
case_cr4:
        endbr64
        mov %cr4, %rcx
        or $(1 << 23), %rcx
cr4_write:
        mov %rcx, %cr4
        mov $RESULTS_ADDR, %rbx
        movq $1, R_GUEST(%rbx)
        hlt

/* STI; HLT: halts with interrupts enabled (the harness's handler records an interrupt and
 * halts), then records that execution went on past the HLT. */
case_hlt:
        endbr64
        mov $RESULTS_ADDR, %rbx
        sti
hlt_site:
        hlt
hlt_after:
        movq $1, R_GUEST(%rbx)
        cli
        hlt

/* STI; NOP: the interrupt window opens in front of the HLT (STI's shadow ends with the NOP). */
case_window:
        endbr64
        mov $RESULTS_ADDR, %rbx
        sti
        nop
window_site:
        hlt

/* Reload CR3 with its own value (MOV from RAX), then record it. */
case_cr3:
        endbr64
        mov $RESULTS_ADDR, %rbx
        mov %cr3, %rax
cr3_write:
        mov %rax, %cr3
        movq $1, R_GUEST(%rbx)
        hlt

case_loop:
        endbr64
        mov $1000, %ecx
1:      dec %ecx
        jnz 1b
        mov $RESULTS_ADDR, %rbx
        movq $1, R_GUEST(%rbx)
        hlt

/* Long translation blocks with stops inside them (the budget counts whole blocks, see
 * cetvm.cpu.budget): a loop of 8-instruction iterations, an MMIO read and a #PF in the middle
 * of straight-line code (the #PF handler records it and halts). */
case_midblock:
        endbr64
        mov $RESULTS_ADDR, %rbx
        mov $MMIO_PAGE, %rdi
        mov $0x40000000, %rsi          /* not mapped */
        xor %eax, %eax
        mov $5, %ecx
1:      add $1, %eax
        add $2, %eax
        add $3, %eax
        add $4, %eax
        add $5, %eax
        add $6, %eax
        dec %ecx
        jnz 1b
        add $7, %eax
        add $8, %eax
midblock_mmio:
        mov 0x10(%rdi), %edx
        add $9, %eax
        add %edx, %eax
        mov %rax, R_GUEST(%rbx)
        add $10, %eax
        add $11, %eax
midblock_pf:
        mov (%rsi), %edx
        add $12, %eax
        hlt

case_triple:
        endbr64
        lea zero_idt(%rip), %rax
        lidt (%rax)
        ud2

        .data
zero_idt:
        .word 0
        .quad 0
