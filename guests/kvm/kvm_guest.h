/* Shared layout and macros for the cetvm.kvm API test guests (flat binaries at 1 MiB).
 * The test harness (tests/kvm_api/conftest.py) builds page tables, GDT and IDT and points
 * vectors 6, 13, 14 and 21 at the stubs at fixed offsets of common.S.
 * Log at 0x200000: [count], then 32-byte entries {vector, error code, RIP, 0}.
 * Value slots at 0x201000 + 8*n. RECOVER (0x200ff8): where a faulting instruction resumes. */
#define LOG_COUNT 0x200000
#define LOG_BASE  0x200008
#define RECOVER   0x200ff8
#define SLOT(n)   (0x201000 + 8 * (n))

/* Run one instruction that may fault; execution continues at the next line either way. */
.macro TRY insn:vararg
    lea 9f(%rip), %r15
    mov %r15, RECOVER
    \insn
9:
.endm

.macro WRMSR_IMM msr, value
    mov $\msr, %ecx
    mov $\value, %rax
    mov %rax, %rdx
    shr $32, %rdx
    TRY wrmsr
.endm

/* RDMSR into slot n (slot untouched if it faults). */
.macro RDMSR_SLOT msr, n
    mov $\msr, %ecx
    mov $0xdeadbeef, %eax
    xor %edx, %edx
    TRY rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, SLOT(\n)
.endm
