/* A boot sector that starts a multiboot v1 kernel (a.out kludge) under a PC BIOS, for Bochs,
 * which has no multiboot loader (benchmarks/bench_boot.py builds the disk image):
 *
 *   LBA 0     this sector
 *   LBA 1     the info sector: a multiboot information structure at offset 0 (flags, memory,
 *             cmdline pointer), the command line at 0x100, and at PARAMS (0x80) the loader's
 *             parameters: sectors of the image, load_addr, load size, bss_end_addr, entry_addr
 *   LBA 2...  the kernel's load image (multiboot header's load_addr .. load_end_addr)
 *
 * It reads the info sector to INFO (0x10000) and the image behind it (BIOS INT 13h, AH=42h),
 * enables A20, enters 32-bit protected mode with flat segments, copies the image to load_addr,
 * zeroes up to bss_end_addr and jumps to entry_addr with EAX = 0x2BADB002, EBX = INFO: the
 * machine state multiboot v1 specifies. */
#define INFO 0x10000
#define IMAGE (INFO + 0x200)
#define PARAMS 0x80
#define CHUNK 64 /* sectors a read (32 KiB) */

        .code16
        .text
        .globl _start
_start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7C00, %sp
        mov %dl, drive
        /* the info sector */
        movw $1, dap_count
        movw $(INFO >> 4), dap_seg
        movl $1, dap_lba
        call read
        /* the image: PARAMS+0 sectors from LBA 2 */
        mov $(INFO >> 4), %ax
        mov %ax, %fs
        mov %fs:PARAMS, %cx
        movl $2, dap_lba
        movw $(IMAGE >> 4), dap_seg
1:      test %cx, %cx
        jz 2f
        mov %cx, %ax
        cmp $CHUNK, %ax
        jbe 3f
        mov $CHUNK, %ax
3:      mov %ax, dap_count
        sub %ax, %cx
        push %ax
        call read
        pop %ax
        movzx %ax, %eax
        addl %eax, dap_lba
        shl $5, %ax                     /* sectors * 512 / 16 */
        addw %ax, dap_seg
        jmp 1b
2:      in $0x92, %al                   /* A20 */
        or $2, %al
        and $0xFE, %al
        out %al, $0x92
        lgdtl gdt_desc
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $0x08, $pm32

read:   mov $dap, %si
        mov drive, %dl
        mov $0x42, %ah
        int $0x13
        jc fail
        ret
fail:   hlt
        jmp fail

        .code32
pm32:   mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7C00, %esp
        mov $IMAGE, %esi
        mov INFO + PARAMS + 4, %edi     /* load_addr */
        mov INFO + PARAMS + 8, %ecx     /* load size */
        cld
        rep movsb
        mov INFO + PARAMS + 12, %ecx    /* bss_end_addr */
        sub %edi, %ecx
        jbe 4f
        xor %eax, %eax
        rep stosb
4:      mov INFO + PARAMS + 16, %edx    /* entry_addr */
        mov $0x2BADB002, %eax
        mov $INFO, %ebx
        jmp *%edx

        .p2align 3
gdt:    .quad 0
        .quad 0x00CF9A000000FFFF        /* 0x08: flat 32-bit code */
        .quad 0x00CF92000000FFFF        /* 0x10: flat data */
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
drive:  .byte 0
        .p2align 2
dap:    .byte 0x10, 0
dap_count: .word 0
dap_off:   .word 0
dap_seg:   .word 0
dap_lba:   .quad 0

        .org 510
        .byte 0x55, 0xAA
