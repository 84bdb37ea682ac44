/* Common part of every CPU test guest: IDT entry stubs and a handler that records the event
 * into the results page, then halts or returns with IRETQ (per-vector action byte set by the
 * harness at RESULTS_ADDR + R_ACTION + vector: 0 = halt, 1 = iretq). Each stub is 16 bytes and
 * starts with ENDBR64 (events arm the IBT tracker); the harness points IDT entry n at
 * isr_stubs + 16*n. */
#include "layout.h"

        .text
        .code64
        .balign 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        endbr64
        .if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21)
        nop
        nop
        .else
        pushq $-1
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr

isr_common:
        /* stack: vector, error, rip, cs, rflags, rsp, ss */
        push %rax
        push %rbx
        mov $RESULTS_ADDR, %rbx
        incq R_COUNT(%rbx)
        mov 16(%rsp), %rax
        mov %rax, R_VECTOR(%rbx)
        mov 24(%rsp), %rax
        mov %rax, R_ERROR(%rbx)
        mov 32(%rsp), %rax
        mov %rax, R_RIP(%rbx)
        mov 40(%rsp), %rax
        mov %rax, R_CS(%rbx)
        mov 56(%rsp), %rax
        mov %rax, R_RSP(%rbx)
        mov 64(%rsp), %rax
        mov %rax, R_SS(%rbx)
        lea 32(%rsp), %rax
        mov %rax, R_HANDLER_RSP(%rbx)
        xor %eax, %eax
        rdsspq %rax
        mov %rax, R_SSP(%rbx)
        push %rcx
        mov R_COUNT(%rbx), %rcx
        and $31, %ecx
        mov %rax, R_LOG_SSP-8(%rbx,%rcx,8)
        mov 24(%rsp), %rax
        mov %rax, R_LOG_VEC-8(%rbx,%rcx,8)
        pop %rcx
        mov 16(%rsp), %rax
        movzbl R_ACTION(%rbx,%rax), %eax
        test %eax, %eax
        jz 1f
        pop %rbx
        pop %rax
        add $16, %rsp
        iretq
1:      hlt
        jmp 1b
