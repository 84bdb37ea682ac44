/* CET instructions: RSTORSSP/SAVEPREVSSP pivot, bad tokens, SETSSBSY, WRSS, RDSSP/INCSSP,
 * WRMSR and MOV CR checks. */
#include "common.S"

        .text
        .globl _start, case_rstorssp_bad, case_setssbsy_busy, case_wrss, case_wrmsr_misaligned
        .globl case_cr4_cet_wp0, case_rdssp_incssp, case_pivot, cr4_write
_start:
case_rstorssp_bad:
        endbr64
        rstorssp SSTK_SPARE+0xF00
        hlt

case_setssbsy_busy:
        endbr64
        setssbsy
        mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST(%rbx)
        hlt

case_wrss:
        endbr64
        mov $0x1122334455667788, %rax
        mov $SSTK_KERNEL+0x800, %rdi
        wrssq %rax, (%rdi)
        mov $RESULTS_ADDR, %rbx
        movq $1, R_GUEST(%rbx)
        hlt

case_wrmsr_misaligned:
        endbr64
        mov $0x6A4, %ecx               /* IA32_PL0_SSP */
        mov $(SSTK_KERNEL2+0xFF8+2), %eax
        xor %edx, %edx
        wrmsr
        mov $RESULTS_ADDR, %rbx
        movq $1, R_GUEST(%rbx)
        hlt

case_cr4_cet_wp0:
        endbr64
        mov %cr4, %rax
        btr $23, %rax
        mov %rax, %cr4                 /* CET off */
        mov %cr0, %rdx
        btr $16, %rdx
        mov %rdx, %cr0                 /* WP off */
        bts $23, %rax
cr4_write:
        mov %rax, %cr4                 /* CET with WP=0: #GP */
        hlt

case_rdssp_incssp:
        endbr64
        call 1f
        endbr64                        /* landing pad of the indirect JMP below */
        mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST+16(%rbx)
        hlt
1:      mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST(%rbx)
        mov $1, %ecx
        incsspq %rcx                   /* drop our own return address from the shadow stack */
        rdsspq %rax
        mov %rax, R_GUEST+8(%rbx)
        pop %rax
        jmp *%rax                      /* return without RET */

/* A threads library's stack switch: RSTORSSP to the new stack's restore token, SAVEPREVSSP
 * leaves a restore token on the old one; work there; switch back the same way. */
case_pivot:
        endbr64
        mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST(%rbx)        /* SSP before */
        rstorssp SSTK_SPARE+0xFF8      /* token written by the harness */
        saveprevssp
        rdsspq %rax
        mov %rax, R_GUEST+8(%rbx)      /* SSP on the new stack */
        call work                      /* shadow stack in use on the new stack */
        mov R_GUEST(%rbx), %rax        /* old SSP: its restore token is 8 below */
        sub $8, %rax
        rstorssp (%rax)
        saveprevssp
        rdsspq %rax
        mov %rax, R_GUEST+16(%rbx)     /* SSP back on the old stack */
        call work
        hlt
work:
        endbr64
        incq R_GUEST+24(%rbx)
        ret
