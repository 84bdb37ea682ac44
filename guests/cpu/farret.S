/* Far CALL / far RET with the shadow-stack frame; #CP(2) on a far-RET frame mismatch. */
#include "common.S"

        .text
        .globl _start, case_far_roundtrip, case_far_ret_mismatch, far_bad_ret, far_target
_start:
case_far_roundtrip:
        endbr64
        lea farptr(%rip), %rax
        rex64 lcall *(%rax)
        mov $RESULTS_ADDR, %rbx
        movq $1, R_GUEST(%rbx)
        hlt

case_far_ret_mismatch:
        endbr64
        lea farptr_bad(%rip), %rax
        rex64 lcall *(%rax)
        hlt
        endbr64
        hlt

far_target:
        endbr64
        mov $RESULTS_ADDR, %rbx
        incq R_GUEST+8(%rbx)
        lretq

far_target_bad:
        endbr64
        addq $6, (%rsp)                /* return somewhere else: data stack ≠ shadow-stack frame */
far_bad_ret:
        lretq

        .data
farptr:     .quad far_target
            .word KERNEL_CS
farptr_bad: .quad far_target_bad
            .word KERNEL_CS
