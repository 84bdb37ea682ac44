/* block_cache: what cetvm remembers about a code block follows the TLB's rules [SDM Vol. 3
 * §4.10.4.1: a MOV to CR3 invalidates the non-global translations, INVLPG the page's; global
 * translations survive a CR3 load]. Issue 10: cetvm keeps the CET classification of blocks on
 * global pages across CR3 loads (Linux loads CR3 at every context switch), so it must forget
 * exactly what the TLB forgets.
 *  - the same linear address in two address spaces, ENDBR64 at it in one and not in the other
 *    (blocks of the same size): CALL* there works in A, is #CP(ENDBRANCH) in B, works in A again;
 *  - a global page (CR4.PGE, PTE.G) survives the CR3 loads and still works; remapped to the page
 *    without ENDBR64 and invalidated with INVLPG, CALL* there is #CP(ENDBRANCH).
 * SKIP when CPUID.(7,0):EDX[20] (IBT) is clear. */
#include "ktest.h"

#define LOCAL_VA (CET_REGION_BASE + 0x100000ul)
#define GLOBAL_VA (CET_REGION_BASE + 0x101000ul)
#define PTE_G (1ul << 8)
#define CR4_PGE (1ul << 7)
#define ADDR_MASK 0x000FFFFFFFFFF000ul
#define CODE_FLAGS (PTE_P | PTE_A) /* supervisor, read-only, executable */

static const u8 with_endbr[] = {0xF3, 0x0F, 0x1E, 0xFA, 0xC3};   /* endbr64; ret */
static const u8 without_endbr[] = {0x0F, 0x1F, 0x40, 0x00, 0xC3}; /* nopl 0(%rax); ret */

static u64 code_page(const u8 *code)
{
    u64 pa = alloc_page(); /* identity-mapped */
    memcpy((void *)pa, code, 5);
    return pa;
}

/* A copy of the current paging structures down to the page table holding ``va``: an address
 * space that shares everything else; returns its root and its PTE for ``va``. */
static u64 clone_root(u64 va, u64 **pte)
{
    u64 *table = (u64 *)(read_cr3() & ADDR_MASK);
    u64 *copy = (u64 *)alloc_page(), root = (u64)copy;
    memcpy(copy, table, PAGE_SIZE);
    for (int shift = 39; shift > 12; shift -= 9) {
        unsigned idx = (va >> shift) & 511;
        u64 *next = (u64 *)(table[idx] & ADDR_MASK), *next_copy = (u64 *)alloc_page();
        memcpy(next_copy, next, PAGE_SIZE);
        copy[idx] = (u64)next_copy | (table[idx] & 0xFFF);
        table = next;
        copy = next_copy;
    }
    *pte = &copy[(va >> 12) & 511];
    return root;
}

static void do_call(void *arg) { call_indirect((void (*)(void))arg); }

static bool calls_cleanly(u64 va)
{
    struct trap_record rec = {0};
    return !run_catching(do_call, (void *)va, &rec);
}

static bool endbranch_fault_at(u64 va, struct trap_record *rec)
{
    return expect_fault(VEC_CP, CP_ENDBRANCH, do_call, (void *)va, rec) && rec->rip == va;
}

static const char *names[] = {
    "address space A: CALL* to ENDBR64 works",
    "address space B, same address without ENDBR64: #CP(3) after the CR3 load",
    "back in A: the call works again",
    "a global page survives CR3 loads: the call works in A and in B",
    "the global page remapped without ENDBR64 + INVLPG: #CP(3)",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    if (!cpu_has_ibt()) {
        for (int i = 0; i < N_TESTS; i++)
            tap_skip(names[i], "CPUID lacks IBT");
        tap_done();
    }
    u64 endbr = code_page(with_endbr), plain = code_page(without_endbr);
    write_cr4(read_cr4() | CR4_PGE);
    map_page(LOCAL_VA, endbr, CODE_FLAGS);
    map_page(GLOBAL_VA, endbr, CODE_FLAGS | PTE_G);
    u64 root_a = read_cr3();
    u64 *pte_a = pte_lookup(GLOBAL_VA), *pte_b;
    u64 root_b = clone_root(LOCAL_VA, &pte_b); /* LOCAL_VA and GLOBAL_VA share the page table */
    u64 *local_b = pte_b, *global_b = pte_b + 1;
    *local_b = plain | CODE_FLAGS;

    struct trap_record rec = {0};
    tap_ok(calls_cleanly(LOCAL_VA), names[0], "at 0x%lx", LOCAL_VA);
    write_cr3(root_b);
    bool cp = endbranch_fault_at(LOCAL_VA, &rec);
    tap_ok(cp, names[1], "vector %lu error %lu rip 0x%lx", rec.vector, rec.error, rec.rip);
    write_cr3(root_a);
    tap_ok(calls_cleanly(LOCAL_VA), names[2], "at 0x%lx", LOCAL_VA);

    bool in_a = calls_cleanly(GLOBAL_VA);
    write_cr3(root_b);
    bool in_b = calls_cleanly(GLOBAL_VA);
    tap_ok(in_a && in_b, names[3], "A %d B %d", in_a, in_b);
    *pte_a = plain | CODE_FLAGS | PTE_G;
    *global_b = plain | CODE_FLAGS | PTE_G;
    invlpg(GLOBAL_VA);
    cp = endbranch_fault_at(GLOBAL_VA, &rec);
    tap_ok(cp, names[4], "vector %lu error %lu rip 0x%lx", rec.vector, rec.error, rec.rip);
    write_cr3(root_a);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
