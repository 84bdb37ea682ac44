/* insn_faults: faults the engine (Unicorn 2.1.4) gets wrong and cetvm corrects, found by
 * kvm-unit-tests x86/emulator:
 *  - MOVBE with a register operand is #UD [SDM Vol. 2B MOVBE]; the engine loaded from a garbage
 *    address instead;
 *  - a non-canonical address through SS (RSP- or RBP-based) is #SS(0), through another segment
 *    #GP(0) [SDM Vol. 3 §6.15 "Interrupt 12"]; the engine raised #GP(0) for both;
 *  - MOV from CR8 returns what MOV to CR8 wrote (the engine read 0); CR8 bits 63:4 are reserved
 *    [SDM Vol. 3 §2.5];
 * and by kvm-unit-tests x86/syscall: SYSCALL and SYSRET trap on the RFLAGS.TF they end with —
 * a SYSRET that loads TF from R11 takes the single-step #DB at once, at the user instruction
 * after the SYSCALL (cetvm retired the SYSRET without it and trapped one instruction later);
 * and by its debug test: INT1 (ICEBP, F1) is a trap-like #DB past it that leaves DR6 alone (the
 * engine decodes it as #UD: the guest looped on it); with DR7.GD set a MOV from a debug register
 * is a #DB fault at the MOV with DR6.BD, and DR7.GD is cleared (the engine moved the register);
 * and by its vmx test: INVD exits unconditionally (KVM emulates it as a NOP: the guest goes on
 * after it) and is #GP(0) at CPL 3 [SDM Vol. 2A INVD] (the engine ran it as a NOP). */
#include "ktest.h"

#define NONCANONICAL 0xaaaaaaaaaaaaaaaaul

extern char movbe_rr[], movbe_rr_insn[], or_rsp[], or_rsp_insn[], or_rbp[], or_rbp_insn[], or_rax[];
__asm__(".text\n"
        "movbe_rr: endbr64\n movbe_rr_insn: .byte 0x0f, 0x38, 0xf0, 0xc0\n ret\n"
        /* rdi = the non-canonical index */
        "or_rsp: endbr64\n or_rsp_insn: orq $0, (%rsp,%rdi,1)\n ret\n"
        "or_rbp: endbr64\n push %rbp\n mov %rsp, %rbp\n or_rbp_insn: orq $0, (%rbp,%rdi,1)\n pop %rbp\n ret\n"
        "or_rax: endbr64\n mov %rdi, %rax\n orq $0, (%rax)\n ret\n");

extern char tf_user[], tf_after_syscall[];
__asm__(".pushsection .utext, \"ax\"\n"
        /* TF set by POPF, then SYSCALL (FMASK clears TF: no trap in the kernel); SYSRETQ reloads
         * it from R11: #DB at tf_after_syscall */
        "tf_user: mov $1, %eax\n mov $41, %edi\n pushfq\n orq $0x100, (%rsp)\n popfq\n syscall\n"
        "tf_after_syscall: nop\n nop\n ud2\n"
        ".popsection\n");

extern char user_invd[];
__asm__(".pushsection .utext, \"ax\"\n user_invd: invd\n ud2\n .popsection\n");

extern char icebp_probe[], icebp_after[], gd_probe[], gd_mov[];
__asm__(".text\n icebp_probe: endbr64\n .byte 0xf1\n icebp_after: ret\n"
        "gd_probe: endbr64\n gd_mov: mov %dr0, %rax\n ret\n");

static void write_cr8(void *value) { __asm__ volatile("mov %0, %%cr8" ::"r"((u64)value)); }
static u64 read_cr8(void)
{
    u64 v;
    __asm__ volatile("mov %%cr8, %0" : "=r"(v));
    return v;
}

static const char *const names[] = {
    "MOVBE with a register operand -> #UD at the instruction",
    "non-canonical RSP-based access -> #SS(0)",
    "non-canonical RBP-based access -> #SS(0)",
    "non-canonical RAX-based access -> #GP(0)",
    "MOV from CR8 returns what MOV to CR8 wrote",
    "MOV to CR8 with a reserved bit (4) -> #GP(0), CR8 unchanged",
    "SYSRET loading RFLAGS.TF -> single-step #DB at the user instruction right after it",
    "INT1 (ICEBP) -> #DB past it, DR6 unchanged",
    "MOV from DR0 with DR7.GD -> #DB at the MOV, DR6.BD set, DR7.GD cleared",
    "INVD at CPL 0 exits and the guest goes on after it (KVM: a NOP)",
    "INVD at CPL 3 -> #GP(0)",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    struct trap_record rec = {0};
    bool ud = expect_fault(VEC_UD, -1, (probe_fn)(void *)movbe_rr, 0, &rec);
    tap_ok(ud && rec.rip == (u64)movbe_rr_insn, names[0], "vector %lu rip 0x%lx", rec.vector, rec.rip);

    bool ss = expect_fault(VEC_SS, 0, (probe_fn)(void *)or_rsp, (void *)NONCANONICAL, &rec);
    tap_ok(ss && rec.rip == (u64)or_rsp_insn, names[1], "vector %lu error %lu rip 0x%lx", rec.vector, rec.error,
           rec.rip);
    ss = expect_fault(VEC_SS, 0, (probe_fn)(void *)or_rbp, (void *)NONCANONICAL, &rec);
    tap_ok(ss && rec.rip == (u64)or_rbp_insn, names[2], "vector %lu error %lu rip 0x%lx", rec.vector, rec.error,
           rec.rip);
    bool gp = expect_fault(VEC_GP, 0, (probe_fn)(void *)or_rax, (void *)NONCANONICAL, &rec);
    tap_ok(gp, names[3], "vector %lu error %lu", rec.vector, rec.error);

    write_cr8((void *)3ul);
    u64 cr8 = read_cr8();
    tap_ok(cr8 == 3, names[4], "CR8 %lu", cr8);
    gp = expect_fault(VEC_GP, 0, write_cr8, (void *)0x13ul, &rec);
    cr8 = read_cr8();
    write_cr8(0);
    tap_ok(gp && cr8 == 3, names[5], "vector %lu error %lu CR8 %lu", rec.vector, rec.error, cr8);

    struct user_opts opts = {.u_cet = 0, .shstk = false};
    struct user_result r = run_user((void (*)(u64))tf_user, 0, &opts);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_DB && r.trap.rip == (u64)tf_after_syscall &&
               r.trap.cs == (SEL_UCODE | 3), names[6], "kind %d vector %lu rip 0x%lx cs 0x%lx", r.kind,
           r.trap.vector, r.trap.rip, r.trap.cs);

    __asm__ volatile("mov %0, %%dr6" ::"r"(0ul));
    bool db = expect_fault(VEC_DB, -1, (probe_fn)(void *)icebp_probe, 0, &rec);
    u64 dr6;
    __asm__ volatile("mov %%dr6, %0" : "=r"(dr6));
    tap_ok(db && rec.rip == (u64)icebp_after && dr6 == 0xFFFF0FF0ul, names[7], "vector %lu rip 0x%lx DR6 0x%lx",
           rec.vector, rec.rip, dr6);

    __asm__ volatile("mov %0, %%dr7" ::"r"(0x2400ul)); /* GD, bit 10 reads as 1 */
    db = expect_fault(VEC_DB, -1, (probe_fn)(void *)gd_probe, 0, &rec);
    u64 dr7;
    __asm__ volatile("mov %%dr6, %0" : "=r"(dr6));
    __asm__ volatile("mov %%dr7, %0" : "=r"(dr7));
    __asm__ volatile("mov %0, %%dr6" ::"r"(0ul));
    tap_ok(db && rec.rip == (u64)gd_mov && dr6 == (0xFFFF0FF0ul | (1ul << 13)) && dr7 == 0x400, names[8],
           "vector %lu rip 0x%lx DR6 0x%lx DR7 0x%lx", rec.vector, rec.rip, dr6, dr7);

    u64 marker = 0;
    __asm__ volatile("invd\n\tmovq $0x1d, %0" : "=r"(marker) :: "memory");
    tap_ok(marker == 0x1d, names[9], "marker 0x%lx", marker);
    r = run_user((void (*)(u64))user_invd, 0, &opts);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_GP && r.trap.error == 0 && r.trap.rip == (u64)user_invd,
           names[10], "kind %d vector %lu error %lu rip 0x%lx", r.kind, r.trap.vector, r.trap.error, r.trap.rip);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
