/* Shadow-stack paging rules: #PF(SS) for a shadow-stack access to a normal page, #PF(W|P) for
 * an ordinary write to a shadow-stack page. */
#include "common.S"

        .text
        .globl _start, case_call_on_normal_page, call_site, case_write_ss_page, write_site, case_read_ss_page
_start:
case_call_on_normal_page:
        endbr64                         /* the harness points SSP into NORMAL_PAGE */
call_site:
        call 1f
        hlt
1:      endbr64
        ret

case_write_ss_page:
        endbr64
        mov $SSTK_KERNEL+0x100, %rdi
write_site:
        movq $1, (%rdi)
        hlt

case_read_ss_page:
        endbr64
        mov $SSTK_KERNEL+0xFF8, %rdi
        mov (%rdi), %rax               /* ordinary reads of shadow-stack pages are allowed */
        mov $RESULTS_ADDR, %rbx
        mov %rax, R_GUEST(%rbx)
        hlt
