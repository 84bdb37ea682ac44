/* vex_gpr: BMI1/BMI2 (VEX-encoded general-purpose instructions) run whatever CR4.OSFXSR is
 * [issue 10: Linux's decompressor runs zstd's SHLX/SHRX with CR4 = PAE alone; SDM Vol. 2 §2.3.5:
 * only VEX instructions on XMM/YMM state depend on CR4.OSXSAVE, none on CR4.OSFXSR]. The engine
 * under cetvm decodes VEX only with CR4.OSFXSR set (cpu.registers.ENGINE_FORCED_CR4), so cetvm
 * keeps that bit set underneath and the guest's own value beside it:
 *  - with CR4.OSFXSR = 0: SHLX, SHRX, SARX, RORX, BZHI, ANDN, PDEP, MULX give their results;
 *  - MOV from CR4 shows the guest's OSFXSR (0, then 1 after setting it again);
 *  - MOV from CR4 at CPL3 -> #GP(0). */
#include "ktest.h"

#define CR4_OSFXSR (1ul << 9)

extern char user_read_cr4[];
__asm__(".pushsection .utext, \"ax\"\n"
        "user_read_cr4: endbr64\n mov %cr4, %rax\n ud2\n"
        ".popsection\n");

static const char *names[] = {
    "SHLX/SHRX/SARX/RORX with CR4.OSFXSR = 0",
    "BZHI/ANDN/PDEP/MULX with CR4.OSFXSR = 0",
    "MOV from CR4 shows the guest's OSFXSR = 0",
    "MOV from CR4 shows OSFXSR = 1 once the guest sets it",
    "MOV from CR4 at CPL3 -> #GP(0)",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    u64 cr4 = read_cr4();
    write_cr4(cr4 & ~CR4_OSFXSR);

    u64 one = 1, shift = 5, neg = -64ul, val = 0x8000000000000001ul, shl, shr, sar, ror;
    __asm__ volatile("shlx %2, %1, %0" : "=r"(shl) : "r"(one), "r"(shift));
    __asm__ volatile("shrx %2, %1, %0" : "=r"(shr) : "r"(val), "r"(shift));
    __asm__ volatile("sarx %2, %1, %0" : "=r"(sar) : "r"(neg), "r"(shift));
    __asm__ volatile("rorx $4, %1, %0" : "=r"(ror) : "r"(val));
    tap_ok(shl == 32 && shr == 0x0400000000000000ul && sar == -2ul && ror == 0x1800000000000000ul, names[0],
           "shlx 0x%lx shrx 0x%lx sarx 0x%lx rorx 0x%lx", shl, shr, sar, ror);

    u64 bzhi, andn, pdep, lo, hi, idx = 8, mask = 0xF0F0, src = 0xFFFF, x = 3, y = 0x8000000000000000ul;
    __asm__ volatile("bzhi %2, %1, %0" : "=r"(bzhi) : "r"(src), "r"(idx));
    __asm__ volatile("andn %2, %1, %0" : "=r"(andn) : "r"(mask), "r"(src));
    __asm__ volatile("pdep %2, %1, %0" : "=r"(pdep) : "r"(src), "r"(mask));
    __asm__ volatile("mulx %3, %0, %1" : "=r"(lo), "=r"(hi) : "d"(x), "r"(y));
    tap_ok(bzhi == 0xFF && andn == 0x0F0F && pdep == 0xF0F0 && lo == 0x8000000000000000ul && hi == 1, names[1],
           "bzhi 0x%lx andn 0x%lx pdep 0x%lx mulx 0x%lx:0x%lx", bzhi, andn, pdep, hi, lo);

    u64 seen = read_cr4();
    tap_ok(seen == (cr4 & ~CR4_OSFXSR), names[2], "CR4 0x%lx (was 0x%lx)", seen, cr4);
    write_cr4(cr4 | CR4_OSFXSR);
    seen = read_cr4();
    tap_ok(seen == (cr4 | CR4_OSFXSR), names[3], "CR4 0x%lx", seen);
    write_cr4(cr4);

    struct user_opts opts = {0};
    struct user_result r = run_user((void (*)(u64))user_read_cr4, 0, &opts);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_GP && r.trap.error == 0 &&
               r.trap.rip == (u64)user_read_cr4 + 4, names[4], "kind %d vector %lu error 0x%lx rip 0x%lx",
           r.kind, r.trap.vector, r.trap.error, r.trap.rip);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
