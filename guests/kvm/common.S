/* Entry and exception stubs shared by every kvm_api guest (placed first by the Makefile). */
#include "kvm_guest.h"
    .text
    .code64
    .globl _start
_start:                     /* offset 0x00 */
    jmp main
    .org 0x40
isr_ud:                     /* offset 0x40: vector 6, no error code */
    push $0
    push %rax
    mov $6, %eax
    jmp record
    .org 0x80
isr_gp:                     /* offset 0x80: vector 13 */
    push %rax
    mov $13, %eax
    jmp record
    .org 0xc0
isr_pf:                     /* offset 0xc0: vector 14 */
    push %rax
    mov $14, %eax
    jmp record
    .org 0x100
isr_cp:                     /* offset 0x100: vector 21 */
    push %rax
    mov $21, %eax
    jmp record
    .org 0x140
/* stack: rax, error code, rip, cs, rflags, rsp, ss */
record:
    push %rbx
    mov LOG_COUNT, %rbx
    shl $5, %rbx
    add $LOG_BASE, %rbx
    mov %rax, (%rbx)
    mov 16(%rsp), %rax
    mov %rax, 8(%rbx)
    mov 24(%rsp), %rax
    mov %rax, 16(%rbx)
    incq LOG_COUNT
    mov RECOVER, %rax
    mov %rax, 24(%rsp)
    pop %rbx
    pop %rax
    add $8, %rsp
    iretq
