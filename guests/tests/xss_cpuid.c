/* xss_cpuid: the guest writes IA32_XSS and CPUID.(0xD,1).EBX follows: it is the compacted size
 * of XCR0 | XSS computed from the CPUID 0xD sub-leaves [SDM Vol. 1 ch. 13, KVM vmx.c/x86.c XSS].  Also CET_U/CET_S
 * sub-leaves (16 and 24 bytes, XSS components) and #GP for a non-enumerated XSS bit.
 * SKIP without XSAVES or without CET_U|CET_S in CPUID.(0xD,1).ECX. */
#include "xstate.h"

static void body(void)
{
    const int n = 6;
    u64 cet_bits = XFEATURE_CET_U | XFEATURE_CET_S;
    if (!cpu_has_xsaves() || (cpu_supported_xss() & cet_bits) != cet_bits) {
        for (int i = 0; i < n; i++)
            tap_skip("IA32_XSS / CPUID.(0xD,1).EBX", "CPUID lacks XSAVES or CET_U|CET_S in XSS");
        tap_done();
    }
    xsave_enable_basic();
    struct cpuid_regs u = cpuid(0xD, 11), s = cpuid(0xD, 12);
    tap_ok(u.eax == 16 && (u.ecx & 1) && s.eax == 24 && (s.ecx & 1),
           "CPUID.(0xD,11/12): CET_U 16 bytes, CET_S 24 bytes, both XSS components",
           "11: eax %u ecx 0x%x; 12: eax %u ecx 0x%x", u.eax, u.ecx, s.eax, s.ecx);

    wrmsr(MSR_XSS, 0);
    u32 ebx0 = cpuid(0xD, 1).ebx;
    tap_ok(ebx0 == xstate_compacted_size(3), "XSS=0: EBX = compacted size of XCR0",
           "ebx 0x%x expected 0x%lx", ebx0, xstate_compacted_size(3));
    wrmsr(MSR_XSS, XFEATURE_CET_U);
    u32 ebx_u = cpuid(0xD, 1).ebx;
    tap_ok(ebx_u == xstate_compacted_size(3 | XFEATURE_CET_U), "XSS=CET_U: EBX grows by CET_U",
           "ebx 0x%x expected 0x%lx", ebx_u, xstate_compacted_size(3 | XFEATURE_CET_U));
    wrmsr(MSR_XSS, cet_bits);
    u32 ebx_us = cpuid(0xD, 1).ebx;
    tap_ok(ebx_us == xstate_compacted_size(3 | cet_bits) && ebx_us > ebx0,
           "XSS=CET_U|CET_S: EBX = compacted size of XCR0|XSS", "ebx 0x%x expected 0x%lx (was 0x%x)",
           ebx_us, xstate_compacted_size(3 | cet_bits), ebx0);
    tap_ok(rdmsr(MSR_XSS) == cet_bits, "RDMSR IA32_XSS reads back CET_U|CET_S", "xss 0x%lx",
           rdmsr(MSR_XSS));
    struct trap_record rec = {0};
    bool gp = wrmsr_faults(MSR_XSS, 1ul << 0, &rec) && rec.vector == VEC_GP;  /* x87 is XCR0-only */
    tap_ok(gp && rdmsr(MSR_XSS) == cet_bits, "WRMSR IA32_XSS with a non-XSS bit -> #GP",
           "vector %lu xss 0x%lx", rec.vector, rdmsr(MSR_XSS));
    wrmsr(MSR_XSS, 0);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(6);
    cet_kernel_start(body, 0);
}
