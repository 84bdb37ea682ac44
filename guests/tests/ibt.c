/* ibt: indirect branch tracking [SDM Vol. 1 ch. 18 IBT].
 *  CPL0 (S_CET.ENDBR_EN, on for the whole kernel): CALL * to a target without ENDBR64 -> #CP(3)
 *  with RIP at the target; NOTRACK CALL * is exempt only with NO_TRACK_EN.
 *  CPL3 (U_CET.ENDBR_EN): the same -> #CP(3); without ENDBR_EN the call just works.
 * SKIP when CPUID.(7,0):EDX[20] (IBT) is clear (e.g. Zen 4). */
#include "ktest.h"

extern char kern_no_endbr[], user_no_endbr[];
__asm__(".text\n"
        "kern_no_endbr: nop\n  ret\n"
        ".pushsection .utext, \"ax\"\n"
        "user_no_endbr: nop\n  ret\n"
        ".popsection\n");

static void do_call(void *arg) { call_indirect((void (*)(void))arg); }
static void do_notrack(void *arg) { call_notrack((void (*)(void))arg); }

USER_CODE static void user_bad_call(u64 arg)
{
    user_call_indirect((void (*)(void))arg);
    user_syscall(SYS_EXIT, 7);
}

static void set_s_cet_bits(u64 set, u64 clear)
{
    wrmsr(MSR_S_CET, (rdmsr(MSR_S_CET) | set) & ~clear);
}

static void body(void)
{
    static const char *names[] = {
        "CPL0 CALL* to a non-ENDBR target -> #CP(3) at the target",
        "CPL0 NOTRACK CALL* with NO_TRACK_EN -> no fault",
        "CPL0 NOTRACK CALL* without NO_TRACK_EN -> #CP(3)",
        "CPL3 CALL* to a non-ENDBR target with U_CET.ENDBR_EN -> #CP(3)",
        "CPL3 without U_CET.ENDBR_EN -> the call works",
        "CPL0 IBT still works after the CPL3 #CP",
    };
    if (!cpu_has_ibt()) {
        for (int i = 0; i < 6; i++)
            tap_skip(names[i], "CPUID lacks IBT");
        tap_done();
    }
    struct trap_record rec = {0};
    bool cp = expect_fault(VEC_CP, CP_ENDBRANCH, do_call, kern_no_endbr, &rec);
    tap_ok(cp && rec.rip == (u64)kern_no_endbr && (rec.cs & 3) == 0, names[0],
           "faulted %d vector %lu error %lu rip 0x%lx", cp, rec.vector, rec.error, rec.rip);

    set_s_cet_bits(CET_NO_TRACK_EN, 0);
    bool faulted = run_catching(do_notrack, kern_no_endbr, &rec);
    tap_ok(!faulted, names[1], "vector %lu error %lu rip 0x%lx", rec.vector, rec.error, rec.rip);
    set_s_cet_bits(0, CET_NO_TRACK_EN);

    cp = expect_fault(VEC_CP, CP_ENDBRANCH, do_notrack, kern_no_endbr, &rec);
    tap_ok(cp && rec.rip == (u64)kern_no_endbr, names[2], "faulted %d vector %lu error %lu rip 0x%lx",
           cp, rec.vector, rec.error, rec.rip);

    struct user_opts on = {.u_cet = CET_ENDBR_EN, .shstk = false};
    struct user_result r = run_user(user_bad_call, (u64)user_no_endbr, &on);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_CP && r.trap.error == CP_ENDBRANCH &&
               r.trap.rip == (u64)user_no_endbr && (r.trap.cs & 3) == 3,
           names[3], "kind %d vector %lu error %lu rip 0x%lx", r.kind, r.trap.vector, r.trap.error,
           r.trap.rip);

    struct user_opts off = {.u_cet = 0, .shstk = false};
    r = run_user(user_bad_call, (u64)user_no_endbr, &off);
    tap_ok(r.kind == USER_EXITED && r.code == 7, names[4], "kind %d vector %lu", r.kind,
           r.trap.vector);

    cp = expect_fault(VEC_CP, CP_ENDBRANCH, do_call, kern_no_endbr, &rec);
    tap_ok(cp, names[5], "faulted %d vector %lu", cp, rec.vector);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(6);
    cet_kernel_start(body, 0);
}
