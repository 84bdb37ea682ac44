/* Multiboot v1 ELF32 kernel: no a.out kludge, loaded by program headers. */
    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)
#include "mb_common32.S"
