/* init_state: prints the CET register state at boot, for the host to compare after RESET/INIT:
 *   cet-state u_cet=0x.. s_cet=0x.. pl0=0x.. pl1=0x.. pl2=0x.. pl3=0x.. isst=0x.. ssp=0x.. xss=0x..
 * ("-" for a register the CPUID does not enumerate).  At RESET/INIT all of them are 0
 * [KVM vmx.c/x86.c INIT/RESET]; checked here as TAP.  Then it loads non-zero values and prints them as
 *   cet-state-set ...
 * so a host that INITs the vCPU and boots again can see they were cleared. */
#include "ktest.h"

struct cet_regs { u64 u_cet, s_cet, pl[4], isst, ssp, xss; };

static void print_val(const char *name, bool present, u64 v)
{
    if (present)
        kprintf(" %s=0x%lx", name, v);
    else
        kprintf(" %s=-", name);
}

static struct cet_regs read_regs(bool cet_msrs, bool shstk, bool xss)
{
    struct cet_regs r = {0};
    if (cet_msrs) {
        r.u_cet = rdmsr(MSR_U_CET);
        r.s_cet = rdmsr(MSR_S_CET);
    }
    if (shstk) {
        for (int i = 0; i < 4; i++)
            r.pl[i] = rdmsr(MSR_PL0_SSP + i);
        r.isst = rdmsr(MSR_ISST);
    }
    if (xss)
        r.xss = rdmsr(MSR_XSS);
    r.ssp = rdssp();
    return r;
}

static void print_regs(const char *tag, const struct cet_regs *r, bool cet_msrs, bool shstk, bool xss)
{
    kprintf("%s", tag);
    print_val("u_cet", cet_msrs, r->u_cet);
    print_val("s_cet", cet_msrs, r->s_cet);
    print_val("pl0", shstk, r->pl[0]);
    print_val("pl1", shstk, r->pl[1]);
    print_val("pl2", shstk, r->pl[2]);
    print_val("pl3", shstk, r->pl[3]);
    print_val("isst", shstk, r->isst);
    print_val("ssp", true, r->ssp);
    print_val("xss", xss, r->xss);
    kprintf("\n");
}

void kmain(void)
{
    kernel_init();
    bool shstk = cpu_has_shstk(), cet_msrs = shstk || cpu_has_ibt(), xss = cpu_has_xsaves();
    struct cet_regs boot = read_regs(cet_msrs, shstk, xss);
    print_regs("cet-state", &boot, cet_msrs, shstk, xss);
    tap_plan(4);
    tap_ok((read_cr4() & CR4_CET) == 0 && boot.ssp == 0, "CR4.CET and SSP are 0 at boot",
           "cr4 0x%lx ssp 0x%lx", read_cr4(), boot.ssp);
    if (cet_msrs)
        tap_ok(boot.u_cet == 0 && boot.s_cet == 0, "U_CET and S_CET are 0 at boot",
               "u_cet 0x%lx s_cet 0x%lx", boot.u_cet, boot.s_cet);
    else
        tap_skip("U_CET and S_CET are 0 at boot", "CPUID lacks SHSTK and IBT");
    if (shstk)
        tap_ok(!(boot.pl[0] | boot.pl[1] | boot.pl[2] | boot.pl[3] | boot.isst),
               "PL0..3_SSP and INTERRUPT_SSP_TABLE are 0 at boot", "pl0 0x%lx pl3 0x%lx isst 0x%lx",
               boot.pl[0], boot.pl[3], boot.isst);
    else
        tap_skip("PL0..3_SSP and INTERRUPT_SSP_TABLE are 0 at boot", "CPUID lacks SHSTK");
    if (!cet_msrs) {
        tap_skip("non-zero CET state loaded", "CPUID lacks SHSTK and IBT");
        tap_done();
    }
    /* Load recognisable non-zero values (valid for KVM's checks) and report them. */
    u64 en = (shstk ? CET_SH_STK_EN : 0) | (cpu_has_ibt() ? CET_ENDBR_EN : 0);
    wrmsr(MSR_U_CET, en);
    wrmsr(MSR_S_CET, en & CET_ENDBR_EN);   /* no supervisor shadow stack without a token */
    if (shstk) {
        for (int i = 0; i < 4; i++)
            wrmsr(MSR_PL0_SSP + i, 0x0000000041000000ul + 0x1000ul * i + 8 * i);
        wrmsr(MSR_ISST, 0x0000000042000000ul);
    }
    u64 xss_bits = cpu_supported_xss() & (XFEATURE_CET_U | XFEATURE_CET_S);
    if (xss && xss_bits)
        wrmsr(MSR_XSS, xss_bits);
    struct cet_regs set = read_regs(cet_msrs, shstk, xss);
    print_regs("cet-state-set", &set, cet_msrs, shstk, xss);
    tap_ok(set.u_cet == en && (!shstk || set.pl[3] == 0x0000000041003018ul),
           "non-zero CET state loaded", "u_cet 0x%lx pl3 0x%lx", set.u_cet, set.pl[3]);
    tap_done();
}
