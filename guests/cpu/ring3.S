/* Ring 3 → ring 0 events with shadow-stack switching (PL0_SSP and the interrupt SSP table),
 * IRETQ back to ring 3, and SYSCALL/SYSRET with PL3_SSP. */
#include "common.S"

        .text
        .globl _start, case_user_events, case_syscall, user_code, user_syscall, syscall_entry, user_hlt
        .globl case_user_store_supervisor, user_store, user_store_site
        .globl case_user_call_store, user_call_store, store_fn_site, case_iret_bad_cs, bad_iret

/* enter ring 3 at %rdi through IRETQ */
to_user:
        pushq $USER_DS
        pushq $USTACK_TOP
        pushq $0x202
        pushq $USER_CS
        push %rdi
        iretq

_start:
case_user_events:
        endbr64
        lea user_code(%rip), %rdi
        jmp to_user

case_syscall:
        endbr64
        lea syscall_entry(%rip), %rax
        mov %rax, %rdx
        shr $32, %rdx
        mov $0xC0000082, %ecx          /* LSTAR */
        wrmsr
        mov $0xC0000084, %ecx          /* FMASK: clear IF */
        mov $0x200, %eax
        xor %edx, %edx
        wrmsr
        lea user_syscall(%rip), %rdi
        jmp to_user

user_code:
        endbr64
        mov $RESULTS_ADDR, %rbx
        call ufunc                     /* user shadow stack in use */
        rdsspq %rax
        mov %rax, R_GUEST(%rbx)        /* user SSP before the events */
        int3                           /* → ring 0 on PL0_SSP, IRETQ back */
        rdsspq %rax
        mov %rax, R_GUEST+8(%rbx)
        int $0x80                      /* → ring 0 through IST1 / ISST[1], IRETQ back */
        rdsspq %rax
        mov %rax, R_GUEST+16(%rbx)
        call ufunc
user_hlt:
        hlt                            /* #GP at CPL 3 → ring 0 on PL0_SSP again, halt */
ufunc:
        endbr64
        ret

user_syscall:
        endbr64
        mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST(%rbx)
        syscall
        rdsspq %rax
        mov %rax, R_GUEST+24(%rbx)
        call ufunc
        hlt

syscall_entry:
        endbr64                        /* SYSCALL arms the supervisor IBT tracker */
        mov $RESULTS_ADDR, %rbx
        rdsspq %rax
        mov %rax, R_GUEST+8(%rbx)      /* SSP = 0 after SYSCALL */
        setssbsy
        rdsspq %rax
        mov %rax, R_GUEST+16(%rbx)     /* = PL0_SSP */
        mov $(SSTK_KERNEL2+0xFF8), %rax
        clrssbsy (%rax)
        sysretq

case_user_store_supervisor:
        endbr64
        mov $SUPERVISOR_PAGE, %rax
        movq $5, (%rax)                /* fine at CPL 0 */
        lea user_store(%rip), %rdi
        jmp to_user
user_store:
        endbr64
        mov $SUPERVISOR_PAGE, %rax
user_store_site:
        movq $1, (%rax)
        hlt

case_user_call_store:
        endbr64
        lea user_call_store(%rip), %rdi
        jmp to_user
user_call_store:
        endbr64
        mov $SUPERVISOR_PAGE, %rdi
        lea store_fn(%rip), %rax
        call *%rax
        hlt
store_fn:
        endbr64
store_fn_site:
        movq $1, (%rdi)
        ret

/* IRETQ with CS RPL 3 naming the DPL 0 code descriptor: #GP(selector) */
case_iret_bad_cs:
        endbr64
        lea user_code(%rip), %rdi
        pushq $USER_DS
        pushq $USTACK_TOP
        pushq $0x202
        pushq $(KERNEL_CS | 3)
        push %rdi
bad_iret:
        iretq
