/* boot_smoke: the framework itself - boot path, console, traps and recovery, ring 3 round
 * trips (SYSCALL/SYSRET, INT 0x80/IRETQ, exit) with and without CET. */
#include "ktest.h"

static void do_ud2(void *arg) { __asm__ volatile("ud2"); }
static void do_int3(void *arg) { __asm__ volatile("int3"); }

USER_CODE static void user_add1_paths(u64 arg)
{
    u64 a = user_syscall(SYS_ADD1, arg);
    u64 b = user_int80(SYS_ADD1, a);
    user_syscall(SYS_EXIT, b);
}
USER_CODE static void user_add1(u64 arg) { user_add1_paths(arg); }

USER_CODE static void user_touch_kernel(u64 arg)
{
    *(volatile u64 *)arg = 1;   /* supervisor page: #PF from CPL3 */
}

static void body(void)
{
    struct trap_record rec = {0};
    tap_ok(expect_fault(VEC_UD, -1, do_ud2, NULL, &rec), "ud2 raises #UD and is caught",
           "vector %lu", rec.vector);
    tap_ok(expect_fault(3, -1, do_int3, NULL, &rec), "int3 is caught", "vector %lu", rec.vector);
    /* twice: the recovery path leaves the stacks usable */
    tap_ok(expect_fault(VEC_UD, -1, do_ud2, NULL, &rec), "second #UD is caught", "vector %lu",
           rec.vector);
    struct user_opts o = {.u_cet = cet.shstk ? CET_SH_STK_EN : 0, .shstk = cet.shstk};
    for (int i = 0; i < 2; i++) {
        struct user_result r = run_user(user_add1, 40, &o);
        tap_ok(r.kind == USER_EXITED && r.code == 42, "ring 3: SYSCALL+INT 0x80 round trip",
               "kind %d code %lu", r.kind, r.code);
    }
    struct user_result r = run_user(user_touch_kernel, (u64)&cet, &o);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_PF && (r.trap.error & 4) &&
               r.trap.cr2 == (u64)&cet,
           "ring 3 write to a supervisor page -> #PF (U/S)", "kind %d vector %lu err 0x%lx",
           r.kind, r.trap.vector, r.trap.error);
    r = run_user(user_add1, 1, &o);
    tap_ok(r.kind == USER_EXITED && r.code == 3, "ring 3 usable after a user fault",
           "kind %d code %lu", r.kind, r.code);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    kprintf("# boot_smoke: shstk=%d ibt=%d\n", cpu_has_shstk(), cpu_has_ibt());
    tap_plan(7);
    cet_kernel_start(body, 0);
}
