/* alignment_check: #AC(0) for a misaligned data access at CPL 3 with CR0.AM = 1 and RFLAGS.AC = 1
 * [SDM Vol. 3 §6.15 "Interrupt 17 — Alignment Check Exception", Table 6-7].
 *
 * The user function sets RFLAGS.AC with POPF, runs CPUID (an exit: cetvm takes up alignment
 * checking at an engine stop), then stores a quadword at `buf + misalign` and exits: with CR0.AM and a
 * misaligned address the store faults with #AC(0) at CPL 3 and nothing is written; aligned, or
 * with CR0.AM clear, it runs. (kvm-unit-tests vmx_exception_test's L2 relies on the #AC: its
 * misaligned store would otherwise overwrite its own return address.) */
#include "ktest.h"

#define CR0_AM (1ul << 18)
#define VEC_AC 17

static volatile u64 buf[4] USER_DATA ALIGNED(16);

USER_CODE static void store_with_ac(u64 misalign)
{
    __asm__ volatile("pushfq\n orq $0x40000, (%%rsp)\n popfq" ::: "memory", "cc");
    u32 a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    *(volatile u64 *)((u64)buf + misalign) = 0x1122334455667788ul;
    user_syscall(SYS_EXIT, 0);
}

/* The same after a system call: SYSRET restores RFLAGS.AC from R11 (the native event path hands
 * such a SYSRET to the run loop, which then checks alignment). */
USER_CODE static void store_after_syscall(u64 misalign)
{
    __asm__ volatile("pushfq\n orq $0x40000, (%%rsp)\n popfq" ::: "memory", "cc");
    user_syscall(SYS_ADD1, 0);
    *(volatile u64 *)((u64)buf + misalign) = 0x1122334455667788ul;
    user_syscall(SYS_EXIT, 0);
}

static struct user_result store(u64 misalign, bool am)
{
    write_cr0(am ? read_cr0() | CR0_AM : read_cr0() & ~CR0_AM);
    buf[0] = buf[1] = 0;
    struct user_opts opts = {0};
    return run_user(store_with_ac, misalign, &opts);
}

static void body(void)
{
    struct user_result r = store(4, true);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_AC && r.trap.error == 0 && (r.trap.cs & 3) == 3 &&
               buf[0] == 0 && buf[1] == 0,
           "CR0.AM, RFLAGS.AC, CPL 3: misaligned quadword store -> #AC(0), nothing written",
           "kind %d vector %lu error %lu cs 0x%lx buf 0x%lx 0x%lx", r.kind, r.trap.vector, r.trap.error, r.trap.cs,
           buf[0], buf[1]);
    tap_ok(r.kind == USER_FAULTED && (r.trap.rflags & (1ul << 18)), "the #AC frame's RFLAGS has AC set",
           "rflags 0x%lx", r.trap.rflags);
    write_cr0(read_cr0() | CR0_AM);
    buf[0] = buf[1] = 0;
    struct user_opts opts = {0};
    r = run_user(store_after_syscall, 4, &opts);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_AC && buf[0] == 0 && buf[1] == 0,
           "RFLAGS.AC restored by SYSRET: misaligned quadword store -> #AC(0)", "kind %d vector %lu", r.kind,
           r.trap.vector);
    r = store(8, true);
    tap_ok(r.kind == USER_EXITED && buf[1] == 0x1122334455667788ul, "aligned quadword store with AC on: no fault",
           "kind %d vector %lu buf[1] 0x%lx", r.kind, r.trap.vector, buf[1]);
    r = store(4, false);
    tap_ok(r.kind == USER_EXITED, "CR0.AM clear: the misaligned store runs", "kind %d vector %lu", r.kind,
           r.trap.vector);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(5);
    cet_kernel_start(body, 0);
}
