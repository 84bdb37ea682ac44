/* exit_fastpath: CPUID and VMCALL answered next to the engine (issue 13, cetfast.c exit_fastpath —
 * exits KVM handles in the kernel, answered without leaving the CPU's run, as KVM's exit
 * fastpath answers them) are the exits KVM handles:
 *  - each CPUID costs the guest an exit's time: the TSC advances by at least VM_EXIT_NS (1 us,
 *    2,000 ticks of the 2 GHz TSC) per CPUID, measured over a run of them
 *    (cetvm.kvm.timekeeping; kvm-unit-tests' vmexit_cpuid measures the same);
 *  - the answer follows the vCPU's state as kvm_cpuid's does: CPUID.1:ECX.OSXSAVE[27] is
 *    CR4.OSXSAVE, set and cleared in a row; leaf 7 sub-leaf 0 shows CET_SS and IBT, the
 *    sub-leaf counts (CPUID.(7,1) differs from (7,0));
 *  - CPUID clears the upper halves of RAX, RBX, RCX and RDX;
 *  - VMCALL of a hypercall KVM does not implement returns -KVM_ENOSYS in RAX, one exit's time
 *    each, and the instruction after it runs (RIP past the 3 bytes).
 * The ticks are printed: the host test (tests/boot/test_boot_native_exits.py) compares the
 * console with the Python path's (CETVM_NATIVE_EVENTS=0), byte for byte. */
#include "ktest.h"

#define ROUNDS 1000
#define EXIT_TICKS 2000 /* VM_EXIT_NS at the 2 GHz TSC */
#define CPUID1_ECX_OSXSAVE (1u << 27)
#define CPUID7_ECX_CET_SS (1u << 7)
#define CPUID7_EDX_IBT (1u << 20)
#define KVM_ENOSYS 1000

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

void kmain(void)
{
    kernel_init();
    tap_plan(7);

    u64 start = rdtsc();
    for (int i = 0; i < ROUNDS; i++)
        (void)cpuid(0, 0);
    u64 ticks = rdtsc() - start;
    kprintf("# %d CPUIDs took %lu TSC ticks\n", ROUNDS, ticks);
    tap_ok(ticks >= (u64)ROUNDS * EXIT_TICKS && ticks < (u64)ROUNDS * (EXIT_TICKS + 200),
           "each CPUID costs an exit's guest time", "%lu ticks for %d", ticks, ROUNDS);

    u64 cr4 = read_cr4();
    bool follows = true;
    for (int i = 0; i < 50 && follows; i++) {
        write_cr4(cr4 | CR4_OSXSAVE);
        bool on = cpuid(1, 0).ecx & CPUID1_ECX_OSXSAVE;
        write_cr4(cr4 & ~CR4_OSXSAVE);
        bool off = cpuid(1, 0).ecx & CPUID1_ECX_OSXSAVE;
        follows = on && !off;
    }
    write_cr4(cr4);
    tap_ok(follows, "CPUID.1:ECX.OSXSAVE follows CR4.OSXSAVE", "cr4 0x%lx", cr4);

    struct cpuid_regs l7 = cpuid(7, 0), l7s1 = cpuid(7, 1);
    tap_ok((l7.ecx & CPUID7_ECX_CET_SS) && (l7.edx & CPUID7_EDX_IBT), "CPUID.(7,0) shows CET_SS and IBT",
           "ecx 0x%x edx 0x%x", l7.ecx, l7.edx);
    tap_ok(l7s1.eax != l7.eax || l7s1.ecx != l7.ecx || l7s1.edx != l7.edx, "the sub-leaf counts",
           "(7,0) eax 0x%x (7,1) eax 0x%x", l7.eax, l7s1.eax);

    u64 rbx = ~0ul, rcx = ~0ul, rdx = ~0ul, rax = 0;
    __asm__ volatile("cpuid" : "+a"(rax), "+b"(rbx), "+c"(rcx), "+d"(rdx));
    tap_ok(rax >> 32 == 0 && rbx >> 32 == 0 && rcx >> 32 == 0 && rdx >> 32 == 0,
           "CPUID clears the upper halves", "rbx 0x%lx rcx 0x%lx", rbx, rcx);
    kprintf("# leaf 0: 0x%lx 0x%lx 0x%lx 0x%lx\n", rax, rbx, rcx, rdx);

    bool enosys = true;
    u64 result = 0;
    start = rdtsc();
    for (int i = 0; i < ROUNDS && enosys; i++) {
        u64 nr = 0x7777;
        __asm__ volatile("vmcall" : "+a"(nr) : "b"(1ul), "c"(2ul), "d"(3ul), "S"(4ul) : "memory");
        result = nr;
        enosys = result == (u64)-KVM_ENOSYS;
    }
    ticks = rdtsc() - start;
    kprintf("# %d VMCALLs took %lu TSC ticks\n", ROUNDS, ticks);
    tap_ok(enosys, "VMCALL of an unknown hypercall returns -KVM_ENOSYS", "rax 0x%lx", result);
    tap_ok(ticks >= (u64)ROUNDS * EXIT_TICKS && ticks < (u64)ROUNDS * (EXIT_TICKS + 200),
           "each VMCALL costs an exit's guest time", "%lu ticks for %d", ticks, ROUNDS);
    tap_done();
}
