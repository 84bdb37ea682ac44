/* no_cet: a guest whose CPUID has neither SHSTK nor IBT (the VMM hides CET) must see the CET
 * MSRs as absent (RDMSR/WRMSR -> #GP) and CR4.CET as reserved (#GP) [SDM Vol. 4 Table 2-2, SDM Vol. 3 §2.5, KVM vmx.c/x86.c].
 * When CPUID has SHSTK or IBT the checks do not apply: SKIP. */
#include "ktest.h"

static const struct { u32 msr; const char *name; } msrs[] = {
    {MSR_U_CET, "IA32_U_CET"}, {MSR_S_CET, "IA32_S_CET"}, {MSR_PL0_SSP, "IA32_PL0_SSP"},
    {MSR_PL1_SSP, "IA32_PL1_SSP"}, {MSR_PL2_SSP, "IA32_PL2_SSP"}, {MSR_PL3_SSP, "IA32_PL3_SSP"},
    {MSR_ISST, "IA32_INTERRUPT_SSP_TABLE_ADDR"},
};
#define N_MSRS (sizeof(msrs) / sizeof(msrs[0]))

static u64 probe_cr4;
static void do_write_cr4(void *arg) { write_cr4(probe_cr4); }

void kmain(void)
{
    kernel_init();
    tap_plan(N_MSRS + 2);
    bool hidden = !cpu_has_shstk() && !cpu_has_ibt();
    char name[96];
    for (unsigned i = 0; i < N_MSRS; i++) {
        const char *s = msrs[i].name;
        int k = 0;
        for (const char *p = "RDMSR/WRMSR "; *p; p++)
            name[k++] = *p;
        while (*s)
            name[k++] = *s++;
        for (const char *p = " -> #GP"; *p; p++)
            name[k++] = *p;
        name[k] = 0;
        if (!hidden) {
            tap_skip(name, "CPUID has SHSTK or IBT");
            continue;
        }
        struct trap_record r1 = {0}, r2 = {0};
        bool rd = rdmsr_faults(msrs[i].msr, NULL, &r1) && r1.vector == VEC_GP;
        bool wr = wrmsr_faults(msrs[i].msr, 0, &r2) && r2.vector == VEC_GP;
        tap_ok(rd && wr, name, "rdmsr vector %lu (faulted %d), wrmsr vector %lu (faulted %d)",
               r1.vector, r1.valid, r2.vector, r2.valid);
    }
    if (!hidden) {
        tap_skip("MOV CR4 setting CR4.CET -> #GP", "CPUID has SHSTK or IBT");
        tap_skip("WRMSR IA32_XSS with CET_U|CET_S -> #GP", "CPUID has SHSTK or IBT");
        tap_done();
    }
    struct trap_record rec = {0};
    probe_cr4 = read_cr4() | CR4_CET;
    bool gp = expect_fault(VEC_GP, 0, do_write_cr4, NULL, &rec);
    tap_ok(gp && !(read_cr4() & CR4_CET), "MOV CR4 setting CR4.CET -> #GP", "vector %lu cr4 0x%lx",
           rec.vector, read_cr4());
    gp = wrmsr_faults(MSR_XSS, XFEATURE_CET_U | XFEATURE_CET_S, &rec) && rec.vector == VEC_GP;
    tap_ok(gp, "WRMSR IA32_XSS with CET_U|CET_S -> #GP", "vector %lu valid %d", rec.vector,
           rec.valid);
    tap_done();
}
