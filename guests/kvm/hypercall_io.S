/* VMCALL handled by KVM (-KVM_ENOSYS) or exiting to the VMM; port I/O completed by the VMM. */
#include "kvm_guest.h"
    .globl main
main:
    mov $99, %eax
    vmcall
    mov %rax, SLOT(0)
    mov $12, %eax
    mov $0x1111, %ebx
    mov $0x2222, %ecx
    mov $0x3333, %edx
    mov $0x4444, %esi
    vmcall
    mov %rax, SLOT(1)
    mov $0x42, %al
    out %al, $0x80
    in $0x81, %al
    movzbq %al, %rax
    mov %rax, SLOT(2)
    hlt
