/* compat_events: exceptions and INT n from 32-bit compatibility mode at CPL3 [issue 8, kvm-unit-tests
 * x86/syscall; SDM Vol. 3 6.14: in IA-32e mode every event goes through a 64-bit IDT gate, also
 * from compatibility mode, and the frame holds the 32-bit CS and EIP].
 *  - UD2 in compatibility mode -> #UD at the UD2, frame CS = the 32-bit code selector;
 *  - SYSCALL in compatibility mode is #UD on Intel (CS.L = 0); KVM emulates it at that #UD for
 *    an AMD (or Hygon) guest, whose CPUs have it (em_syscall: RIP = IA32_CSTAR) — kvm-unit-tests
 *    x86/syscall runs with -cpu Opteron_G1,vendor=AuthenticAMD;
 *  - INT 0x80 from compatibility mode reaches the handler; IRETQ returns to compatibility mode
 *    (a second INT 0x80 sees the first one's result). */
#include "ktest.h"

extern char compat_ud[], compat_syscall[], compat_syscall_insn[], compat_int80[];
extern char syscall_entry[];
__asm__(".pushsection .utext, \"ax\"\n"
        ".code32\n"
        "compat_ud: ud2\n"
        "compat_syscall: mov $60, %eax\n mov $42, %edi\n compat_syscall_insn: syscall\n ud2\n" /* SYS_EXIT(42) */
        "compat_int80: mov $1, %eax\n mov $41, %edi\n int $0x80\n"   /* SYS_ADD1: eax = 42 */
        "  mov %eax, %edi\n mov $60, %eax\n int $0x80\n ud2\n"        /* SYS_EXIT(42) */
        ".code64\n"
        ".popsection\n");

static const char *names[] = {
    "UD2 in compatibility mode -> #UD at the UD2 with the 32-bit CS in the frame",
    "SYSCALL in compatibility mode -> #UD (Intel), IA32_CSTAR (AMD guest without CET: KVM emulates it)",
    "INT 0x80 from compatibility mode, IRETQ back to it, INT 0x80 again",
    "the same with a user shadow stack: SSP saved in PL3_SSP and restored by IRETQ",
};

static void body(void)
{
    struct user_opts opts = {.u_cet = 0, .shstk = false, .compat = true};
    struct user_result r = run_user((void (*)(u64))compat_ud, 0, &opts);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_UD && r.trap.rip == (u64)compat_ud &&
               r.trap.cs == SEL_UCODE32, names[0], "kind %d vector %lu rip 0x%lx cs 0x%lx", r.kind, r.trap.vector,
           r.trap.rip, r.trap.cs);
    struct cpuid_regs vendor = cpuid(0, 0);
    bool amd = vendor.ebx == 0x68747541u && vendor.edx == 0x69746e65u && vendor.ecx == 0x444d4163u; /* AuthenticAMD */
    bool emulated = amd && !cpu_has_shstk() && !cpu_has_ibt(); /* KVM refuses a CET-guarded SYSCALL */
    wrmsr(MSR_CSTAR, (u64)syscall_entry);
    r = run_user((void (*)(u64))compat_syscall, 0, &opts);
    wrmsr(MSR_CSTAR, 0);
    if (emulated)
        kprintf("# AMD guest without CET: KVM emulates SYSCALL from compatibility mode\n");
    if (emulated)
        tap_ok(r.kind == USER_EXITED && r.code == 42, names[1], "AMD: kind %d code %lu vector %lu rip 0x%lx", r.kind,
               r.code, r.trap.vector, r.trap.rip);
    else
        tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_UD && r.trap.rip == (u64)compat_syscall_insn &&
                   r.trap.cs == SEL_UCODE32, names[1], "kind %d vector %lu rip 0x%lx cs 0x%lx", r.kind,
               r.trap.vector, r.trap.rip, r.trap.cs);
    r = run_user((void (*)(u64))compat_int80, 0, &opts);
    tap_ok(r.kind == USER_EXITED && r.code == 42, names[2], "kind %d code %lu vector %lu rip 0x%lx", r.kind, r.code,
           r.trap.vector, r.trap.rip);
    if (!cpu_has_shstk()) {
        tap_skip(names[3], "CPUID lacks SHSTK");
        tap_done();
    }
    struct user_opts shstk = {.u_cet = CET_SH_STK_EN, .shstk = true, .compat = true};
    r = run_user((void (*)(u64))compat_int80, 0, &shstk);
    tap_ok(r.kind == USER_EXITED && r.code == 42 && r.pl3_ssp_after == user_ssp_top(), names[3],
           "kind %d code %lu vector %lu error %lu rip 0x%lx PL3_SSP 0x%lx (top 0x%lx)", r.kind, r.code,
           r.trap.vector, r.trap.error, r.trap.rip, r.pl3_ssp_after, user_ssp_top());
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(4);
    cet_kernel_start(body, 0);
}
