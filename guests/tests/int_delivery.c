/* int_delivery: a fault raised while delivering INT n belongs to the INT [issue 8, SDM vol. 3
 * 6.12 / INT n pseudo-code].  With supervisor shadow stacks, INT n through a gate with an IST
 * index takes its new SSP from the interrupt SSP table and checks the supervisor token there;
 * a busy token, or a token whose 24-byte frame would leave its 32-byte region, is #GP(0).
 * That #GP is reported at the INT instruction (RIP of the INT, not after it), and at CPL0 the
 * #GP's own shadow-stack frame names the INT's linear address as LIP.
 * SKIP when CPUID.(7,0):ECX[7] (SHSTK) is clear. */
#include "ktest.h"

#define VEC_BUSY 0x82      /* IST 4 -> a busy token */
#define VEC_REGION 0x83    /* IST 5 -> a token at SSP mod 32 != 24 */
#define VEC_GOOD 0x84      /* IST 6 -> a good token (control) */
#define SHSTK_TEST (CET_REGION_BASE + 0x30000)

extern char kint_busy[], kint_region[], kint_good[], uint_busy[];
extern char kint_busy_int[], kint_region_int[], kint_good_int[], uint_busy_int[];
__asm__(".text\n"
        "kint_busy: endbr64\n kint_busy_int: int $0x82\n  ret\n"
        "kint_region: endbr64\n kint_region_int: int $0x83\n  ret\n"
        "kint_good: endbr64\n kint_good_int: int $0x84\n  ret\n"
        ".pushsection .utext, \"ax\"\n"
        "uint_busy: endbr64\n uint_busy_int: int $0x82\n  ret\n"
        ".popsection\n");

static void call_at(void *where) { ((void (*)(void))where)(); }
static volatile int good_ran;
static u64 good_ssp_lip, good_rflags;
static void good_handler(struct trap_frame *f)
{
    good_ran = 1;
    good_rflags = f->rflags;
    good_ssp_lip = f->entry_ssp ? *(u64 *)(f->entry_ssp + 8) : 0;
}

USER_CODE static void user_int(u64 arg)
{
    ((void (*)(void))uint_busy)();
    user_syscall(SYS_EXIT, 1);
}

static const char *const names[] = {
    "CPL0 INT n, IST token busy -> #GP(0) at the INT",
    "CPL0 #GP from INT n delivery: shadow-stack frame LIP = the INT",
    "CPL0 INT n, IST token outside its 32-byte region -> #GP(0) at the INT",
    "CPL0 INT n, good IST token -> handler runs, frame LIP = after the INT",
    "CPL3 INT n, IST token busy -> #GP(0) at the INT",
    "a fault's pushed RFLAGS has RF = 1 (the INT n's own frame does not)",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    if (!cpu_has_shstk())
        tap_skip_rest(names, 0, N_TESTS, "CPUID lacks SHSTK");
    /* One shadow-stack page: a busy token at +0xFF8, a free one at +0xFF0 - 0x800 (mod 32 = 16),
     * a good free token at +0x7F8. */
    u64 top = SHSTK_TEST + PAGE_SIZE;
    u64 busy = top - 8, region = SHSTK_TEST + 0x7F0 - 0x100, good = SHSTK_TEST + 0x7F8;
    map_data_page(SHSTK_TEST, false);
    *(volatile u64 *)busy = busy | 1;
    *(volatile u64 *)region = region;
    *(volatile u64 *)good = good;
    map_page(SHSTK_TEST, *pte_lookup(SHSTK_TEST) & 0x000FFFFFFFFFF000ul, PTE_P | PTE_A | PTE_D | PTE_NX);
    for (unsigned n = 4; n <= 6; n++)
        tss_set_ist(n, alloc_page() + PAGE_SIZE);
    isst_set(4, busy);
    isst_set(5, region);
    isst_set(6, good);
    idt_set_gate(VEC_BUSY, 4, 3);
    idt_set_gate(VEC_REGION, 5, 0);
    idt_set_gate(VEC_GOOD, 6, 0);

    struct trap_record rec = {0};
    bool gp = expect_fault(VEC_GP, 0, call_at, kint_busy, &rec);
    tap_ok(gp && rec.rip == (u64)kint_busy_int, names[0], "faulted %d vector %lu error 0x%lx rip 0x%lx (INT at 0x%lx)",
           gp, rec.vector, rec.error, rec.rip, (u64)kint_busy_int);
    tap_ok(gp && rec.ss_lip == (u64)kint_busy_int, names[1], "LIP 0x%lx (INT at 0x%lx)", rec.ss_lip, (u64)kint_busy_int);

    gp = expect_fault(VEC_GP, 0, call_at, kint_region, &rec);
    tap_ok(gp && rec.rip == (u64)kint_region_int, names[2], "faulted %d vector %lu error 0x%lx rip 0x%lx (INT at 0x%lx)",
           gp, rec.vector, rec.error, rec.rip, (u64)kint_region_int);

    irq_register(VEC_GOOD, good_handler);
    bool faulted = run_catching(call_at, kint_good, &rec);
    tap_ok(!faulted && good_ran && good_ssp_lip == (u64)kint_good_int + 2, names[3],
           "faulted %d (vector %lu) ran %d LIP 0x%lx", faulted, rec.vector, good_ran, good_ssp_lip);

    struct user_opts opts = {.u_cet = 0, .shstk = false};
    struct user_result r = run_user(user_int, 0, &opts);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_GP && r.trap.error == 0 && r.trap.rip == (u64)uint_busy_int,
           names[4], "kind %d vector %lu error 0x%lx rip 0x%lx (INT at 0x%lx)", r.kind, r.trap.vector, r.trap.error,
           r.trap.rip, (u64)uint_busy_int);
    struct trap_record gp_rec = {0};
    expect_fault(VEC_GP, 0, call_at, kint_busy, &gp_rec);
    tap_ok((gp_rec.rflags & (1ul << 16)) && !(good_rflags & (1ul << 16)), names[5],
           "#GP rflags 0x%lx, INT n rflags 0x%lx", gp_rec.rflags, good_rflags);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
