/* long_run: indirect calls and returns under SHSTK + IBT for many run slices [issue 8].
 *  The `cetvm bench` loop (CALL * -> ENDBR64; CALL * -> ENDBR64; RET -> RET; DEC; JNZ), 8
 *  instructions an iteration, at CPL0 with supervisor shadow stacks and kernel IBT, then at CPL3
 *  with U_CET.SH_STK_EN|ENDBR_EN.  ITERATIONS iterations each (default 6,500,000: ~52M
 *  instructions a ring, ~100M in all), far beyond a single KVM_RUN slice: a slice or budget
 *  boundary, an exit or a snapshot in the middle must be invisible to the CET state.  Any #CP
 *  is a failure (the TAP line names vector, error code and RIP).
 *  Override the count with the command line "iterations=N" (decimal). */
#include "ktest.h"

__asm__(".pushsection .utext, \"ax\"\n"
        ".globl lr_user_inner, lr_user_outer\n"
        "lr_user_inner: endbr64\n  ret\n"
        "lr_user_outer: endbr64\n  call *%r11\n  ret\n"
        ".popsection\n");
extern char lr_user_inner[], lr_user_outer[];

static u64 iterations = 6500000;

USER_CODE static void user_loop(u64 n)
{
    __asm__ volatile("lea lr_user_inner(%%rip), %%r11\n"
                     "lea lr_user_outer(%%rip), %%r10\n"
                     "1: call *%%r10\n"
                     "  dec %0\n"
                     "  jnz 1b\n"
                     : "+r"(n) :: "r10", "r11", "memory");
}

static void body(void)
{
    struct trap_record rec = {0};
    iterations = cmdline_number("iterations=", iterations);
    kprintf("# %lu iterations a ring, shstk %d ibt %d\n", iterations, cet.shstk, cet.ibt);
    bool faulted = false;
    struct try_state t;
    TRY(t) {
        call_chain_loop(iterations);
        END_TRY(t);
    } CATCH {
        faulted = true;
        rec = t.trap;
    }
    tap_ok(!faulted, "CPL0 indirect calls/returns across many slices: no #CP",
           "vector %lu error %lu rip 0x%lx", rec.vector, rec.error, rec.rip);

    struct user_opts opts = {.u_cet = (cpu_has_shstk() ? CET_SH_STK_EN : 0) | (cpu_has_ibt() ? CET_ENDBR_EN : 0),
                             .shstk = cpu_has_shstk()};
    struct user_result r = run_user(user_loop, iterations, &opts);
    tap_ok(r.kind == USER_EXITED && r.code == 0, "CPL3 indirect calls/returns across many slices: no #CP",
           "kind %d code %lu vector %lu error %lu rip 0x%lx", r.kind, r.code, r.trap.vector, r.trap.error,
           r.trap.rip);
    tap_ok(!cpu_has_shstk() || r.pl3_ssp_after == user_ssp_top(), "CPL3 shadow stack balanced at exit",
           "PL3_SSP 0x%lx expected 0x%lx", r.pl3_ssp_after, user_ssp_top());
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(3);
    cet_kernel_start(body, 0);
}
