/* ret_targets: the shadow-stack check of a near RET comes before its target is fetched [issue 8].
 *  A RET whose return address was overwritten faults with #CP(1) at the RET — RIP at the RET,
 *  RSP at the forged address — whatever the forged target is: an address with no mapping, a
 *  non-executable (NX) page, a supervisor page (from CPL3), or a page mapped onto guest-physical
 *  memory with no RAM behind it.  The target is never fetched: no #PF, no MMIO, no emulator stop.
 *  Decision recorded in cetvm.cpu.engine_stops: the same holds at CPL0 and CPL3.
 *  SKIP when CPUID.(7,0):ECX[7] (SHSTK) is clear. */
#include "ktest.h"

/* Guest-physical address with no RAM (the tests run with 32 MiB) and no device. */
#define NO_RAM_PA 0xD0000000ul
#define VA_UNMAPPED (CET_REGION_BASE + 0x1F0000)
#define VA_NX (CET_REGION_BASE + 0x1E0000)
#define VA_NO_RAM (CET_REGION_BASE + 0x1D0000)
#define VA_USER_NO_RAM (CET_REGION_BASE + 0x1C0000)
#define VA_USER_NX (CET_REGION_BASE + 0x1B0000)

extern char kern_ret_to[], kern_ret_to_ret[], user_ret_to[], user_ret_to_ret[];
__asm__(".text\n"
        "kern_ret_to: endbr64\n"
        "  mov %rdi, (%rsp)\n"           /* overwrite our own return address with the target */
        "kern_ret_to_ret: ret\n"
        ".pushsection .utext, \"ax\"\n"
        "user_ret_to: endbr64\n"
        "  mov %rdi, (%rsp)\n"
        "user_ret_to_ret: ret\n"
        ".popsection\n");

static void ret_to(void *target) { ((void (*)(void *))kern_ret_to)(target); }

USER_CODE static void user_ret_probe(u64 target)
{
    ((void (*)(u64))user_ret_to)(target);
    user_syscall(SYS_EXIT, 1);
}

static void check_kernel(const char *name, u64 target)
{
    struct trap_record rec = {0};
    bool cp = expect_fault(VEC_CP, CP_NEAR_RET, ret_to, (void *)target, &rec);
    tap_ok(cp && rec.rip == (u64)kern_ret_to_ret, name, "faulted %d vector %lu error %lu rip 0x%lx cr2 0x%lx",
           cp, rec.vector, rec.error, rec.rip, rec.cr2);
}

static void check_user(const char *name, u64 target)
{
    struct user_opts on = {.u_cet = CET_SH_STK_EN, .shstk = true};
    struct user_result r = run_user(user_ret_probe, target, &on);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_CP && r.trap.error == CP_NEAR_RET &&
               r.trap.rip == (u64)user_ret_to_ret && r.trap.rsp % 8 == 0,
           name, "kind %d code %lu vector %lu error %lu rip 0x%lx", r.kind, r.code, r.trap.vector, r.trap.error,
           r.trap.rip);
}

static const char *const names[] = {
    "CPL0 RET to an unmapped address -> #CP(1) at the RET",
    "CPL0 RET to an NX page -> #CP(1) at the RET",
    "CPL0 RET to a page with no RAM behind it -> #CP(1) at the RET",
    "CPL3 RET to an unmapped address -> #CP(1) at the RET",
    "CPL3 RET to a supervisor page -> #CP(1) at the RET",
    "CPL3 RET to an NX user page -> #CP(1) at the RET",
    "CPL3 RET to a user page with no RAM behind it -> #CP(1) at the RET",
    "CPL3 RET to a non-canonical address -> #CP(1) at the RET",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    if (!cpu_has_shstk())
        tap_skip_rest(names, 0, N_TESTS, "CPUID lacks SHSTK");
    map_data_page(VA_NX, false);
    map_page(VA_NO_RAM, NO_RAM_PA, PTE_P | PTE_RW | PTE_A);
    map_data_page(VA_USER_NX, true);
    map_page(VA_USER_NO_RAM, NO_RAM_PA, PTE_P | PTE_RW | PTE_US | PTE_A);

    check_kernel(names[0], VA_UNMAPPED + 0x123);
    check_kernel(names[1], VA_NX + 0x40);
    check_kernel(names[2], VA_NO_RAM + 0x27);
    check_user(names[3], VA_UNMAPPED + 0x123);
    check_user(names[4], (u64)kern_ret_to);
    check_user(names[5], VA_USER_NX + 0x40);
    check_user(names[6], VA_USER_NO_RAM + 0x27);
    check_user(names[7], 0xdead000000000000ul);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
