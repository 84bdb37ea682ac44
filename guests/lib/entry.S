/*
 * entry.S - trap entry, SYSCALL entry, SSP-aware setjmp/longjmp, CET enable and ring-3 entry.
 *
 * How SSP stays consistent when we resume somewhere other than the faulting instruction:
 *
 *  - Kernel (CPL0) faults are delivered without IST on the current shadow stack (same
 *    privilege: no token check, a 24-byte frame CS/LIP/SSP is pushed [SDM Vol. 1 ch. 18]).  Recovery is
 *    cet_longjmp(): it INCSSPs the shadow stack back up to the SSP recorded by cet_setjmp()
 *    (discarding the handler's return addresses and the event frame), restores RSP and the
 *    callee-saved registers and jumps to the setjmp return point (GCC puts an ENDBR64 after
 *    calls to returns_twice functions, so the indirect JMP is IBT-clean).
 *
 *  - Ring 3 uses a separate supervisor shadow stack K: PL0_SSP = K's supervisor token
 *    (K_top-8); K_top-16 holds a restore token.  run_user_enter() switches M (the main kernel
 *    shadow stack) -> K with RSTORSSP K_top-16 + SAVEPREVSSP, which leaves a restore token on M
 *    at the current SSP-8 and SSP = K_top-8, then IRETQ to CPL3 (SSP = PL3_SSP; the busy bit of
 *    the token at the old SSP is cleared, so K's token is free while at CPL3).  An event or
 *    SYSCALL (+SETSSBSY) from CPL3 marks K's token busy and runs the handler on K.
 *    user_return_to_kernel() INCSSPs K back to its token, RSTORSSPs M's restore token and
 *    SAVEPREVSSPs, which writes a fresh restore token at K_top-16 for the next entry and lands
 *    on M exactly where run_user_enter() left it; then it returns to run_user_enter's caller.
 *    K's token stays busy until the next IRETQ to CPL3 frees it.
 */
#include "gnuprop.h"

/* CALL_TRAP: with vector and error code pushed below the hardware (or SYSCALL-built) frame, save
 * the GPRs and the handler-entry SSP as a struct trap_frame, call trap(frame), restore the GPRs
 * and drop vector and error code; the caller then returns with IRETQ or SYSRETQ. */
    .macro CALL_TRAP
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    xor %eax, %eax
    rdsspq %rax                      /* handler-entry SSP (0 if shadow stacks are off) */
    push %rax                        /* trap_frame.pad */
    push %rax                        /* trap_frame.entry_ssp */
    cld
    mov %rsp, %rdi
    call trap
    add $16, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    .endm

/* INCSSP_RCX: discard %rcx shadow-stack entries (INCSSPQ takes at most 255 at a time, it uses
 * only the low 8 bits of its operand) [SDM Vol. 1 ch. 18 INCSSP]; clobbers %rdx, leaves %rcx = 0. */
    .macro INCSSP_RCX
1:  test %rcx, %rcx
    jz 9f
    mov $255, %edx
    cmp %rdx, %rcx
    cmovb %rcx, %rdx
    incsspq %rdx
    sub %rdx, %rcx
    jmp 1b
9:
    .endm

/* ---------------- IDT stubs: 256 x 16 bytes, each starting with ENDBR64 ---------------- */
    .text
    .p2align 4
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .p2align 4
    endbr64
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    CALL_TRAP
    iretq

/* ---------------- SYSCALL entry (LSTAR) ----------------
 * SYSCALL: PL3_SSP = SSP (user shadow stacks on), SSP = 0 (S_CET.SH_STK_EN), supervisor IBT
 * tracker = WAIT (hence ENDBR64).  We take RSP0, SETSSBSY (SSP = PL0_SSP = K's token, busy),
 * build a trap_frame with vector 256 and return with CLRSSBSY (SSP = 0) + SYSRETQ
 * (SSP = PL3_SSP) [SDM Vol. 1 ch. 18 SYSCALL/SYSRET, SETSSBSY, CLRSSBSY]. */
    .globl syscall_entry
    .p2align 4
syscall_entry:
    endbr64
    mov %rsp, syscall_user_rsp(%rip)
    mov kernel_rsp0(%rip), %rsp
    cmpb $0, cet(%rip)               /* cet.shstk */
    je 1f
    setssbsy
1:  pushq $0x23                      /* ss */
    pushq syscall_user_rsp(%rip)     /* rsp */
    push %r11                        /* rflags */
    pushq $0x2B                      /* cs */
    push %rcx                        /* rip */
    pushq $0                         /* error */
    pushq $256                       /* vector: SYSCALL */
    CALL_TRAP
    mov 0(%rsp), %rcx                /* user rip */
    mov 16(%rsp), %r11               /* user rflags */
    cmpb $0, cet(%rip)
    je 2f
    push %rax
    rdsspq %rax                      /* == K's token (busy) */
    clrssbsy (%rax)
    pop %rax
2:  mov 24(%rsp), %rsp
    sysretq

/* ---------------- cet_setjmp / cet_longjmp ----------------
 * struct jmp_ctx { rbx, rbp, r12, r13, r14, r15, rsp, rip, ssp } */
    .globl cet_setjmp
    .type cet_setjmp, @function
cet_setjmp:
    endbr64
    mov %rbx, 0(%rdi)
    mov %rbp, 8(%rdi)
    mov %r12, 16(%rdi)
    mov %r13, 24(%rdi)
    mov %r14, 32(%rdi)
    mov %r15, 40(%rdi)
    lea 8(%rsp), %rax
    mov %rax, 48(%rdi)               /* rsp after our return */
    mov (%rsp), %rax
    mov %rax, 56(%rdi)               /* return address */
    xor %eax, %eax
    rdsspq %rax                      /* 0 if shadow stacks are off */
    test %rax, %rax
    jz 1f
    add $8, %rax                     /* SSP after our return */
1:  mov %rax, 64(%rdi)
    xor %eax, %eax
    ret

    .globl cet_longjmp
    .type cet_longjmp, @function
cet_longjmp:
    endbr64
    mov %esi, %r8d
    mov 64(%rdi), %rcx               /* target SSP */
    test %rcx, %rcx
    jz 3f
    xor %eax, %eax
    rdsspq %rax
    test %rax, %rax                  /* shadow stacks off now: INCSSP would #UD */
    jz 3f
    sub %rax, %rcx
    shr $3, %rcx                     /* entries to discard */
    INCSSP_RCX
3:  mov 0(%rdi), %rbx
    mov 8(%rdi), %rbp
    mov 16(%rdi), %r12
    mov 24(%rdi), %r13
    mov 32(%rdi), %r14
    mov 40(%rdi), %r15
    mov 48(%rdi), %rsp
    mov %r8d, %eax
    test %eax, %eax
    jnz 4f
    inc %eax
4:  jmp *56(%rdi)

/* ---------------- cet_enable_and_call(s_cet, fn, shstk) ----------------
 * S_CET = s_cet; CR4.CET = 1; if shstk: SETSSBSY (SSP = PL0_SSP, token busy); call fn.
 * No RET may execute between CR4.CET and SETSSBSY (SSP is 0 there). */
    .globl cet_enable_and_call
    .type cet_enable_and_call, @function
cet_enable_and_call:
    endbr64
    mov %rsi, %r12
    mov %edx, %r13d
    mov $0x6A2, %ecx
    mov %rdi, %rax
    mov %rdi, %rdx
    shr $32, %rdx
    wrmsr
    mov %cr4, %rax
    or $0x800000, %rax
    mov %rax, %cr4
    test %r13d, %r13d
    jz 1f
    setssbsy
1:  and $-16, %rsp
    call *%r12
    mov $1, %edi
    call exit_qemu

/* ---------------- run_user_enter(struct user_ctx *) ----------------
 * struct user_ctx { krsp 0, m_restore 8, k_restore 16, k_token 24, rip 32, rsp 40, arg 48,
 *                   kshstk 56 (byte), fn 64, cs 72, rflags 80 }: IRETQ to cs:rip with RDI = fn, RSI = arg. */
    .globl run_user_enter
    .type run_user_enter, @function
run_user_enter:
    endbr64
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, 0(%rdi)
    cmpb $0, 56(%rdi)
    je 1f
    rdsspq %rax                      /* s_M: top entry is our return address */
    sub $8, %rax
    mov %rax, 8(%rdi)                /* SAVEPREVSSP will put M's restore token here */
    mov 16(%rdi), %rax
    rstorssp (%rax)                  /* SSP = K_top-16 */
    saveprevssp                      /* restore token on M; SSP = K_top-8 (K's supervisor token) */
1:  pushq $0x23                      /* ss */
    pushq 40(%rdi)                   /* rsp */
    pushq 80(%rdi)                   /* rflags: IF = 0, or 1 with opts->interrupts */
    pushq 72(%rdi)                   /* cs: 64-bit or 32-bit (compatibility mode) user code */
    pushq 32(%rdi)                   /* rip */
    mov 48(%rdi), %rsi
    mov 64(%rdi), %rdi
    xor %eax, %eax
    xor %ebx, %ebx
    xor %ecx, %ecx
    xor %edx, %edx
    xor %ebp, %ebp
    xor %r8d, %r8d
    xor %r9d, %r9d
    xor %r10d, %r10d
    xor %r11d, %r11d
    xor %r12d, %r12d
    xor %r13d, %r13d
    xor %r14d, %r14d
    xor %r15d, %r15d
    iretq

/* user_return_to_kernel(struct user_ctx *ctx, u64 value): called from trap() on K. */
    .globl user_return_to_kernel
    .type user_return_to_kernel, @function
user_return_to_kernel:
    endbr64
    mov %rsi, %r8
    cmpb $0, 56(%rdi)
    je 3f
    xor %eax, %eax
    rdsspq %rax
    mov 24(%rdi), %rcx               /* K's token address */
    sub %rax, %rcx
    shr $3, %rcx
    INCSSP_RCX
    mov 8(%rdi), %rax
    rstorssp (%rax)                  /* back on M (previous-ssp token = K_top-8) */
    saveprevssp                      /* restore token at K_top-16; SSP = s_M */
3:  mov 0(%rdi), %rsp
    mov %r8, %rax
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    ret

/* ---------------- indirect-branch helpers for IBT tests ----------------
 * call_indirect(fn): CALL *%rdi (tracked).  call_notrack(fn): NOTRACK CALL *%rdi. */
    .text
    .globl call_indirect, call_notrack
    .type call_indirect, @function
call_indirect:
    endbr64
    call *%rdi
    ret
    .type call_notrack, @function
call_notrack:
    endbr64
    notrack call *%rdi
    ret

    .section .utext, "ax"
    .globl user_call_indirect
    .type user_call_indirect, @function
user_call_indirect:
    endbr64
    call *%rdi
    ret

/* ---------------- ring-3 start trampoline (user page) ----------------
 * user_start(fn, arg): fn(arg), then sys_exit(0).  A real CALL so the user shadow stack and
 * the data stack agree when fn returns. */
    .section .utext, "ax"
    .globl user_start
    .type user_start, @function
user_start:
    endbr64
    mov %rdi, %rax
    mov %rsi, %rdi
    and $-16, %rsp
    call *%rax
    xor %edi, %edi
    mov $60, %eax
    syscall
    ud2
