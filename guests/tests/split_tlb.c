/* split_tlb: code written through data mappings runs as written, whatever the engine's TLB did
 * with those mappings before [SDM Vol. 3A 4.10.2: separate instruction and data TLBs; 4.10.4.1
 * and Vol. 3A 8.1.3: self- and cross-modifying code]. Issue 13: on pages that are writable and
 * executable, cetvm's native path gives the engine's data TLB entries no execute permission
 * while the physical page has never been fetched from (stores then stay on the engine's fast
 * path); the first fetch from a page must take that away from every data entry of the page,
 * including other linear addresses that map it.
 *  - a page stored to many times, then filled with code and called, then patched and called;
 *  - the same through a second, writable and executable linear mapping of the page (an alias):
 *    stores through the alias before the page is code, the call through the identity mapping,
 *    a patch through the alias, the call again;
 *  - a patch inside a loop that keeps the page's data entries hot (32 rewrites, each called). */
#include "ktest.h"

#define ALIAS_VA (CET_REGION_BASE + 0x200000ul)

/* endbr64; mov $imm32, %eax; ret */
static void write_function(volatile u8 *at, u32 value)
{
    static const u8 head[] = {0xF3, 0x0F, 0x1E, 0xFA, 0xB8};
    for (unsigned i = 0; i < sizeof(head); i++)
        at[i] = head[i];
    for (unsigned i = 0; i < 4; i++)
        at[5 + i] = (u8)(value >> (8 * i));
    at[9] = 0xC3;
    __asm__ volatile("" ::: "memory");
}

static void patch_value(volatile u8 *at, u32 value)
{
    for (unsigned i = 0; i < 4; i++)
        at[5 + i] = (u8)(value >> (8 * i));
    __asm__ volatile("" ::: "memory");
}

static u32 call_at(u64 va)
{
    u32 (*fn)(void) = (u32 (*)(void))va;
    return fn();
}

/* Data traffic on the page before it holds code: the engine's data entry settles. */
static void scribble(volatile u64 *page)
{
    for (int round = 0; round < 64; round++)
        for (int i = 256; i < 512; i++)
            page[i] = page[i] + (u64)round;
}

void kmain(void)
{
    kernel_init();
    tap_plan(5);

    u64 plain = alloc_page();
    scribble((volatile u64 *)plain);
    write_function((volatile u8 *)plain, 0x11111111);
    u32 first = call_at(plain);
    tap_ok(first == 0x11111111, "a data page filled with code runs it", "eax 0x%x", first);
    patch_value((volatile u8 *)plain, 0x22222222);
    u32 second = call_at(plain);
    tap_ok(second == 0x22222222, "patched in place, the new code runs", "eax 0x%x", second);

    u64 page = alloc_page();
    map_page(ALIAS_VA, page, PTE_P | PTE_RW | PTE_A | PTE_D); /* writable and executable */
    scribble((volatile u64 *)ALIAS_VA);
    write_function((volatile u8 *)ALIAS_VA, 0x33333333);
    u32 third = call_at(page);
    tap_ok(third == 0x33333333, "code written through an alias runs at the identity address",
           "eax 0x%x", third);
    patch_value((volatile u8 *)ALIAS_VA, 0x44444444);
    u32 fourth = call_at(page);
    tap_ok(fourth == 0x44444444, "patched through the alias after it ran, the new code runs",
           "eax 0x%x", fourth);

    bool all = true;
    u32 seen = 0, want = 0;
    for (u32 i = 0; i < 32 && all; i++) {
        want = 0x55550000u + i;
        patch_value((volatile u8 *)ALIAS_VA, want);
        ((volatile u64 *)ALIAS_VA)[300 + i] = i; /* data stores on the same page between patches */
        seen = call_at(page);
        all = seen == want;
    }
    tap_ok(all, "32 patches through the alias, each one runs", "want 0x%x eax 0x%x", want, seen);
    tap_done();
}
