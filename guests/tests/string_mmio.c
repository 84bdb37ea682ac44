/* string_mmio: MOVS/LODS/STOS/CMPS/SCAS (with and without REP) on memory without RAM [issue 9].
 * An element in guest-physical memory with no RAM is an MMIO access, one exit per element, as
 * KVM's emulator does: an unassigned address reads all ones and ignores writes (QEMU's
 * unassigned memory in cetvm's VMM), the xAPIC page reads its registers.  The instruction
 * completes with the architectural register updates (rSI/rDI/rCX/RAX/flags) — no crash, no
 * emulator error. */
#include "ktest.h"

#define NO_RAM_PA 0xD0000000ul
#define APIC_PA 0xFEE00000ul
#define VA_NORAM (CET_REGION_BASE + 0x100000)
#define VA_APIC (CET_REGION_BASE + 0x110000)
#define VA_EDGE (CET_REGION_BASE + 0x120000)   /* last RAM page, then no RAM */

static u8 buf[64] ALIGNED(64);

static const char *names[] = {
    "LODSQ from unassigned memory reads all ones, RSI += 8",
    "REP MOVSB RAM -> unassigned: RCX = 0, RSI/RDI += 16",
    "REP MOVSD from the xAPIC page reads its registers",
    "MOVSQ unassigned -> unassigned (two MMIO accesses)",
    "REPE CMPSB RAM vs unassigned stops at the first difference (ZF = 0)",
    "REP STOSB across the end of RAM: RAM part written, RCX = 0",
    "SCASB with DF = 1 on unassigned memory: ZF = 1 for AL = 0xFF, RDI -= 1",
    "REP LODSB with RCX = 0 touches nothing",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    u64 ram_end = 32ul << 20;   /* booted with --memory 32M */
    map_page(VA_NORAM, NO_RAM_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_NORAM + PAGE_SIZE, NO_RAM_PA + PAGE_SIZE, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_APIC, APIC_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX | (1ul << 4));
    map_page(VA_EDGE, ram_end - PAGE_SIZE, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_EDGE + PAGE_SIZE, ram_end, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);

    u64 rax, rsi, rdi, rcx, rflags;
    /* 1 */
    rsi = VA_NORAM + 8;
    __asm__ volatile("lodsq" : "=a"(rax), "+S"(rsi) :: "memory");
    tap_ok(rax == ~0ul && rsi == VA_NORAM + 16, names[0], "rax 0x%lx rsi 0x%lx", rax, rsi);
    /* 2 */
    for (int i = 0; i < 16; i++)
        buf[i] = (u8)i;
    rsi = (u64)buf; rdi = VA_NORAM + 0x100; rcx = 16;
    __asm__ volatile("cld; rep movsb" : "+S"(rsi), "+D"(rdi), "+c"(rcx) :: "memory");
    tap_ok(rcx == 0 && rsi == (u64)buf + 16 && rdi == VA_NORAM + 0x110, names[1], "rcx %lu rsi 0x%lx rdi 0x%lx",
           rcx, rsi, rdi);
    /* 3 */
    u32 version = *(volatile u32 *)(VA_APIC + 0x30);
    u32 out[4] = {0};
    rsi = VA_APIC + 0x30; rdi = (u64)out; rcx = 1;
    __asm__ volatile("rep movsl" : "+S"(rsi), "+D"(rdi), "+c"(rcx) :: "memory");
    tap_ok(out[0] == version && version != 0 && version != ~0u && rcx == 0, names[2], "read 0x%x version 0x%x",
           out[0], version);
    /* 4 */
    rsi = VA_NORAM; rdi = VA_NORAM + PAGE_SIZE;
    __asm__ volatile("movsq" : "+S"(rsi), "+D"(rdi) :: "memory");
    tap_ok(rsi == VA_NORAM + 8 && rdi == VA_NORAM + PAGE_SIZE + 8, names[3], "rsi 0x%lx rdi 0x%lx", rsi, rdi);
    /* 5 */
    buf[0] = 0xFF; buf[1] = 0xFF; buf[2] = 0x00; buf[3] = 0xFF;
    rsi = (u64)buf; rdi = VA_NORAM; rcx = 8;
    __asm__ volatile("repe cmpsb; pushfq; pop %3" : "+S"(rsi), "+D"(rdi), "+c"(rcx), "=r"(rflags) :: "memory");
    tap_ok(rcx == 5 && !(rflags & (1ul << 6)) && rsi == (u64)buf + 3, names[4], "rcx %lu rflags 0x%lx rsi 0x%lx",
           rcx, rflags, rsi);
    /* 6 */
    rdi = VA_EDGE + PAGE_SIZE - 8; rcx = 16;
    __asm__ volatile("rep stosb" : "+D"(rdi), "+c"(rcx) : "a"(0xAB) : "memory");
    tap_ok(rcx == 0 && rdi == VA_EDGE + PAGE_SIZE + 8 && *(volatile u8 *)(VA_EDGE + PAGE_SIZE - 1) == 0xAB, names[5],
           "rcx %lu rdi 0x%lx last RAM byte 0x%x", rcx, rdi, *(volatile u8 *)(VA_EDGE + PAGE_SIZE - 1));
    /* 7 */
    rdi = VA_NORAM + 0x40;
    __asm__ volatile("std; scasb; pushfq; pop %1; cld" : "+D"(rdi), "=r"(rflags) : "a"(0xFF) : "memory");
    tap_ok(rdi == VA_NORAM + 0x3F && (rflags & (1ul << 6)), names[6], "rdi 0x%lx rflags 0x%lx", rdi, rflags);
    /* 8 */
    rsi = VA_NORAM; rcx = 0;
    __asm__ volatile("rep lodsb" : "+S"(rsi), "+c"(rcx) :: "rax", "memory");
    tap_ok(rsi == VA_NORAM && rcx == 0, names[7], "rsi 0x%lx", rsi);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
