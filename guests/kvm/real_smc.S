/* Self-modifying code with paging off (entered at 0x1000 in real-address mode with CS = DS =
 * SS = 0, by tests/kvm_api/test_kvm_api_real_mode.py), the way kvm-unit-tests' realmode runs
 * each of its tests: a byte loop copies a snippet over a buffer in the page it runs from, toggles
 * CR0.PE on and off, and calls the buffer; then again with another snippet over the same bytes.
 * The engine must see the stores to code it has translated and run the new snippet. Results at
 * RESULTS (words): 0x1111 from the first snippet, 0x1234 from the second; then HLT. */
#include "real_guest.h"
    .globl _start
_start:
    REAL_MODE_START 0x1F00    /* the stack in the code's page, as the harness's */
    mov $snippet1, %si
    mov $snippet1_end - snippet1, %cx
    call load_and_run
    mov %ax, RESULTS
    mov $snippet2, %si
    mov $snippet2_end - snippet2, %cx
    call load_and_run
    mov %ax, RESULTS + 2
    hlt

/* copy CX bytes from SI over buf (NOP-filled to its end), toggle CR0.PE, call buf */
load_and_run:
    mov $buf, %di
    mov $32, %dx
1:  movb (%si), %al
    movb %al, (%di)
    inc %si
    inc %di
    dec %dx
    dec %cx
    jnz 1b
2:  movb $0x90, (%di)
    inc %di
    dec %dx
    jnz 2b
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    andl $-2, %eax
    movl %eax, %cr0
    xor %eax, %eax
    call buf
    ret

buf:
    .fill 32, 1, 0x90
    ret

snippet1:
    mov $0x1111, %ax
snippet1_end:
snippet2:
    jmp 2f
1:  movl $0x1234, %eax
    retl
2:  calll 1b
snippet2_end:
