/* A minimal bzImage of our own for the Linux boot protocol loader (tests/vmm/test_vmm_linux_boot.py):
   a real-mode part of 2 sectors carrying the setup header, then a protected-mode "kernel" whose
   64-bit entry (load address + 0x200) checks what the 64-bit boot protocol promises:
     CS = __BOOT_CS (0x10), DS = ES = SS = __BOOT_DS (0x18), IF = 0, CR0.PG = 1, EFER.LMA = 1;
     RSI = the zero page: "HdrS" at 0x202, type_of_loader 0xFF, code32_start = the load address,
     the command line at cmd_line_ptr, the initrd at ramdisk_image (its first 8 bytes "INITRD!!",
     ramdisk_size bytes), an E820 map whose 4th entry is RAM from 1 MiB.
   It prints the command line and one line per check on COM1, then exits through isa-debug-exit
   with 0x10 (all passed) or 0x40 + the number of the failed check. */
#define LOAD_ADDR 0x1000000
    .code16
    .section .bz, "ax"
    .org 0x1F1
setup_sects:    .byte 1               /* 1 setup sector after the boot sector: setup = 1024 bytes */
root_flags:     .word 0
syssize:        .long 0
ram_size:       .word 0
vid_mode:       .word 0
root_dev:       .word 0
boot_flag:      .word 0xAA55
jump:           .byte 0xEB, hdr_end - hdr_start
hdr_start:      .ascii "HdrS"
version:        .word 0x020F
realmode_swtch: .long 0
start_sys_seg:  .word 0
kernel_version: .word 0
type_of_loader: .byte 0
loadflags:      .byte 1               /* LOADED_HIGH */
setup_move_size: .word 0
code32_start:   .long LOAD_ADDR
ramdisk_image:  .long 0
ramdisk_size:   .long 0
bootsect_kludge: .long 0
heap_end_ptr:   .word 0
ext_loader_ver: .byte 0
ext_loader_type: .byte 0
cmd_line_ptr:   .long 0
initrd_addr_max: .long 0x7FFFFFFF
kernel_alignment: .long 0x200000
relocatable_kernel: .byte 0
min_alignment:  .byte 21
xloadflags:     .word 3               /* XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G */
cmdline_size:   .long 2047
hardware_subarch: .long 0
hardware_subarch_data: .quad 0
payload_offset: .long 0
payload_length: .long 0
setup_data:     .quad 0
pref_address:   .quad LOAD_ADDR
init_size:      .long 0x100000
handover_offset: .long 0
kernel_info_offset: .long 0
hdr_end:
    .org 0x400                        /* end of setup: the protected-mode kernel starts here */

    .code64
kernel:
    .org 0x600                        /* startup_64 = load address + 0x200 */
startup_64:
    movq %rsi, %rbp                   /* the zero page */
    movl $0x9E000, %esp
    movl $1, %r12d
    movw %cs, %ax
    cmpw $0x10, %ax
    jne fail
    incl %r12d                        /* 2 */
    movw %ds, %ax
    cmpw $0x18, %ax
    jne fail
    movw %ss, %ax
    cmpw $0x18, %ax
    jne fail
    movw %es, %ax
    cmpw $0x18, %ax
    jne fail
    incl %r12d                        /* 3 */
    pushfq
    popq %rax
    testl $0x200, %eax
    jnz fail
    incl %r12d                        /* 4 */
    cmpl $0x53726448, 0x202(%rbp)     /* "HdrS" */
    jne fail
    cmpb $0xFF, 0x210(%rbp)
    jne fail
    incl %r12d                        /* 5 */
    cmpl $LOAD_ADDR, 0x214(%rbp)
    jne fail
    incl %r12d                        /* 6 */
    movl 0x218(%rbp), %esi            /* ramdisk_image */
    testl %esi, %esi
    jz fail
    movabsq $0x2121445254494E49, %rax /* "INITRD!!" */
    cmpq %rax, (%rsi)
    jne fail
    movl 0x21C(%rbp), %ecx            /* ramdisk_size: the last byte is '$' */
    cmpb $0x24, -1(%rsi,%rcx)
    jne fail
    incl %r12d                        /* 7 */
    cmpb $4, 0x1E8(%rbp)              /* e820_entries */
    jb fail
    cmpq $0x100000, 0x2D0 + 3*20(%rbp)
    jne fail
    cmpl $1, 0x2D0 + 3*20 + 16(%rbp)
    jne fail
    movl 0x228(%rbp), %esi            /* cmd_line_ptr */
    call puts
    movl $0x10, %eax
    outb %al, $0xF4
    hlt
fail:
    movl %r12d, %eax
    addl $0x40, %eax
    outb %al, $0xF4
    hlt
#include "puts64.S"
    .org 0x800
