/* ap_trampoline: an AP started in real mode at a nonzero CS.base runs a trampoline shaped like
 *  Linux's real-mode AP trampoline (trampoline_start) to 64-bit mode, under `cetvm boot --smp 2`.
 *  The BSP copies the code below to TRAMP_PHYS and sends INIT + SIPI with vector TRAMP_VECTOR:
 *  the AP starts at CS = 0x9E00 (CS.base 0x9E000), IP = 0 [SDM Vol. 3 §9.4.4; "Real-Address
 *  Mode Operation"].  There it runs CLI, WBINVD, OUT/IN (fw_cfg's CPU count) and a direct far
 *  JMP (LJMPW, its segment patched by the BSP as Linux relocates its trampoline) to CS = 0x9E10
 *  (CS.base 0x9E100), then a near CALL/RET (the pushed return address is an offset, not a linear
 *  address), CPUID, LIDTL/LGDTL, MOV to CR0 (PE) and LJMPL to flat 32-bit code (smp_ap_start32:
 *  RDMSR/WRMSR, MOV CR, long mode).  Every one of these is an instruction cetvm stops the engine
 *  for; each must resume at the next instruction's offset in the code segment (RIP), not at its
 *  linear address.  The real-mode part records what it saw in the copied page; the BSP checks it. */
#include "smp.h"

#define TRAMP_VECTOR 0x9Eu
#define TRAMP_PHYS ((u64)TRAMP_VECTOR << 12)
#define PART2_SEGMENT ((TRAMP_VECTOR << 8) + 0x10)   /* rm_part2 is 0x100 bytes into the page */
#define AP_STACK_SIZE 16384

extern char rm_start[], rm_end[], rm_jmp_seg[], rm_part2[], rm_ret_expected[], rm_gdt[], rm_gdt_desc[];
extern char rm_ncpus[], rm_cs[], rm_ret_ip[], rm_cpuid1_ebx[];

__asm__(".pushsection .text\n"
        ".code16\n"
        "rm_start:\n"                         /* CS = 0x9E00, IP = 0 */
        "  cli\n"
        "  wbinvd\n"
        "  mov %cs, %ax\n"
        "  mov %ax, %ds\n"
        "  mov $0x510, %dx\n"                 /* fw_cfg selector port: FW_CFG_NB_CPUS */
        "  mov $5, %ax\n"
        "  out %ax, %dx\n"
        "  inc %dx\n"
        "  in %dx, %al\n"                     /* the CPU count, low byte */
        "  mov %al, rm_ncpus - rm_start\n"
        "  ljmpw $0, $0\n"                    /* segment patched to PART2_SEGMENT; IP 0 */
        "  .set rm_jmp_seg, . - 2\n"
        "  .org rm_start + 0x100, 0xCC\n"
        "rm_part2:\n"                         /* CS = 0x9E10, IP = 0 */
        "  mov %cs, %ax\n"
        "  mov %ax, %ds\n"
        "  mov %ax, %ss\n"
        "  mov $rm_stack_top - rm_part2, %sp\n"
        "  mov %ax, rm_cs - rm_part2\n"
        "  call rm_check_cpu\n"
        "rm_ret_expected:\n"
        "  lidtl rm_idt_desc - rm_part2\n"
        "  lgdtl rm_gdt_desc - rm_part2\n"
        "  mov %cr0, %eax\n"
        "  or $1, %eax\n"                     /* CR0.PE */
        "  mov %eax, %cr0\n"
        "  ljmpl $0x08, $smp_ap_start32\n"
        "rm_check_cpu:\n"                     /* as Linux's verify_cpu: CPUID from real mode */
        "  mov %sp, %bp\n"
        "  mov (%bp), %ax\n"                  /* the return IP the CALL pushed */
        "  mov %ax, rm_ret_ip - rm_part2\n"
        "  mov $1, %eax\n"
        "  xor %ecx, %ecx\n"
        "  cpuid\n"
        "  mov %ebx, rm_cpuid1_ebx - rm_part2\n"
        "  ret\n"
        "  .p2align 3\n"
        "rm_gdt:\n"
        "  .quad 0\n"
        "  .quad 0x00CF9A000000FFFF\n"        /* 0x08 flat 32-bit code */
        "  .quad 0x00CF92000000FFFF\n"        /* 0x10 flat 32-bit data */
        "rm_gdt_desc:\n"
        "  .word rm_gdt_desc - rm_gdt - 1\n"
        "  .long 0\n"                         /* patched: the copied GDT's linear address */
        "rm_idt_desc:\n"
        "  .word 0\n"
        "  .long 0\n"
        "rm_ncpus: .byte 0\n"
        "  .p2align 2\n"
        "rm_cs: .word 0\n"
        "rm_ret_ip: .word 0\n"
        "rm_cpuid1_ebx: .long 0\n"
        "  .fill 64, 1, 0\n"
        "rm_stack_top:\n"
        "rm_end:\n"
        ".code64\n"
        ".popsection\n");

static u8 ap_stack[AP_STACK_SIZE] ALIGNED(16);
static volatile int ap_ran = -1;

static void ap_main(int cpu) { ap_ran = cpu; }

/* The copied trampoline's byte at `sym` (a label inside rm_start..rm_end). */
static volatile u8 *copied(const char *sym) { return (volatile u8 *)(TRAMP_PHYS + (u64)(sym - rm_start)); }

void kmain(void)
{
    kernel_init();
    tap_plan(6);
    unsigned n = fw_cfg_nb_cpus();
    if (n < 2) {
        for (int i = 0; i < 6; i++)
            tap_skip("AP trampoline at a nonzero CS.base", "one CPU (boot with --smp 2)");
        tap_done();
    }
    smp_init();
    volatile u8 *page = copied(rm_start);
    for (long i = 0; i < rm_end - rm_start; i++)
        page[i] = (u8)rm_start[i];
    *(volatile u16 *)copied(rm_jmp_seg) = PART2_SEGMENT;
    *(volatile u32 *)copied(rm_gdt_desc + 2) = (u32)(u64)copied(rm_gdt);

    bool up = smp_sipi_ap(1, ap_main, (u64)(ap_stack + AP_STACK_SIZE), TRAMP_VECTOR);
    u16 cs = *(volatile u16 *)copied(rm_cs), ret_ip = *(volatile u16 *)copied(rm_ret_ip);
    u32 ebx = *(volatile u32 *)copied(rm_cpuid1_ebx);
    tap_ok(up && ap_ran == 1, "SIPI vector 0x9E: real mode at CS.base 0x9E000 -> protected mode -> 64-bit mode",
           "started %d, fn ran on %d", up, ap_ran);
    tap_ok(*copied(rm_ncpus) == (n & 0xFF), "real mode, CS.base 0x9E000: OUT/IN to fw_cfg read the CPU count",
           "%u, expected %u", *copied(rm_ncpus), n);
    tap_ok(cs == PART2_SEGMENT, "real mode: LJMPW reloaded CS (0x9E10, CS.base 0x9E100)", "CS 0x%x", cs);
    tap_ok(ret_ip == (u16)(rm_ret_expected - rm_part2), "real mode: CALL pushed the return IP (an offset)",
           "0x%x, expected 0x%x", ret_ip, (unsigned)(rm_ret_expected - rm_part2));
    tap_ok(ebx >> 24 == 1, "real mode, CS.base 0x9E100: CPUID.1 EBX[31:24] is the AP's APIC ID",
           "EBX 0x%x", ebx);
    tap_ok(up && ebx != 0, "real mode: LIDTL/LGDTL, MOV to CR0.PE, LJMPL to flat 32-bit code resumed in order",
           "started %d", up);
    tap_done();
}
