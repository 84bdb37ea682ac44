/* smc: self-modifying code over an instruction cetvm emulates [issue 8: kvm-unit-tests x86/realmode
 * rewrites its code].  The engine stops in front of instructions it emulates (CPUID here); when
 * the guest overwrites such an instruction with an ordinary one, the new instruction runs. */
#include "ktest.h"

extern char smc_site[], smc_insn[];
__asm__(".text\n"
        "smc_site: endbr64\n"
        "smc_insn: cpuid\n"        /* 0f a2: an exit to the hypervisor */
        "  nop\n"
        "  ret\n");

static u64 call_site(u64 leaf)
{
    u64 rax = leaf, rbx, rcx = 0, rdx;
    __asm__ volatile("call *%4" : "+a"(rax), "=b"(rbx), "+c"(rcx), "=d"(rdx) : "r"(smc_site) : "memory");
    return rax;
}

void kmain(void)
{
    kernel_init();
    tap_plan(2);
    u64 first = call_site(0);
    tap_ok(first >= 0xD, "CPUID runs at the site (max basic leaf)", "eax 0x%lx", first);
    /* mov $0x5a, %al; nop -> 3 bytes over cpuid (2) + nop (1) */
    volatile u8 *p = (volatile u8 *)smc_insn;
    p[0] = 0xB0;
    p[1] = 0x5A;
    p[2] = 0x90;
    __asm__ volatile("" ::: "memory");
    u64 second = call_site(0x1234500);
    tap_ok(second == 0x123455A, "the rewritten instruction runs instead", "rax 0x%lx", second);
    tap_done();
}
