/* Real-address-mode events and IRET (entered at 0x1000 with CS = DS = SS = 0, by
 * tests/kvm_api/test_kvm_api_real_mode.py; not linked with common.S):
 *  - INT 21h through the IVT: the handler runs with IF clear and returns with IRET (FLAGS, CS,
 *    IP popped), BX = 0x1234 on return, IF set again;
 *  - #DE (DIV by zero) through IVT entry 0: the pushed IP is the DIV's, no error code; the
 *    handler skips the 2-byte DIV;
 *  - IRETD with a doubleword frame: EIP, CS and EFLAGS (AND 257FD5H) popped.
 * Results at RESULTS (words), then HLT. */
#include "real_guest.h"
    .globl _start
_start:
    REAL_MODE_START 0x8000
    movw $handler21, 0x21 * 4
    movw $0, 0x21 * 4 + 2
    movw $handler_de, 0
    movw $0, 2
    sti
    int $0x21
    mov %bx, RESULTS          /* 0x1234 from the handler */
    pushf
    pop %ax
    mov %ax, RESULTS + 2      /* FLAGS after IRET: IF set again */
    mov $5, %ax
    xor %cl, %cl
    .globl div_insn
div_insn:
    div %cl                   /* #DE: IP pushed = div_insn */
    mov %dx, RESULTS + 4      /* the pushed IP the handler saw */
    pushl $0x00000202         /* EFLAGS: IF */
    pushl $0                  /* CS */
    pushl $after_iretd
    iretl
after_iretd:
    movw $0x5a5a, RESULTS + 6
    mov %sp, RESULTS + 8      /* 0x8000 again */
    hlt

handler21:
    pushf
    pop %ax
    mov %ax, RESULTS + 10     /* FLAGS in the handler: IF clear */
    mov $0x1234, %bx
    iret

handler_de:
    push %bp
    mov %sp, %bp
    mov 2(%bp), %dx           /* the pushed IP */
    addw $2, 2(%bp)           /* skip the DIV */
    pop %bp
    iret
