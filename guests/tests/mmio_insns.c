/* mmio_insns: any instruction the engine knows works on MMIO [issue 8/9; kvm-unit-tests x86/emulator].
 * cetvm completes MMIO as KVM's emulator does: the operand is read through MMIO exits (8-byte
 * fragments at most), the instruction runs with that data, what it stores leaves through MMIO
 * write exits.  Checked on the xAPIC page (TPR at 0x80: bits 7:0 read/write) and on unassigned
 * memory (reads all ones, writes ignored; the xAPIC ignores sub-dword writes, as KVM's): stores
 * whose value is not a register (SMSW, SETcc),
 * and read-modify-write (ADD, XCHG, INC). (A CALL/JMP through an MMIO pointer with
 * CET on is refused by KVM's emulator: see ram_edges case=callmmio.) Stack accesses on a device
 * page (PUSH/POP with RSP there: kvm-unit-tests' emulator stopped at "MMIO access by push") and
 * accesses that cross from RAM into a device page complete too. */
#include "ktest.h"

#define NO_RAM_PA 0xD0000000ul
#define APIC_PA 0xFEE00000ul
#define VA_NORAM (CET_REGION_BASE + 0x100000)
#define VA_APIC (CET_REGION_BASE + 0x110000)
#define TPR (VA_APIC + 0x80)
#define IOAPIC_PA 0xFEC00000ul
#define VA_CROSS (CET_REGION_BASE + 0x120000) /* unassigned page, then the I/O APIC page */
#define VA_HALF (CET_REGION_BASE + 0x130000)  /* unassigned page, then a RAM page */

extern char jmp_through[], jmp_through_insn[];
__asm__(".text\n jmp_through: endbr64\n jmp_through_insn: jmp *(%rdi)\n");

static void smsw_to(void *where) { __asm__ volatile("smsw (%0)" ::"r"(where) : "memory"); }

static const char *names[] = {
    "ADD to an xAPIC register (read-modify-write through MMIO)",
    "XCHG with an xAPIC register",
    "INC of an xAPIC register",
    "SETcc to unassigned memory completes",
    "SMSW to unassigned memory completes",
    "MOV from unassigned memory reads all ones",
    "MMIO accesses leave CR2 alone (only a #PF writes it)",
    "PUSH onto a stack in unassigned memory completes, POP reads all ones",
    "a store crossing from RAM into unassigned memory writes its RAM part",
    "BTC with a register bit offset reaches the dword it selects (xAPIC TPR bit 4, then back)",
    "an 8-byte access crossing from unassigned memory into the I/O APIC page: one part per page",
    "JMP through a non-canonical pointer read from MMIO: #GP(0) at the JMP",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    map_page(VA_NORAM, NO_RAM_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_APIC, APIC_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX | (1ul << 4));
    volatile u32 *tpr = (volatile u32 *)TPR;

    *tpr = 0x20;
    __asm__ volatile("addl $0x10, (%0)" ::"r"(TPR) : "memory");
    u32 v = *tpr;
    tap_ok(v == 0x30, names[0], "TPR 0x%x", v);

    u32 x = 0x45;
    __asm__ volatile("xchgl %0, (%1)" : "+r"(x) : "r"(TPR) : "memory");
    v = *tpr;
    tap_ok(x == 0x30 && v == 0x45, names[1], "old 0x%x TPR 0x%x", x, v);

    __asm__ volatile("incl (%0)" ::"r"(TPR) : "memory");
    v = *tpr;
    tap_ok(v == 0x46, names[2], "TPR 0x%x", v);

    u64 flags_after;
    __asm__ volatile("xor %%eax, %%eax; sete (%1); pushfq; pop %0" : "=r"(flags_after) : "r"(VA_NORAM + 0x8)
                     : "rax", "memory");
    tap_ok(flags_after & (1ul << 6), names[3], "rflags 0x%lx", flags_after);

    struct trap_record rec = {0};
    bool faulted = run_catching(smsw_to, (void *)(VA_NORAM + 0x10), &rec);
    tap_ok(!faulted, names[4], "vector %lu rip 0x%lx", rec.vector, rec.rip);

    __asm__ volatile("mov %0, %%cr2" ::"r"(0x1234000ul));
    u64 q = *(volatile u64 *)(VA_NORAM + 0x18);
    tap_ok(q == ~0ul, names[5], "read 0x%lx", q);
    *(volatile u32 *)(VA_NORAM + 0x20) = 1;
    u64 cr2 = read_cr2();
    tap_ok(cr2 == 0x1234000ul, names[6], "CR2 0x%lx", cr2);

    u64 popped = 0;
    __asm__ volatile("mov %%rsp, %%r11\n\t"
                     "mov %1, %%rsp\n\t"
                     "push $-7\n\t"
                     "pop %0\n\t"
                     "mov %%r11, %%rsp"
                     : "=r"(popped) : "r"(VA_NORAM + 0x800) : "r11", "memory");
    tap_ok(popped == ~0ul, names[7], "popped 0x%lx", popped);

    u64 ram_page = alloc_page();
    map_page(VA_NORAM - PAGE_SIZE, ram_page, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    *(volatile u64 *)(VA_NORAM - 4) = 0x1122334455667788ul;
    u32 low = *(volatile u32 *)(ram_page + PAGE_SIZE - 4);
    tap_ok(low == 0x55667788u, names[8], "RAM part 0x%x", low);

    /* a register bit offset is signed and counts from the operand: 0x80 * 8 + 4 bits past the
     * page start is TPR bit 4; -28 bits before 0x84 is the same bit (-28 DIV 32 = -1) */
    *tpr = 0;
    __asm__ volatile("btcl %1, (%0)" ::"r"(VA_APIC), "r"(0x80 * 8 + 4) : "memory", "cc");
    u32 set = *tpr;
    __asm__ volatile("btcl %1, (%0)" ::"r"(VA_APIC + 0x84), "r"(-28) : "memory", "cc");
    v = *tpr;
    tap_ok(set == 0x10 && v == 0, names[9], "TPR after the first BTC 0x%x, after the second 0x%x", set, v);

    /* the two pages of the access are not physically adjacent: the high half goes to IOREGSEL */
    map_page(VA_CROSS, NO_RAM_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_CROSS + PAGE_SIZE, IOAPIC_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX | (1ul << 4));
    *(volatile u64 *)(VA_CROSS + PAGE_SIZE - 4) = 0x0000001200000000ul;
    u32 regsel = *(volatile u32 *)(VA_CROSS + PAGE_SIZE);
    q = *(volatile u64 *)(VA_CROSS + PAGE_SIZE - 4);
    tap_ok(regsel == 0x12 && q == 0x00000012fffffffful, names[10], "IOREGSEL 0x%x, read back 0x%lx", regsel, q);

    /* pointer = all ones from the unassigned page, 0x00010000 from RAM: 0x00010000ffffffff */
    u64 half = alloc_page();
    map_page(VA_HALF, NO_RAM_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    map_page(VA_HALF + PAGE_SIZE, half, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    *(volatile u32 *)(VA_HALF + PAGE_SIZE) = 0x00010000u;
    u64 s_cet = rdmsr(MSR_S_CET);
    wrmsr(MSR_S_CET, s_cet & ~CET_ENDBR_EN); /* KVM emulates no indirect JMP while IBT is on */
    bool gp = expect_fault(VEC_GP, 0, (probe_fn)(void *)jmp_through, (void *)(VA_HALF + PAGE_SIZE - 4), &rec);
    wrmsr(MSR_S_CET, s_cet);
    tap_ok(gp && rec.rip == (u64)jmp_through_insn, names[11], "vector %lu error %lu rip 0x%lx", rec.vector,
           rec.error, rec.rip);

    *tpr = 0;
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
