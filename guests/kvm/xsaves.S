/* XSAVES in the guest: CR4.OSXSAVE on, XSAVES of x87 state into a 64-byte aligned area at
 * 0x202000 (SLOT(0) = 1 once it retired); whether it is #UD depends on the VMCS's "enable
 * XSAVES/XRSTORS", which KVM sets only when the guest CPUID has XSAVES. */
#include "kvm_guest.h"
    .globl main
main:
    mov %cr4, %rax
    or $(1 << 18), %rax                 /* CR4.OSXSAVE */
    mov %rax, %cr4
    mov $0x202000, %rdi
    mov $1, %eax                        /* RFBM = x87 */
    xor %edx, %edx
    TRY xsaves64 (%rdi)
    movq $1, SLOT(0)
    hlt
