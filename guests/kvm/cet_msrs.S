/* Guest RDMSR/WRMSR of the CET MSRs: pass-through (PL3_SSP, S_CET, U_CET, PL0_SSP) and
 * intercepted (INT_SSP_TAB) accesses, and the #GP cases of both paths. */
#include "kvm_guest.h"
    .globl main
main:
    WRMSR_IMM 0x6A7, 0x7f0000001000     /* PL3_SSP, aligned */
    RDMSR_SLOT 0x6A7, 0
    WRMSR_IMM 0x6A7, 0x7f0000001001     /* PL3_SSP misaligned: #GP */
    RDMSR_SLOT 0x6A7, 1
    WRMSR_IMM 0x6A8, 0x7f0000002003     /* INT_SSP_TAB: no alignment rule */
    RDMSR_SLOT 0x6A8, 2
    WRMSR_IMM 0x6A2, 0x4                /* S_CET.ENDBR_EN */
    RDMSR_SLOT 0x6A2, 3
    WRMSR_IMM 0x6A0, 0x40               /* U_CET reserved bit 6: #GP */
    WRMSR_IMM 0x6A4, 0x7f0000003000     /* PL0_SSP */
    RDMSR_SLOT 0x6A0, 4
    WRMSR_IMM 0x6A8, 0x800000000000     /* INT_SSP_TAB not canonical: #GP */
    hlt
