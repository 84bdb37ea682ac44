/* A ring-3 indirect CALL whose target page is not present: the #PF on fetching the target
 * arrives before the target's block starts, so the CALL's own CET effects (shadow-stack push,
 * IBT tracker armed) must already have happened, and the ENDBRANCH check must wait until the
 * guest really reaches the target (after the #PF handler maps the page and IRETQs back).
 *
 * The guest installs its own #PF handler (pf_fixup) which records what it saw into the results
 * page (R_GUEST slots below), sets P in the target page's PTE and returns with IRETQ. */
#include "common.S"

/* First page table of the harness's identity map (tests/cpu/harness.py: PT_BASE + 2 pages). */
#define FIRST_PT        0x4000
/* R_GUEST slots (8 bytes each) */
#define G_SSP_BEFORE    0
#define G_RETURNED      8
#define G_SSP_AFTER     16
#define G_PF_CR2        24
#define G_PF_ERROR      32
#define G_PF_RIP        40
#define G_PF_PL3_SSP    48
#define G_PF_SS_TOP     56
#define G_PF_U_CET      64
#define G_PF_COUNT      72

        .text
        .globl _start, case_target_with_endbr, case_target_without_endbr
        .globl call_site, after_call, user_hlt, pf_fixup, target_endbr, target_noendbr

_start:
case_target_with_endbr:
        endbr64
        lea target_endbr(%rip), %r12
        jmp setup
case_target_without_endbr:
        endbr64
        lea target_noendbr(%rip), %r12

/* ring 0: IDT[14] = pf_fixup, target page not present, then ring 3 at user_caller (R12 = target) */
setup:
        lea pf_fixup(%rip), %rax       /* below 4 GiB: the gate's offset 63:32 is 0 */
        mov %rax, %rdx
        and $0xFFFF, %edx
        or $(KERNEL_CS << 16), %rdx
        mov $0x8E, %ecx                /* present, DPL 0, 64-bit interrupt gate */
        shl $40, %rcx
        or %rcx, %rdx
        mov %rax, %rcx
        shr $16, %rcx
        and $0xFFFF, %ecx
        shl $48, %rcx
        or %rcx, %rdx
        mov $(IDT_ADDR + 14 * 16), %rax
        mov %rdx, (%rax)
        movq $0, 8(%rax)
        mov %r12, %rax
        shr $12, %rax
        andq $~1, FIRST_PT(,%rax,8)    /* clear P of the target page */
        invlpg (%r12)
        lea user_caller(%rip), %rdi
        pushq $USER_DS
        pushq $USTACK_TOP
        pushq $0x202
        pushq $USER_CS
        push %rdi
        iretq

user_caller:
        endbr64
        mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST+G_SSP_BEFORE(%rbx)
        mov %r12, %rax
call_site:
        call *%rax                     /* target fetch → #PF before the target block starts */
after_call:
        movq $1, R_GUEST+G_RETURNED(%rbx)
        rdsspq %rax
        mov %rax, R_GUEST+G_SSP_AFTER(%rbx)
user_hlt:
        hlt                            /* #GP at CPL 3: the common handler records it and halts */

pf_fixup:
        endbr64
        push %rax
        push %rcx
        push %rdx
        push %rbx
        mov $RESULTS_ADDR, %rbx
        incq R_GUEST+G_PF_COUNT(%rbx)
        cmpq $1, R_GUEST+G_PF_COUNT(%rbx)
        jne pf_again                   /* only the target fetch may fault: stop, do not loop */
        mov %cr2, %rax
        mov %rax, R_GUEST+G_PF_CR2(%rbx)
        mov 32(%rsp), %rax             /* error code */
        mov %rax, R_GUEST+G_PF_ERROR(%rbx)
        mov 40(%rsp), %rax             /* RIP */
        mov %rax, R_GUEST+G_PF_RIP(%rbx)
        mov $0x6A7, %ecx               /* IA32_PL3_SSP: the user SSP saved by the event */
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, R_GUEST+G_PF_PL3_SSP(%rbx)
        mov (%rax), %rax               /* top of the user shadow stack */
        mov %rax, R_GUEST+G_PF_SS_TOP(%rbx)
        mov $0x6A0, %ecx               /* IA32_U_CET */
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, R_GUEST+G_PF_U_CET(%rbx)
        mov R_GUEST+G_PF_CR2(%rbx), %rax
        mov %rax, %rcx
        shr $12, %rcx
        orq $1, FIRST_PT(,%rcx,8)      /* map the target page */
        invlpg (%rax)
        pop %rbx
        pop %rdx
        pop %rcx
        pop %rax
        add $8, %rsp                   /* error code */
        iretq
pf_again:
        hlt
        jmp pf_again

/* the target page: not present until pf_fixup maps it */
        .balign 4096
target_endbr:
        endbr64
        ret
target_noendbr:
        nop                            /* no ENDBR64: #CP(ENDBRANCH) once the guest gets here */
        ret
        .balign 4096
