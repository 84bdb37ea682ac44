/* cet_msr_cr4: WRMSR checks on the CET MSRs and the CR0.WP/CR4.CET interlock.
 *  [SDM Vol. 4 Table 2-2] PLx_SSP: #GP if bits 1:0 != 0 or non-canonical (4-byte aligned values are legal);
 *  U/S_CET: #GP for bits 9:6, or SUPPRESS together with TRACKER; ISST: #GP if non-canonical.
 *  [SDM Vol. 3 §2.5] setting CR4.CET with CR0.WP=0 -> #GP; clearing CR0.WP with CR4.CET=1 -> #GP.
 * SKIP when CPUID has neither SHSTK nor IBT (PLx_SSP/ISST ones need SHSTK). */
#include "ktest.h"

static u64 probe_cr0, probe_cr4;
static void do_write_cr0(void *arg) { write_cr0(probe_cr0); }
static void do_write_cr4(void *arg) { write_cr4(probe_cr4); }

/* Runs before CET is on: CR4.CET=0 here. */
static void cr4_tests_pre_cet(bool any_cet)
{
    if (!any_cet) {
        tap_skip("CR4.CET with CR0.WP=0 -> #GP", "CPUID lacks SHSTK and IBT");
        tap_skip("CR4.CET with CR0.WP=1 is accepted", "CPUID lacks SHSTK and IBT");
        return;
    }
    struct trap_record rec = {0};
    u64 cr0 = read_cr0(), cr4 = read_cr4();
    write_cr0(cr0 & ~CR0_WP);
    probe_cr4 = cr4 | CR4_CET;
    bool gp = expect_fault(VEC_GP, 0, do_write_cr4, NULL, &rec);
    bool cet_clear = !(read_cr4() & CR4_CET);
    write_cr0(cr0);
    tap_ok(gp && cet_clear, "CR4.CET with CR0.WP=0 -> #GP", "faulted %d vector %lu cr4 0x%lx",
           gp, rec.vector, read_cr4());
    bool faulted = run_catching(do_write_cr4, NULL, &rec);
    bool set = (read_cr4() & CR4_CET) != 0;
    write_cr4(cr4);
    tap_ok(!faulted && set, "CR4.CET with CR0.WP=1 is accepted", "faulted %d vector %lu set %d",
           faulted, rec.vector, set);
}

static void expect_wrmsr_gp(u32 msr, u64 value, const char *name)
{
    struct trap_record rec = {0};
    u64 before = rdmsr(msr);
    bool gp = wrmsr_faults(msr, value, &rec) && rec.vector == VEC_GP && rec.error == 0;
    u64 after = rdmsr(msr);
    tap_ok(gp && before == after, name, "msr 0x%x value 0x%lx: vector %lu error %lu, 0x%lx -> 0x%lx",
           msr, value, rec.vector, rec.error, before, after);
}

static void expect_wrmsr_ok(u32 msr, u64 value, const char *name)
{
    struct trap_record rec = {0};
    u64 before = rdmsr(msr);
    bool faulted = wrmsr_faults(msr, value, &rec);
    u64 after = rdmsr(msr);
    wrmsr(msr, before);
    tap_ok(!faulted && after == value, name, "msr 0x%x value 0x%lx: faulted %d vector %lu, read 0x%lx",
           msr, value, faulted, rec.vector, after);
}

#define N_SHSTK_TESTS 6
#define N_ANY_TESTS 3

static void body(void)
{
    bool shstk = cpu_has_shstk(), any = shstk || cpu_has_ibt();
    if (shstk) {
        expect_wrmsr_gp(MSR_PL3_SSP, 0x7ffff000ul | 1, "WRMSR PL3_SSP with bit 0 set -> #GP(0)");
        expect_wrmsr_gp(MSR_PL3_SSP, 0x7ffff000ul | 2, "WRMSR PL3_SSP with bit 1 set -> #GP(0)");
        expect_wrmsr_gp(MSR_PL3_SSP, 0x0000800000000000ul, "WRMSR PL3_SSP non-canonical -> #GP(0)");
        expect_wrmsr_ok(MSR_PL3_SSP, 0x7ffff004ul, "WRMSR PL3_SSP 4-byte aligned is accepted");
        expect_wrmsr_gp(MSR_PL1_SSP, 0x1003, "WRMSR PL1_SSP misaligned -> #GP(0)");
        expect_wrmsr_gp(MSR_ISST, 0xFFFF700000000000ul, "WRMSR INTERRUPT_SSP_TABLE non-canonical -> #GP(0)");
    } else {
        for (int i = 0; i < N_SHSTK_TESTS; i++)
            tap_skip("PLx_SSP / ISST WRMSR checks", "CPUID lacks SHSTK");
    }
    if (any) {
        expect_wrmsr_gp(MSR_U_CET, 1ul << 6, "WRMSR U_CET with reserved bit 6 -> #GP(0)");
        expect_wrmsr_gp(MSR_S_CET, rdmsr(MSR_S_CET) | (1ul << 9), "WRMSR S_CET with reserved bit 9 -> #GP(0)");
        struct trap_record rec = {0};
        probe_cr0 = read_cr0() & ~CR0_WP;
        bool gp = expect_fault(VEC_GP, 0, do_write_cr0, NULL, &rec);
        tap_ok(gp && (read_cr0() & CR0_WP), "clearing CR0.WP while CR4.CET=1 -> #GP",
               "faulted vector %lu cr0 0x%lx", rec.vector, read_cr0());
    } else {
        for (int i = 0; i < N_ANY_TESTS; i++)
            tap_skip("U/S_CET WRMSR and CR0.WP checks", "CPUID lacks SHSTK and IBT");
    }
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(2 + N_SHSTK_TESTS + N_ANY_TESTS);
    cr4_tests_pre_cet(cpu_has_shstk() || cpu_has_ibt());
    cet_kernel_start(body, 0);
}
