/* native_exits: the exit-point instructions cetvm's native path does next to the engine (issue
 * 13, cetfast.c "exit-point instructions") behave as the Python emulation does:
 *  - MOV to CR3 switches address spaces: the same linear address reads another page after each
 *    load, hundreds of times in a row, from a GPR with and without REX.B [SDM Vol. 3A 4.10.4.1];
 *  - IN from COM1's line-status register (a read-only PIO register KVM answers, the UART's
 *    value) reads THRE | TEMT every time;
 *  - OUT to COM1's transmit register (a coalesced PIO zone while IER = 0) one byte at a time:
 *    the host test finds the line whole and in order on the console;
 *  - INVLPG (emulated without stepping the engine) drops the engine's own TLB entry: a page
 *    remapped by a PTE write reads the new page after INVLPG [SDM Vol. 3A 4.10.4.1]; with a
 *    non-canonical address it is a NOP, no #GP [SDM Vol. 2A INVLPG].
 * The host test (tests/boot/test_boot_native_exits.py) checks that the native path did them. */
#include "ktest.h"

#define TEST_VA 0x8000000000ul /* PML4 slot 1: the kernel maps nothing there */
#define REMAP_VA (CET_REGION_BASE + 0x300000ul)
#define ROUNDS 400
#define COM1 0x3F8
#define LSR_THRE_TEMT 0x60

/* A copy of the current PML4 that also maps TEST_VA to a fresh page holding ``value``. */
static u64 address_space_with(u64 value)
{
    const u64 *current = (const u64 *)(read_cr3() & ~0xFFFul);
    u64 *root = (u64 *)alloc_page();
    for (int i = 0; i < 512; i++)
        root[i] = current[i];
    u64 *pdpt = (u64 *)alloc_page(), *pd = (u64 *)alloc_page(), *pt = (u64 *)alloc_page();
    u64 page = alloc_page();
    root[1] = (u64)pdpt | PTE_P | PTE_RW;
    pdpt[0] = (u64)pd | PTE_P | PTE_RW;
    pd[0] = (u64)pt | PTE_P | PTE_RW;
    pt[0] = page | PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX;
    *(volatile u64 *)page = value;
    return (u64)root;
}

static u64 read_test_va(void) { return *(volatile u64 *)TEST_VA; }

static void invlpg_non_canonical(void *arg)
{
    (void)arg;
    __asm__ volatile("invlpg (%0)" ::"r"(0xABFF800000001000ul) : "memory");
}

void kmain(void)
{
    kernel_init();
    tap_plan(6);

    u64 home = read_cr3();
    u64 a = address_space_with(0xAAAA0001), b = address_space_with(0xBBBB0002);
    bool all = true;
    u64 seen_a = 0, seen_b = 0;
    for (int i = 0; i < ROUNDS && all; i++) {
        write_cr3(a);
        seen_a = read_test_va();
        write_cr3(b);
        seen_b = read_test_va();
        all = seen_a == 0xAAAA0001 && seen_b == 0xBBBB0002;
    }
    write_cr3(home);
    tap_ok(all, "CR3 loads switch address spaces, round after round", "a 0x%lx b 0x%lx", seen_a, seen_b);

    u64 via_r9 = 0;
    __asm__ volatile("mov %1, %%r9\n\tmov %%r9, %%cr3\n\tmovq (%2), %0\n\tmov %3, %%cr3"
                     : "=&r"(via_r9) : "r"(b), "r"(TEST_VA), "r"(home) : "r9", "memory");
    tap_ok(via_r9 == 0xBBBB0002, "MOV to CR3 from R9 (REX.B)", "read 0x%lx", via_r9);

    u8 lsr = 0;
    all = true;
    for (int i = 0; i < ROUNDS && all; i++) {
        lsr = inb(COM1 + 5);
        all = (lsr & LSR_THRE_TEMT) == LSR_THRE_TEMT;
    }
    tap_ok(all, "COM1 LSR reads THRE | TEMT", "lsr 0x%x", lsr);

    static const char line[] = "native-exits: a line written one OUT at a time\n";
    for (const char *c = line; *c; c++) {
        while (!(inb(COM1 + 5) & 0x20))
            ;
        outb(COM1, (u8)*c);
    }
    tap_ok(true, "a raw line written to COM1 (the host test reads it)", "%u bytes", (unsigned)(sizeof(line) - 1));

    u64 old_page = alloc_page(), new_page = alloc_page();
    *(volatile u64 *)old_page = 0x01D0;
    *(volatile u64 *)new_page = 0x2E3;
    map_page(REMAP_VA, old_page, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX);
    u64 before = *(volatile u64 *)REMAP_VA; /* the engine caches the translation */
    u64 *pte = pte_lookup(REMAP_VA);
    *pte = (*pte & ~0x000FFFFFFFFFF000ul) | new_page;
    __asm__ volatile("invlpg (%0)" ::"r"(REMAP_VA) : "memory");
    u64 after = *(volatile u64 *)REMAP_VA;
    tap_ok(before == 0x01D0 && after == 0x2E3, "INVLPG: the remapped page reads the new page",
           "before 0x%lx after 0x%lx", before, after);

    struct trap_record rec;
    bool faulted = run_catching(invlpg_non_canonical, 0, &rec);
    tap_ok(!faulted, "INVLPG of a non-canonical address is a NOP", "vector %lu", faulted ? rec.vector : 0ul);
    tap_done();
}
