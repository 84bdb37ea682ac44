/* shstk_user: shadow-stack violations by near RET.
 *  - ring 3 (U_CET.SH_STK_EN, PL3_SSP): a return-address overwrite faults with #CP(1) at the RET
 *    and the gadget never runs; SYSCALL saves SSP in PL3_SSP;
 *  - the same overwrite succeeds without the user shadow stack (control);
 *  - ring 0 (S_CET.SH_STK_EN): the same overwrite at CPL0 faults with #CP(1).
 * SKIP when CPUID.(7,0):ECX[7] (SHSTK) is clear. */
#include "ktest.h"

extern char user_rop_victim[], user_rop_victim_ret[], user_gadget[];
extern char kern_rop_victim[], kern_rop_victim_ret[], kern_gadget[];
__asm__(".pushsection .utext, \"ax\"\n"
        "user_rop_victim: endbr64\n"
        "  lea user_gadget(%rip), %rax\n"
        "  mov %rax, (%rsp)\n"            /* overwrite our own return address */
        "user_rop_victim_ret: ret\n"
        "user_gadget: endbr64\n"
        "  mov $60, %eax\n mov $0x66, %edi\n syscall\n ud2\n"
        ".popsection\n"
        ".text\n"
        "kern_rop_victim: endbr64\n"
        "  lea kern_gadget(%rip), %rax\n"
        "  mov %rax, (%rsp)\n"
        "kern_rop_victim_ret: ret\n"
        "kern_gadget: endbr64\n"
        "  movl $1, kern_gadget_ran(%rip)\n"
        "  ret\n");                       /* returns to the victim's caller's caller */
volatile int kern_gadget_ran;

USER_CODE static void user_nested(u64 depth)
{
    if (depth)
        user_nested(depth - 1);
    __asm__ volatile("" ::: "memory");
}

USER_CODE static void user_calls(u64 arg) { user_nested(arg); }

USER_CODE static void user_rop(u64 arg)
{
    ((void (*)(void))user_rop_victim)();
    user_syscall(SYS_EXIT, 1);
}

static NOINLINE void kern_rop(void *arg)
{
    ((void (*)(void))kern_rop_victim)();
    __asm__ volatile("" ::: "memory");
}

static void body(void)
{
    struct user_opts on = {.u_cet = CET_SH_STK_EN, .shstk = true};
    struct user_opts off = {.u_cet = 0, .shstk = false};
    struct user_result r;

    r = run_user(user_rop, 0, &off);
    tap_ok(r.kind == USER_EXITED && r.code == 0x66, "ring 3 without shadow stack: ROP reaches the gadget",
           "kind %d code 0x%lx", r.kind, r.code);

    if (!cpu_has_shstk()) {
        const char *why = "CPUID lacks SHSTK";
        tap_skip("ring 3 with shadow stack: nested calls return normally", why);
        tap_skip("SYSCALL saves SSP in IA32_PL3_SSP", why);
        tap_skip("ring 3 return-address overwrite -> #CP(1)", why);
        tap_skip("#CP(1) at CPL3: RIP at the RET, RSP at the forged address", why);
        tap_skip("#CP(1) at CPL3: SSP unchanged (two entries deep)", why);
        tap_skip("ring 3 runs again after #CP", why);
        tap_skip("ring 0 return-address overwrite -> #CP(1) at the RET", why);
        tap_done();
    }
    r = run_user(user_calls, 20, &on);
    tap_ok(r.kind == USER_EXITED && r.code == 0, "ring 3 with shadow stack: nested calls return normally",
           "kind %d vector %lu error %lu rip 0x%lx", r.kind, r.trap.vector, r.trap.error, r.trap.rip);
    tap_ok(r.pl3_ssp_after == user_ssp_top(), "SYSCALL saves SSP in IA32_PL3_SSP",
           "PL3_SSP 0x%lx expected 0x%lx", r.pl3_ssp_after, user_ssp_top());

    r = run_user(user_rop, 0, &on);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_CP && r.trap.error == CP_NEAR_RET,
           "ring 3 return-address overwrite -> #CP(1)", "kind %d code 0x%lx vector %lu error %lu",
           r.kind, r.code, r.trap.vector, r.trap.error);
    tap_ok(r.trap.rip == (u64)user_rop_victim_ret && (r.trap.cs & 3) == 3 &&
               *(u64 *)r.trap.rsp == (u64)user_gadget,
           "#CP(1) at CPL3: RIP at the RET, RSP at the forged address",
           "rip 0x%lx (RET at %p) cs 0x%lx", r.trap.rip, user_rop_victim_ret, r.trap.cs);
    tap_ok(r.trap.ssp == user_ssp_top() - 16, "#CP(1) at CPL3: SSP unchanged (two entries deep)",
           "ssp 0x%lx expected 0x%lx", r.trap.ssp, user_ssp_top() - 16);
    r = run_user(user_calls, 3, &on);
    tap_ok(r.kind == USER_EXITED && r.code == 0, "ring 3 runs again after #CP", "kind %d", r.kind);

    struct trap_record rec = {0};
    kern_gadget_ran = 0;
    bool cp = expect_fault(VEC_CP, CP_NEAR_RET, kern_rop, NULL, &rec);
    tap_ok(cp && rec.rip == (u64)kern_rop_victim_ret && !kern_gadget_ran && (rec.cs & 3) == 0,
           "ring 0 return-address overwrite -> #CP(1) at the RET",
           "faulted %d vector %lu error %lu rip 0x%lx gadget_ran %d", cp, rec.vector, rec.error,
           rec.rip, kern_gadget_ran);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(8);
    cet_kernel_start(body, 0);
}
