/* XSAVES / XRSTORS of the CET state (CET_U, CET_S) and #GP on a bad CET value in XRSTORS. */
#include "common.S"

#define XSS_CET 0x1800
        .text
        .globl _start, case_roundtrip, case_bad_value, bad_xrstors, xsave_area
_start:
case_roundtrip:
        endbr64
        call setup
        lea xsave_area(%rip), %rdi
        mov $(XSS_CET | 3), %eax
        xor %edx, %edx
        xsaves (%rdi)
        mov $0x6A7, %ecx                /* clobber PL3_SSP and PL1_SSP */
        mov $0x1000, %eax
        xor %edx, %edx
        wrmsr
        mov $0x6A5, %ecx
        wrmsr
        mov $(XSS_CET | 3), %eax
        xor %edx, %edx
        xrstors (%rdi)
        mov $RESULTS_ADDR, %rbx
        mov $0x6A7, %ecx
        rdmsr
        mov %eax, R_GUEST(%rbx)
        mov %edx, R_GUEST+4(%rbx)
        mov $0x6A5, %ecx
        rdmsr
        mov %eax, R_GUEST+8(%rbx)
        mov %edx, R_GUEST+12(%rbx)
        hlt

case_bad_value:
        endbr64
        call setup
        lea xsave_area(%rip), %rdi
        mov $(XSS_CET | 3), %eax
        xor %edx, %edx
        xsaves (%rdi)
        mov $RESULTS_ADDR, %rbx
        mov 512(%rdi), %rax
        mov %rax, R_GUEST(%rbx)          /* XSTATE_BV */
        mov 520(%rdi), %rax
        mov %rax, R_GUEST+8(%rbx)        /* XCOMP_BV */
        mov R_GUEST+24(%rbx), %rax       /* offset of PL3_SSP in the area, from the harness */
        orq $2, (%rdi,%rax)              /* misaligned PL3_SSP */
        mov $(XSS_CET | 3), %eax
        xor %edx, %edx
bad_xrstors:
        xrstors (%rdi)
        hlt

setup:
        endbr64
        mov $0xDA0, %ecx                 /* IA32_XSS = CET_U | CET_S */
        mov $XSS_CET, %eax
        xor %edx, %edx
        wrmsr
        mov $0x6A7, %ecx                 /* PL3_SSP */
        mov $0x7654320, %eax
        mov $0x7F, %edx
        wrmsr
        mov $0x6A5, %ecx                 /* PL1_SSP */
        mov $0x1234568, %eax
        xor %edx, %edx
        wrmsr
        ret

        .data
        .balign 64
xsave_area:
        .fill 4096, 1, 0
