/* 32-bit multiboot test kernel body: check the boot state, echo the command line and the
   module count to COM1, then exit through isa-debug-exit with 0x21 (status 0x43). */
    .text
    .code32
    .globl _start32
_start32:
    cmpl $0x2BADB002, %eax
    jne fail
    cmpl $0, bss_word           /* the loader must have zeroed the bss */
    jne fail
    movl 16(%ebx), %esi         /* multiboot info: cmdline */
    call puts
    movl $msg, %esi             /* from .data */
    call puts
    movl 20(%ebx), %eax         /* mods_count as one digit */
    addb $'0', %al
    movw $0x3F8, %dx
    outb %al, %dx
    movl $0x21, %eax
    outb %al, $0xF4
    hlt
fail:
    movl $0x7F, %eax
    outb %al, $0xF4
    hlt
puts:
    movw $0x3F8, %dx
1:  movb (%esi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incl %esi
    jmp 1b
2:  ret

    .data
msg: .asciz "|data|"
    .bss
    .align 4
bss_word: .skip 4
    .skip 8192
