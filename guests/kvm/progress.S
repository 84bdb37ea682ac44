/* A deterministic computation mixing CET MSR state (PL3_SSP pass-through, INT_SSP_TAB
 * intercepted, XSS) and SSE registers, reporting each step with OUT: for save/restore. */
#include "kvm_guest.h"
    .globl main
main:
    WRMSR_IMM 0xDA0, 0x1800
    xor %r12, %r12
    mov $1, %r13
    pxor %xmm3, %xmm3
1:
    mov %r13, %rax
    shl $3, %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov $0x6A7, %ecx                    /* PL3_SSP = 8 * i */
    wrmsr
    mov %r13, %rax
    shl $12, %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov $0x6A8, %ecx                    /* INT_SSP_TAB = i << 12 */
    wrmsr
    mov $0x6A7, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    imul $31, %r12
    add %rax, %r12
    mov $0x6A8, %ecx
    rdmsr
    xor %rax, %r12
    movq %r12, %xmm1
    paddq %xmm1, %xmm3                  /* SSE state carried across steps */
    mov %r12d, %eax
    out %eax, $0x80
    inc %r13
    cmp $20, %r13
    jbe 1b
    movq %xmm3, %rax
    mov %rax, SLOT(0)
    mov %r12, SLOT(1)
    hlt
