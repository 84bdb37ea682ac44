/* Near CALL/RET on a supervisor shadow stack; #CP(1) on a corrupted return address. */
#include "common.S"

        .text
        .globl _start, case_calls, case_corrupt_ret, bad_ret, attacker, after_calls
_start:
case_calls:
        /* ordinary nested direct and indirect calls: no #CP expected */
        endbr64
        mov $10, %ecx
1:      call leaf_direct
        lea leaf_indirect(%rip), %rax
        call *%rax
        dec %ecx
        jnz 1b
        mov $RESULTS_ADDR, %rbx
        mov %rax, R_GUEST(%rbx)
after_calls:
        hlt

leaf_direct:
        endbr64
        call leaf_inner
        ret
leaf_inner:
        endbr64
        ret
leaf_indirect:
        endbr64
        mov $0x1234, %eax
        ret

case_corrupt_ret:
        endbr64
        call victim
        hlt
victim:
        endbr64
        lea attacker(%rip), %rax
        mov %rax, (%rsp)        /* overwrite the return address on the data stack */
bad_ret:
        ret
attacker:
        endbr64
        mov $RESULTS_ADDR, %rbx
        movq $0xBAD, R_GUEST+8(%rbx)
        hlt

        .globl case_ret_to_unmapped, bad_ret2
case_ret_to_unmapped:
        endbr64
        call victim2
        hlt
victim2:
        endbr64
        movq $0x10, (%rsp)             /* return into the not-present page 0 */
bad_ret2:
        ret
