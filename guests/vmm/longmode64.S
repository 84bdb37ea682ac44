/* Plain ELF64 kernel (no multiboot header): entered in 64-bit mode by cetvm's ELF64 protocol.
   Checks RSI = magic, RDI = RBX = info, uses the stack, echoes the command line, exits 0x22. */
    .text
    .code64
    .globl _start64
_start64:
    movabsq $0x2BADB002, %rax
    cmpq %rax, %rsi
    jne fail
    cmpq %rdi, %rbx
    jne fail
    movl 16(%rdi), %esi
    call puts
    movabsq $0xFEE00030, %rax   /* identity map covers the APIC window */
    movq %rax, %rcx
    movl $0x22, %eax
    outb %al, $0xF4
    hlt
fail:
    movl $0x7F, %eax
    outb %al, $0xF4
    hlt
#include "puts64.S"
