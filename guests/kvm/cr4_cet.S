/* CR4.CET needs CR0.WP, CR0.WP cannot be cleared under CR4.CET; CR4.CET needs guest CET. */
#include "kvm_guest.h"
    .globl main
main:
    mov %cr0, %rax
    and $~(1 << 16), %rax
    TRY mov %rax, %cr0                  /* clear WP (CET off): fine */
    mov %cr4, %rax
    or $(1 << 23), %rax
    TRY mov %rax, %cr4                  /* CET without WP: #GP */
    mov %cr4, %rax
    mov %rax, SLOT(0)
    mov %cr0, %rax
    or $(1 << 16), %rax
    TRY mov %rax, %cr0                  /* WP back */
    mov %cr4, %rax
    or $(1 << 23), %rax
    TRY mov %rax, %cr4                  /* fine with guest CET, #GP without */
    mov %cr4, %rax
    mov %rax, SLOT(1)
    mov %cr0, %rax
    and $~(1 << 16), %rax
    TRY mov %rax, %cr0                  /* clear WP under CET: #GP */
    mov %cr0, %rax
    mov %rax, SLOT(2)
    hlt
