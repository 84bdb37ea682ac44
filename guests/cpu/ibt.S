/* Indirect branch tracking: #CP(3) on indirect JMP/CALL to a non-ENDBR target; NOTRACK. */
#include "common.S"

        .text
        .globl _start, case_good, case_jmp_bad, case_call_bad, case_notrack_jmp, no_endbr_target, notrack_landed
_start:
case_good:
        endbr64
        lea with_endbr(%rip), %rax
        call *%rax
        lea 1f(%rip), %rax
        jmp *%rax
1:      endbr64
        mov $RESULTS_ADDR, %rbx
        movq $1, R_GUEST(%rbx)
        hlt

case_jmp_bad:
        endbr64
        lea no_endbr_target(%rip), %rax
        jmp *%rax

case_call_bad:
        endbr64
        lea no_endbr_target(%rip), %rax
        call *%rax
        hlt

case_notrack_jmp:
        endbr64
        lea notrack_landed(%rip), %rax
        notrack jmp *%rax

with_endbr:
        endbr64
        ret

no_endbr_target:
        nop
        mov $RESULTS_ADDR, %rbx
        movq $0xBAD, R_GUEST+8(%rbx)
        hlt

notrack_landed:
        nop
        mov $RESULTS_ADDR, %rbx
        movq $2, R_GUEST(%rbx)
        hlt
