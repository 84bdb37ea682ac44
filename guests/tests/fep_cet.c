/* fep_cet: KVM's force-emulation prefix and CET [issue 8; KVM 6.18 "Don't emulate instructions
 * guarded by CET"].  Boot with --force-emulation-prefix and the command line "fep=1" (or
 * without both: then the prefix is an ordinary #UD at the UD2).
 *  - KVM_FEP = ud2; .ascii "kvm": KVM skips the prefix and emulates the next instruction;
 *  - with CR4.CET and SH_STK_EN in U_CET or S_CET, CALL/RET (and INT n, IRET, SYSCALL, ...)
 *    fail emulation -> #UD at the instruction after the prefix; with ENDBR_EN, indirect
 *    CALL/JMP do; KVM looks at both MSRs whatever the CPL;
 *  - everything else emulates (LEA, direct JMP, PUSH/POP, NOP);
 *  - before an MMX instruction the emulator flushes pending x87 exceptions: #MF at it
 *    (kvm-unit-tests emulator "movq mmx generates #MF"). */
#include "ktest.h"

#define FEP "ud2; .byte 0x6b, 0x76, 0x6d\n"

extern char fep_nop[], fep_nop_end[], fep_call[], fep_call_insn[], fep_ret[], fep_ret_insn[];
extern char fep_jmpind[], fep_jmpind_insn[], fep_benign[], fep_benign_end[], ufep_ret[], ufep_ret_insn[];
extern char ufep_lea[], fep_mmx[], fep_mmx_insn[];
__asm__(".text\n"
        /* 0.0 / 0.0 with every x87 exception unmasked (FCW = 0): #IA pending, FSW.ES set */
        "fep_mmx: endbr64\n push $0\n fninit\n fldcw (%rsp)\n fldz\n fldz\n fdivp\n"
        FEP "fep_mmx_insn: movq %mm0, (%rsp)\n pop %rax\n ret\n"
        "fep_nop: endbr64\n" FEP " nop\n fep_nop_end: ret\n"
        "fep_call: endbr64\n" FEP "fep_call_insn: call 1f\n 1: pop %rax\n ret\n"
        "fep_ret: endbr64\n push $0\n" FEP "fep_ret_insn: ret\n"
        "fep_jmpind: endbr64\n lea 1f(%rip), %rax\n" FEP "fep_jmpind_insn: jmp *%rax\n 1: endbr64\n ret\n"
        /* benign: LEA, direct JMP, PUSH/POP through the emulator; rax = 0x1234 at the end */
        "fep_benign: endbr64\n" FEP "lea 0x1234, %rax\n" FEP "jmp 1f\n ud2\n 1:" FEP "push %rax\n" FEP "pop %rcx\n"
        "  cmp %rax, %rcx\n jne 2f\n fep_benign_end: ret\n 2: ud2\n"
        ".pushsection .utext, \"ax\"\n"
        "ufep_ret: endbr64\n push $0\n" FEP "ufep_ret_insn: ret\n"
        "ufep_lea: endbr64\n" FEP "lea 0x66, %rdi\n mov $60, %eax\n syscall\n ud2\n"
        ".popsection\n");

static void call_at(void *where) { ((void (*)(void))where)(); }

USER_CODE static void user_fep_ret(u64 arg) { ((void (*)(void))ufep_ret)(); user_syscall(SYS_EXIT, 1); }
USER_CODE static void user_fep_lea(u64 arg) { ((void (*)(void))ufep_lea)(); }

static const char *const names[] = {
    "FEP NOP: emulated (no #UD) when the parameter is on, #UD at the UD2 when off",
    "FEP MOVQ mm with an x87 exception pending -> #MF at the MOVQ",
    "CPL0 S_CET.SH_STK_EN: FEP CALL -> #UD after the prefix",
    "CPL0 S_CET.SH_STK_EN: FEP RET -> #UD after the prefix",
    "CPL0 S_CET.ENDBR_EN: FEP JMP* -> #UD after the prefix",
    "CPL0: FEP LEA, JMP, PUSH, POP emulate",
    "CPL3 with U_CET = 0 but S_CET.SH_STK_EN: FEP RET -> #UD (KVM checks both MSRs)",
    "CPL3: FEP LEA emulates",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    bool fep = cmdline_has("fep=1");
    struct trap_record rec = {0};
    bool faulted = run_catching(call_at, fep_nop, &rec);
    tap_ok(fep ? !faulted : faulted && rec.vector == VEC_UD && rec.rip == (u64)fep_nop + 4, names[0],
           "fep %d faulted %d vector %lu rip 0x%lx", fep, faulted, rec.vector, rec.rip);
    if (!fep)
        tap_skip_rest(names, 1, N_TESTS, "boot with --force-emulation-prefix --append fep=1");
    bool mf = expect_fault(VEC_MF, -1, call_at, fep_mmx, &rec);
    __asm__ volatile("fnclex\n emms" ::: "memory");
    tap_ok(mf && rec.rip == (u64)fep_mmx_insn, names[1], "vector %lu rip 0x%lx", rec.vector, rec.rip);
    if (!cpu_has_shstk() || !cpu_has_ibt())
        tap_skip_rest(names, 2, N_TESTS, "CPUID lacks SHSTK/IBT");
    bool ud = expect_fault(VEC_UD, -1, call_at, fep_call, &rec);
    tap_ok(ud && rec.rip == (u64)fep_call_insn, names[2], "ud %d vector %lu rip 0x%lx", ud, rec.vector, rec.rip);
    ud = expect_fault(VEC_UD, -1, call_at, fep_ret, &rec);
    tap_ok(ud && rec.rip == (u64)fep_ret_insn, names[3], "ud %d vector %lu rip 0x%lx", ud, rec.vector, rec.rip);
    ud = expect_fault(VEC_UD, -1, call_at, fep_jmpind, &rec);
    tap_ok(ud && rec.rip == (u64)fep_jmpind_insn, names[4], "ud %d vector %lu rip 0x%lx", ud, rec.vector, rec.rip);
    faulted = run_catching(call_at, fep_benign, &rec);
    tap_ok(!faulted, names[5], "vector %lu rip 0x%lx", rec.vector, rec.rip);

    struct user_opts off = {.u_cet = 0, .shstk = false};
    struct user_result r = run_user(user_fep_ret, 0, &off);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_UD && r.trap.rip == (u64)ufep_ret_insn, names[6],
           "kind %d vector %lu rip 0x%lx", r.kind, r.trap.vector, r.trap.rip);
    r = run_user(user_fep_lea, 0, &off);
    tap_ok(r.kind == USER_EXITED && r.code == 0x66, names[7], "kind %d code 0x%lx vector %lu rip 0x%lx", r.kind,
           r.code, r.trap.vector, r.trap.rip);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
