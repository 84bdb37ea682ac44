/*
 * demo.c - CET stops two classic control-flow hijacks; without CET they succeed.
 *
 * A small vulnerable "service" copies a request into a fixed-size buffer without a bounds check:
 *  - ROP: the overflow overwrites the saved return address with the address of a gadget;
 *  - JOP: the overflow overwrites a function pointer with an address inside a function, past
 *    its ENDBR64 (a non-ENDBR target), and the service jumps through it.
 * Both run in ring 3 (user shadow stack via U_CET.SH_STK_EN + PL3_SSP, user IBT via
 * U_CET.ENDBR_EN - Linux has no user IBT, the hardware does) and in ring 0 (supervisor shadow
 * stack and kernel IBT via S_CET).  Each attack is expected to be blocked exactly when the CPU
 * enumerates the matching feature (SHSTK for ROP, IBT for JOP); exit status 0 iff every attack
 * behaved as expected for the CPU found.
 */
#include "ktest.h"

#define GADGET_MARK 0x600D
#define SPRAY_WORDS 5   /* buf[4] then the saved return address (see the service disassembly) */

struct request { u64 len; u64 words[SPRAY_WORDS + 4]; };
struct user_session { u8 name[16]; void (*on_done)(u64); };
struct kernel_session { u8 name[16]; void (*on_done)(void); };

USER_DATA static struct request user_request;
USER_DATA static volatile struct user_session user_session;

/* ---------------- ring-3 service, gadget and "win" function ---------------- */
USER_CODE static void user_gadget(void) { user_syscall(SYS_EXIT, GADGET_MARK); }
USER_CODE static void user_greet(u64 x) { user_syscall(SYS_EXIT, 1); }
USER_CODE static void user_win(u64 x) { user_syscall(SYS_EXIT, GADGET_MARK); }

USER_CODE static void user_service_copy(const struct request *req)
{
    volatile u64 buf[4];
    volatile u64 *p = buf;
    __asm__("" : "+r"(p));                 /* hide the bound from the optimiser */
    for (u64 i = 0; i < req->len; i++)     /* BUG: no bounds check */
        p[i] = req->words[i];
}

USER_CODE static void user_rop_main(u64 arg)
{
    user_service_copy(&user_request);
    user_syscall(SYS_EXIT, 0);             /* service returned normally */
}

USER_CODE static void user_jop_main(u64 arg)
{
    const struct request *req = &user_request;
    user_session.on_done = user_greet;
    volatile u8 *dst = user_session.name;
    __asm__("" : "+r"(dst));
    const u8 *src = (const u8 *)req->words;
    for (u64 i = 0; i < req->len; i++)     /* BUG: copies past name[] into on_done */
        dst[i] = src[i];
    user_session.on_done(0);
}

/* ---------------- ring-0 service ---------------- */
static struct request kernel_request;
static volatile struct kernel_session kernel_session;
static struct jmp_ctx gadget_escape;
static volatile int kernel_gadget_ran, kernel_win_ran;

static void kernel_gadget(void)
{
    kernel_gadget_ran = 1;
    cet_longjmp(&gadget_escape, 1);        /* the stack is smashed: leave through the escape hatch */
}
static void kernel_greet(void) {}
static NOINLINE void kernel_win(void) { kernel_win_ran = 1; }

static NOINLINE void kernel_service_copy(const struct request *req)
{
    volatile u64 buf[4];
    volatile u64 *p = buf;
    __asm__("" : "+r"(p));
    for (u64 i = 0; i < req->len; i++)
        p[i] = req->words[i];
}

static NOINLINE void kernel_service_jop(const struct request *req)
{
    kernel_session.on_done = kernel_greet;
    volatile u8 *dst = kernel_session.name;
    __asm__("" : "+r"(dst));
    const u8 *src = (const u8 *)req->words;
    for (u64 i = 0; i < req->len; i++)
        dst[i] = src[i];
    kernel_session.on_done();
}

/* ---------------- the attacker ---------------- */
static void build_rop_request(struct request *r, u64 gadget)
{
    r->len = SPRAY_WORDS;                  /* 40 bytes into a 32-byte buffer */
    for (int i = 0; i < SPRAY_WORDS; i++)
        r->words[i] = gadget;
}

/* A target inside the function: skip its ENDBR64 (F3 0F 1E FA) so it is not a valid IBT target. */
static u64 past_endbr(void *fn)
{
    return *(u32 *)fn == 0xfa1e0ff3u ? (u64)fn + 4 : (u64)fn;
}

static void build_jop_request(struct request *r, u64 target)
{
    u8 *b = (u8 *)r->words;
    for (int i = 0; i < 16; i++)
        b[i] = 'A';
    for (int i = 0; i < 8; i++)
        b[16 + i] = (u8)(target >> (8 * i));
    r->len = 24;
}

enum outcome { BLOCKED, SUCCEEDED, OTHER };
struct tally { int blocked, succeeded, unexpected; };

static void report(struct tally *t, const char *attack, const char *what, bool cet_expected,
                   enum outcome o, const struct trap_record *trap, u64 expected_error)
{
    if (o == BLOCKED)
        kprintf("%s: %s -> blocked by #CP(%lu) %s at rip=0x%lx\n", attack, what, trap->error,
                expected_error == CP_NEAR_RET ? "near-ret" : "endbranch", trap->rip);
    else if (o == SUCCEEDED)
        kprintf("%s: attack SUCCEEDED, gadget ran\n", attack);
    else
        kprintf("%s: unexpected outcome: vector %lu error %lu at rip=0x%lx\n", attack,
                trap->vector, trap->error, trap->rip);
    bool as_expected = (o == BLOCKED && cet_expected) || (o == SUCCEEDED && !cet_expected);
    t->blocked += o == BLOCKED;
    t->succeeded += o == SUCCEEDED;
    t->unexpected += !as_expected;
    if (!as_expected)
        kprintf("  (not what this CPU should do: %s is %s)\n",
                expected_error == CP_NEAR_RET ? "SHSTK" : "IBT", cet_expected ? "present" : "absent");
}

static enum outcome classify_user(const struct user_result *r, u64 cp_error)
{
    if (r->kind == USER_FAULTED && r->trap.vector == VEC_CP && r->trap.error == cp_error)
        return BLOCKED;
    if (r->kind == USER_EXITED && r->code == GADGET_MARK)
        return SUCCEEDED;
    return OTHER;
}

static void attack_user_rop(struct tally *t, const struct user_opts *o)
{
    build_rop_request(&user_request, (u64)user_gadget);
    struct user_result r = run_user(user_rop_main, 0, o);
    report(t, "ROP (ring 3)", "return address overwritten", cet.shstk, classify_user(&r, CP_NEAR_RET),
           &r.trap, CP_NEAR_RET);
}

static void attack_user_jop(struct tally *t, const struct user_opts *o)
{
    build_jop_request(&user_request, past_endbr(user_win));
    struct user_result r = run_user(user_jop_main, 0, o);
    report(t, "JOP (ring 3)", "function pointer redirected into the middle of a function", cet.ibt,
           classify_user(&r, CP_ENDBRANCH), &r.trap, CP_ENDBRANCH);
}

static void attack_kernel_rop(struct tally *t)
{
    build_rop_request(&kernel_request, (u64)kernel_gadget);
    kernel_gadget_ran = 0;
    enum outcome o = OTHER;
    struct try_state ts;
    TRY(ts) {
        if (cet_setjmp(&gadget_escape) == 0)
            kernel_service_copy(&kernel_request);
        END_TRY(ts);
        o = kernel_gadget_ran ? SUCCEEDED : OTHER;
    } CATCH {
        o = ts.trap.vector == VEC_CP && ts.trap.error == CP_NEAR_RET ? BLOCKED : OTHER;
    }
    report(t, "ROP (ring 0)", "return address overwritten", cet.shstk, o, &ts.trap, CP_NEAR_RET);
}

static void attack_kernel_jop(struct tally *t)
{
    build_jop_request(&kernel_request, past_endbr(kernel_win));
    kernel_win_ran = 0;
    enum outcome o = OTHER;
    struct try_state ts;
    TRY(ts) {
        kernel_service_jop(&kernel_request);
        END_TRY(ts);
        o = kernel_win_ran ? SUCCEEDED : OTHER;
    } CATCH {
        o = ts.trap.vector == VEC_CP && ts.trap.error == CP_ENDBRANCH ? BLOCKED : OTHER;
    }
    report(t, "JOP (ring 0)", "function pointer redirected into the middle of a function", cet.ibt, o,
           &ts.trap, CP_ENDBRANCH);
}

static void demo_main(void)
{
    bool any = cet.shstk || cet.ibt;
    kprintf("kernel: CR4.CET=%d S_CET=0x%lx (supervisor shadow stack %s, kernel IBT %s)\n",
            (read_cr4() & CR4_CET) != 0, any ? rdmsr(MSR_S_CET) : 0ul, cet.shstk ? "on" : "off",
            cet.ibt ? "on" : "off");
    struct user_opts o = {
        .u_cet = (cet.shstk ? CET_SH_STK_EN : 0) | (cet.ibt ? CET_ENDBR_EN : 0),
        .shstk = cet.shstk,
    };
    kprintf("user: U_CET=0x%lx%s\n", o.u_cet, o.shstk ? " with a user shadow stack (PL3_SSP)" : "");
    struct tally t = {0};
    attack_user_rop(&t, &o);
    attack_user_jop(&t, &o);
    attack_kernel_rop(&t);
    attack_kernel_jop(&t);
    kprintf("summary: 4 attacks, %d blocked, %d succeeded; CET on this CPU: SHSTK %s, IBT %s; %s\n",
            t.blocked, t.succeeded, cet.shstk ? "yes" : "no", cet.ibt ? "yes" : "no",
            t.unexpected ? "UNEXPECTED behaviour" : "everything behaved as expected");
    exit_qemu(t.unexpected ? 1 : 0);
}

void kmain(void)
{
    kernel_init();
    kprintf("cetvm CET demo: CPUID SHSTK=%d IBT=%d\n", cpu_has_shstk(), cpu_has_ibt());
    cet_kernel_start(demo_main, 0);
}
