/* Real-address-mode guests of tests/kvm_api (real_*.S): entered at 0x1000 with CS = 0 after a
 * vCPU's RESET; each starts with REAL_MODE_START (interrupts off, DS = ES = SS = 0, SP given)
 * and leaves its results as words at RESULTS. */
    .code16
    .set RESULTS, 0x3000

.macro REAL_MODE_START sp
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $\sp, %sp
.endm
