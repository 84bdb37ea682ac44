/* shstk_farret: far RET at CPL0 with supervisor shadow stacks [SDM Vol. 1 ch. 18 far transfers].
 * A far CALL pushes CS, LIP and the old SSP on the shadow stack; a LRETQ whose data-stack
 * return address was replaced no longer matches that frame -> #CP(2) at the LRETQ.
 * Control: the unmodified far call/return works (also without CET). SKIP without SHSTK. */
#include "ktest.h"

extern char far_callee_ok[], far_callee_bad[], far_bad_lret[], far_evil[];
volatile int far_evil_ran;
struct far_ptr { u64 offset; u16 selector; } __attribute__((packed));

__asm__(".text\n"
        "far_callee_ok: endbr64\n"          /* far CALL arms the IBT tracker: ENDBR needed */
        "  mov $0x1234, %eax\n"
        "  lretq\n"
        "far_callee_bad: endbr64\n"
        "  lea far_evil(%rip), %rax\n"
        "  mov %rax, (%rsp)\n"              /* replace the far return RIP on the data stack */
        "far_bad_lret: lretq\n"
        "far_evil: endbr64\n"
        "  movl $1, far_evil_ran(%rip)\n"
        "  ret\n"
        ".globl far_call\n"
        "far_call: endbr64\n"               /* u64 far_call(struct far_ptr *) */
        "  xor %eax, %eax\n"
        "  rex64 lcall *(%rdi)\n"
        "  ret\n");
u64 far_call(struct far_ptr *p);

static void do_far_bad(void *arg)
{
    struct far_ptr p = {(u64)far_callee_bad, SEL_KCODE};
    far_call(&p);
}

static void body(void)
{
    struct far_ptr ok = {(u64)far_callee_ok, SEL_KCODE};
    u64 ssp_before = rdssp();
    u64 v = far_call(&ok);
    tap_ok(v == 0x1234 && rdssp() == ssp_before, "far CALL + LRETQ round trip at CPL0",
           "eax 0x%lx ssp 0x%lx -> 0x%lx", v, ssp_before, rdssp());
    if (!cpu_has_shstk()) {
        tap_skip("LRETQ to a forged address -> #CP(2)", "CPUID lacks SHSTK");
        tap_skip("#CP(2): RIP at the LRETQ, forged target not run", "CPUID lacks SHSTK");
        tap_done();
    }
    struct trap_record rec = {0};
    far_evil_ran = 0;
    bool cp = expect_fault(VEC_CP, CP_FAR_RET_IRET, do_far_bad, NULL, &rec);
    tap_ok(cp, "LRETQ to a forged address -> #CP(2)", "faulted vector %lu error %lu",
           rec.vector, rec.error);
    tap_ok(rec.rip == (u64)far_bad_lret && !far_evil_ran,
           "#CP(2): RIP at the LRETQ, forged target not run", "rip 0x%lx (lretq at %p) evil %d",
           rec.rip, far_bad_lret, far_evil_ran);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(3);
    cet_kernel_start(body, 0);
}
