/* IA32_XSS and XCR0 writes change CPUID.(0xD,0/1).EBX; invalid values #GP. */
#include "kvm_guest.h"
    .globl main
.macro CPUID_EBX leaf, sub, n
    mov $\leaf, %eax
    mov $\sub, %ecx
    cpuid
    mov %rbx, SLOT(\n)
.endm
main:
    mov %cr4, %rax
    or $(1 << 18), %rax                 /* CR4.OSXSAVE */
    mov %rax, %cr4
    CPUID_EBX 0xd, 1, 0
    WRMSR_IMM 0xDA0, 0x1800             /* XSS = CET_U | CET_S */
    CPUID_EBX 0xd, 1, 1
    WRMSR_IMM 0xDA0, 0x100              /* PT: not supported by KVM: #GP */
    RDMSR_SLOT 0xDA0, 2
    xor %ecx, %ecx
    mov $7, %eax                        /* XCR0 = x87 | SSE | AVX */
    xor %edx, %edx
    TRY xsetbv
    CPUID_EBX 0xd, 0, 3
    CPUID_EBX 0xd, 1, 4
    xor %ecx, %ecx
    mov $5, %eax                        /* AVX without SSE: #GP */
    xor %edx, %edx
    TRY xsetbv
    mov $1, %eax
    cpuid
    mov %rcx, SLOT(5)                   /* OSXSAVE (bit 27) mirrors CR4 */
    hlt
