/* xsaves_cet: XSAVES/XRSTORS of the CET supervisor state components [SDM Vol. 1 ch. 13].
 * Set U_CET, PL3_SSP (CET_U) and PL0..2_SSP (CET_S), XSAVES them with RFBM = CET_U|CET_S,
 * check the compacted layout, clobber the MSRs, XRSTORS and read them back; then XRSTORS of an
 * image holding a misaligned PL3_SSP -> #GP(0) (WRMSR checks apply to restored values).
 * SKIP without XSAVES, CET_U|CET_S in CPUID.(0xD,1).ECX, or SHSTK. */
#include "xstate.h"

static u8 area[4096] ALIGNED(64);

static inline void xsaves(void *p, u64 rfbm)
{
    __asm__ volatile("xsaves64 (%0)" ::"r"(p), "a"((u32)rfbm), "d"((u32)(rfbm >> 32)) : "memory");
}
static inline void xrstors(void *p, u64 rfbm)
{
    __asm__ volatile("xrstors64 (%0)" ::"r"(p), "a"((u32)rfbm), "d"((u32)(rfbm >> 32)) : "memory");
}
static void do_xrstors_cet(void *arg) { xrstors(arg, XFEATURE_CET_U | XFEATURE_CET_S); }

static const u32 cet_msrs[5] = {MSR_U_CET, MSR_PL3_SSP, MSR_PL0_SSP, MSR_PL1_SSP, MSR_PL2_SSP};

static void body(void)
{
    const int n = 6;
    u64 cet_bits = XFEATURE_CET_U | XFEATURE_CET_S;
    if (!cpu_has_xsaves() || (cpu_supported_xss() & cet_bits) != cet_bits || !cpu_has_shstk()) {
        for (int i = 0; i < n; i++)
            tap_skip("XSAVES/XRSTORS of CET state", "CPUID lacks XSAVES, CET xstate or SHSTK");
        tap_done();
    }
    xsave_enable_basic();
    wrmsr(MSR_XSS, cet_bits);
    u64 saved[5], test[5] = {
        CET_SH_STK_EN | (cpu_has_ibt() ? CET_ENDBR_EN : 0),
        0x00007ffff0001ff8ul, 0x0000000040abc000ul, 0x0000000040abd008ul, 0x0000000040abe010ul};
    for (int i = 0; i < 5; i++) {
        saved[i] = rdmsr(cet_msrs[i]);
        wrmsr(cet_msrs[i], test[i]);
    }
    memset(area, 0, sizeof(area));
    xsaves(area, cet_bits);
    u64 xstate_bv = *(u64 *)(area + 512), xcomp_bv = *(u64 *)(area + 520);
    tap_ok(xcomp_bv == (cet_bits | (1ul << 63)) && (xstate_bv & cet_bits) == cet_bits,
           "XSAVES header: XCOMP_BV = RFBM|bit63, XSTATE_BV has CET_U|CET_S",
           "xcomp_bv 0x%lx xstate_bv 0x%lx", xcomp_bv, xstate_bv);
    u64 off_u = xstate_compacted_offset(cet_bits, 11), off_s = xstate_compacted_offset(cet_bits, 12);
    u64 *cu = (u64 *)(area + off_u), *cs = (u64 *)(area + off_s);
    tap_ok(cu[0] == test[0] && cu[1] == test[1], "XSAVES CET_U: U_CET at +0, PL3_SSP at +8",
           "at 0x%lx: 0x%lx 0x%lx", off_u, cu[0], cu[1]);
    tap_ok(cs[0] == test[2] && cs[1] == test[3] && cs[2] == test[4],
           "XSAVES CET_S: PL0_SSP, PL1_SSP, PL2_SSP", "at 0x%lx: 0x%lx 0x%lx 0x%lx", off_s, cs[0],
           cs[1], cs[2]);
    for (int i = 0; i < 5; i++)
        wrmsr(cet_msrs[i], 0);
    xrstors(area, cet_bits);
    bool same = true;
    for (int i = 0; i < 5; i++)
        same = same && rdmsr(cet_msrs[i]) == test[i];
    tap_ok(same, "XRSTORS restores U_CET and PL0..3_SSP", "U_CET 0x%lx PL3 0x%lx PL0 0x%lx",
           rdmsr(MSR_U_CET), rdmsr(MSR_PL3_SSP), rdmsr(MSR_PL0_SSP));
    cu[1] = 0x00007ffff0001ff9ul;   /* PL3_SSP with bit 0 set */
    struct trap_record rec = {0};
    bool gp = expect_fault(VEC_GP, 0, do_xrstors_cet, area, &rec);
    tap_ok(gp, "XRSTORS of a misaligned PL3_SSP -> #GP(0)", "vector %lu error %lu", rec.vector,
           rec.error);
    cu[1] = test[1];
    cu[0] = (1ul << 10) | (1ul << 11);  /* U_CET SUPPRESS|TRACKER */
    gp = expect_fault(VEC_GP, 0, do_xrstors_cet, area, &rec);
    tap_ok(gp, "XRSTORS of U_CET with SUPPRESS|TRACKER -> #GP(0)", "vector %lu error %lu",
           rec.vector, rec.error);
    for (int i = 0; i < 5; i++)
        wrmsr(cet_msrs[i], saved[i]);
    wrmsr(MSR_XSS, 0);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(6);
    cet_kernel_start(body, 0);
}
