/* bench: the guest workloads of benchmarks/bench_boot.py [issue 13], each a TAP line.
 *  Command line (decimal counts, each workload runs only when given):
 *    loop=N     the `cetvm bench` / long_run loop (CALL * -> ENDBR64; CALL * -> ENDBR64; RET ->
 *               RET; DEC; JNZ: 8 instructions an iteration) N times at CPL0, with supervisor
 *               shadow stacks and kernel IBT when the CPU has them;
 *    syscalls=N N SYSCALL -> SYSRET round trips from CPL3 with user shadow stacks (a minimal
 *               LSTAR entry: ENDBR64, CMP, JE, SYSRETQ);
 *    faults=N   N #PF -> IRETQ round trips at CPL0 with supervisor shadow stacks (a minimal #PF
 *               gate: ENDBR64, drop the error code, point RSI at the stack, IRETQ: the load is
 *               executed again and succeeds; RIP is left alone, so the shadow-stack frame of
 *               the event matches what IRETQ returns to);
 *    ports=N    N reads of COM1's line status register (port 0x3FD) at CPL0: what a Linux
 *               serial console reads for every character (cetvm: a read-only PIO register,
 *               answered without an exit to the device model);
 *    scratch=N  N reads of COM1's scratch register (port 0x3FF) at CPL0: each an exit to the
 *               VMM's device model;
 *    cpuid=N    N CPUID (leaf 0) at CPL0: each an exit the hypervisor handles itself (cetvm:
 *               KVM's exit fastpath next to the engine);
 *    pages=nx   first: the kernel image W^X in 4 KiB pages (code read-only and executable,
 *               everything else in the first 4 MiB RW and NX: stores never hit a code page);
 *    pages=rwx2m first: the first 4 MiB as two 2 MiB pages, RW and executable (code, data and
 *               stacks share pages, as in many test kernels).
 *  Without pages=, the library's map: 4 KiB RW and executable pages in the first 4 MiB. */
#include "ktest.h"

#define COM1_LSR_PORT 0x3FD
#define COM1_SCR_PORT 0x3FF

extern char bench_pf_entry[], bench_syscall_entry[];
extern char __kernel_start[], __utext_end[];
__asm__(".text\n"
        ".p2align 4\n"
        "bench_pf_entry: endbr64\n"
        "  add $8, %rsp\n"              /* the error code */
        "  mov %rsp, %rsi\n"            /* the load is retried from a mapped address */
        "  iretq\n"
        ".p2align 4\n"
        "bench_syscall_entry: endbr64\n"
        "  cmp $60, %eax\n"             /* SYS_EXIT: the library's entry ends run_user */
        "  je syscall_entry\n"
        "  sysretq\n");

#define UNMAPPED_VA 0x7f0000000000ul /* PML4 entry 254: never present */
#define PTE_ADDR 0x000FFFFFFFFFF000ul

static NOINLINE u64 kernel_faults(u64 n)
{
    __asm__ volatile("1: mov %1, %%rsi\n"
                     "  mov (%%rsi), %%eax\n" /* #PF; the handler changes RSI */
                     "  dec %0\n"
                     "  jnz 1b\n"
                     : "+r"(n) : "i"(UNMAPPED_VA) : "rax", "rsi", "memory");
    return n;
}

USER_CODE static void user_syscalls(u64 n)
{
    __asm__ volatile("1: mov $1, %%eax\n"
                     "  syscall\n"
                     "  dec %0\n"
                     "  jnz 1b\n"
                     : "+r"(n) :: "rax", "rcx", "r11", "memory");
    user_syscall(SYS_EXIT, n);
}

struct idt_gate {
    u16 offset_low, selector;
    u8 ist, type_attr;
    u16 offset_mid;
    u32 offset_high, zero;
} __attribute__((packed));

static struct idt_gate *idt_entry(unsigned vector)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    return (struct idt_gate *)idtr.base + vector;
}

static u64 *table_of(u64 entry) { return (u64 *)(entry & PTE_ADDR); }

/* The page directory of the first GiB (identity map: PML4[0] -> PDPT[0] -> PD). */
static u64 *low_pd(void) { return table_of(table_of(table_of(read_cr3())[0])[0]); }

static void pages_nx(void)
{
    for (u64 va = PAGE_SIZE; va < (4ul << 20); va += PAGE_SIZE) {
        u64 *pte = pte_lookup(va);
        if (!pte || !(*pte & PTE_P))
            continue;
        if (va >= (u64)__kernel_start && va < (u64)__utext_end)
            *pte &= ~(PTE_RW | PTE_NX); /* kernel .text and .utext: read-only, executable */
        else
            *pte |= PTE_NX;
    }
    write_cr3(read_cr3());
}

static void pages_rwx2m(void)
{
    u64 *pd = low_pd();
    for (u64 i = 0; i < 2; i++)
        pd[i] = (i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS;
    write_cr3(read_cr3());
}

static void run_loop(u64 n)
{
    struct trap_record rec = {0};
    bool faulted = false;
    struct try_state t;
    TRY(t) {
        call_chain_loop(n);
        END_TRY(t);
    } CATCH {
        faulted = true;
        rec = t.trap;
    }
    tap_ok(!faulted, "loop", "%lu iterations: vector %lu error %lu rip 0x%lx", n, rec.vector, rec.error, rec.rip);
}

static void run_faults(u64 n)
{
    struct idt_gate *gate = idt_entry(VEC_PF), saved = *gate;
    u64 handler = (u64)bench_pf_entry;
    gate->offset_low = handler & 0xFFFF;
    gate->offset_mid = (handler >> 16) & 0xFFFF;
    gate->offset_high = handler >> 32;
    u64 left = kernel_faults(n);
    *gate = saved;
    tap_ok(left == 0, "faults", "%lu #PF -> IRETQ round trips", n);
}

static void run_syscalls(u64 n)
{
    u64 lstar = rdmsr(MSR_LSTAR);
    wrmsr(MSR_LSTAR, (u64)bench_syscall_entry);
    struct user_opts opts = {.u_cet = cpu_has_shstk() ? CET_SH_STK_EN : 0, .shstk = cpu_has_shstk()};
    struct user_result r = run_user(user_syscalls, n, &opts);
    wrmsr(MSR_LSTAR, lstar);
    tap_ok(r.kind == USER_EXITED && r.code == 0, "syscalls", "%lu SYSCALL -> SYSRET round trips: kind %d code %lu", n,
           r.kind, r.code);
}

static void run_port_reads(const char *name, u16 port, u64 n)
{
    u8 last = 0;
    for (u64 i = 0; i < n; i++)
        last = inb(port);
    /* a workload, not a check: the value depends on the machine's UART model */
    tap_ok(true, name, "%lu IN from port 0x%x, the last 0x%x", n, port, last);
}

static void run_cpuids(u64 n)
{
    u32 max_leaf = 0;
    for (u64 i = 0; i < n; i++)
        max_leaf = cpuid(0, 0).eax;
    tap_ok(max_leaf != 0, "cpuid", "%lu CPUID, the last: max basic leaf 0x%x", n, max_leaf);
}

static u64 loop_n, faults_n, syscalls_n, ports_n, scratch_n, cpuid_n;

static void body(void)
{
    const char *pages = cmdline_value("pages=");
    if (pages && pages[0] == 'n')
        pages_nx();
    else if (pages && pages[0] == 'r')
        pages_rwx2m();
    kprintf("# shstk %d ibt %d pages %s\n", cet.shstk, cet.ibt, pages ? pages : "default");
    if (loop_n)
        run_loop(loop_n);
    if (faults_n)
        run_faults(faults_n);
    if (syscalls_n)
        run_syscalls(syscalls_n);
    if (ports_n)
        run_port_reads("ports", COM1_LSR_PORT, ports_n);
    if (scratch_n)
        run_port_reads("scratch", COM1_SCR_PORT, scratch_n);
    if (cpuid_n)
        run_cpuids(cpuid_n);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    loop_n = cmdline_number("loop=", 0);
    faults_n = cmdline_number("faults=", 0);
    syscalls_n = cmdline_number("syscalls=", 0);
    ports_n = cmdline_number("ports=", 0);
    scratch_n = cmdline_number("scratch=", 0);
    cpuid_n = cmdline_number("cpuid=", 0);
    tap_plan((loop_n != 0) + (faults_n != 0) + (syscalls_n != 0) + (ports_n != 0) + (scratch_n != 0)
             + (cpuid_n != 0));
    cet_kernel_start(body, 0);
}
