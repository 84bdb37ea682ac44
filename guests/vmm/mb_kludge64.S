/* ELF64 file carrying a multiboot header with the a.out kludge: the loader must use the header
   fields, not the (64-bit) program headers. The entry is 32-bit code. */
    .section .multiboot, "a"
    .align 4
mb_header:
    .long 0x1BADB002
    .long 0x00010003
    .long -(0x1BADB002 + 0x00010003)
    .long mb_header
    .long _load_start
    .long _load_end
    .long _bss_end
    .long _start32
#include "mb_common32.S"
