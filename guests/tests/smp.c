/* smp: application processors under `cetvm boot --smp N` (N = 2..8).
 *  The BSP (APIC ID 0) enables CET, reads the CPU count from fw_cfg, then starts each AP with
 *  INIT + SIPI (physical destination, real mode at 0000:0000 -> 32-bit -> 64-bit, smp.S); with
 *  "x2apic" on the command line every CPU switches its APIC to x2APIC mode and all IPIs go
 *  through the ICR MSR (0x830).  Each AP
 *  reports its APIC ID (CPUID.1.EBX[31:24], CPUID.0xB EDX, the xAPIC ID register), enables CET
 *  itself (CR4.CET, S_CET = SH_STK_EN|ENDBR_EN, PL0_SSP = its own supervisor shadow stack's token,
 *  SETSSBSY) and runs indirect CALL/RET pairs to ENDBR64 functions across many scheduler turns
 *  (any #CP ends the run with "unexpected exception"), then adds to a shared counter with
 *  LOCK CMPXCHG loops while the BSP does too, then halts with interrupts on.  The BSP then sends
 *  a fixed IPI to each AP, which answers with an IPI to the BSP, and a broadcast IPI (shorthand
 *  "all excluding self").
 *  [SDM Vol. 3 §9.4.4, §11.6; SDM Vol. 1 ch. 18 (supervisor tokens, SETSSBSY)] */
#include "smp.h"

#define SHSTK_AP(cpu) (CET_REGION_BASE + 0x40000 + 0x2000ul * (cpu))
#define CALL_PAIRS 2000           /* default; the command line "pairs=N" overrides it */
#define INCREMENTS 3000
#define VEC_PING 0x50
#define VEC_PONG 0x51
#define VEC_BCAST 0x52
#define WAIT_LIMIT 20000000ul

struct ap_report {
    u32 cpuid_apic_id, x2apic_id, apic_reg_id;
    u64 cr4, s_cet, ssp_start, ssp_end, token, token_value;
    u64 pairs;
};

#define AP_STACK_SIZE 16384

static struct ap_report report[SMP_MAX_CPUS];
static u8 ap_stacks[SMP_MAX_CPUS][AP_STACK_SIZE] ALIGNED(16);
static u64 ap_token[SMP_MAX_CPUS];
static volatile int aps_done;
static volatile u64 counter;
static volatile u64 ping[SMP_MAX_CPUS], pong, bcast[SMP_MAX_CPUS];
static volatile bool go_count;
static u64 call_pairs_wanted = CALL_PAIRS;

extern void cet_enable_and_call(u64 s_cet, void (*fn)(void), int shstk);

static bool word_at(const char *p, const char *word)
{
    while (*word && *p == *word)
        p++, word++;
    return !*word && (*p == 0 || *p == ' ');
}

/* "pairs=N" (decimal) and "x2apic" (every CPU uses the x2APIC MSRs) on the command line. */
static void parse_cmdline(void)
{
    const char *p = kernel_cmdline();
    for (const char *q = p; q && *q; q++)
        if ((q == p || q[-1] == ' ') && word_at(q, "x2apic"))
            smp_x2apic = true;
    for (; p && *p; p++) {
        const char *key = "pairs=";
        int i = 0;
        while (key[i] && p[i] == key[i])
            i++;
        if (key[i])
            continue;
        u64 v = 0;
        for (p += i; *p >= '0' && *p <= '9'; p++)
            v = v * 10 + (u64)(*p - '0');
        if (v)
            call_pairs_wanted = v;
        return;
    }
}

extern char smp_outer[], smp_inner[];
__asm__(".text\n"
        "smp_inner: endbr64\n  ret\n"
        "smp_outer: endbr64\n  call *%r11\n  ret\n");

/* CALL *outer -> (ENDBR64) CALL *inner -> (ENDBR64) RET -> RET, n times. */
static NOINLINE u64 call_pairs(u64 n)
{
    u64 done = 0;
    __asm__ volatile("lea smp_inner(%%rip), %%r11\n"
                     "lea smp_outer(%%rip), %%r10\n"
                     "1: call *%%r10\n"
                     "  inc %0\n"
                     "  cmp %1, %0\n"
                     "  jb 1b\n"
                     : "+r"(done) : "r"(n) : "r10", "r11", "memory");
    return done;
}

/* counter += n with a LOCK CMPXCHG loop (load, add, compare-exchange, retry). */
static NOINLINE void count_up(u64 n)
{
    for (u64 i = 0; i < n; i++) {
        u64 old = counter, seen;
        do {
            seen = old;
            __asm__ volatile("lock cmpxchgq %2, %1"
                             : "+a"(old), "+m"(counter) : "r"(seen + 1) : "memory", "cc");
        } while (old != seen);
    }
}

static unsigned my_cpu(void) { return cpuid(1, 0).ebx >> 24; }

static void ping_handler(struct trap_frame *f)
{
    ping[my_cpu()]++;
    apic_eoi();
    apic_send_ipi(0, ICR_FIXED | VEC_PONG);
}

static void pong_handler(struct trap_frame *f)
{
    pong++;
    apic_eoi();
}

static void bcast_handler(struct trap_frame *f)
{
    bcast[apic_id()]++;
    apic_eoi();
}

static void ap_cet_main(void)
{
    unsigned cpu = my_cpu();
    struct ap_report *r = &report[cpu];
    r->cr4 = read_cr4();
    r->s_cet = rdmsr(MSR_S_CET);
    r->ssp_start = rdssp();
    r->token = ap_token[cpu];
    r->token_value = r->token ? *(volatile u64 *)r->token : 0;
    r->pairs = call_pairs(call_pairs_wanted);
    r->ssp_end = rdssp();
    while (!go_count)
        __asm__ volatile("pause");
    count_up(INCREMENTS);
    __atomic_fetch_add(&aps_done, 1, __ATOMIC_SEQ_CST);
    for (;;)
        sti_hlt();
}

static void ap_main(int cpu)
{
    struct ap_report *r = &report[cpu];
    r->cpuid_apic_id = cpuid(1, 0).ebx >> 24;
    r->x2apic_id = cpuid(0xB, 0).edx;
    if (smp_x2apic)
        apic_enter_x2apic();
    apic_enable();
    r->apic_reg_id = apic_id();
    if (!cet.shstk && !cet.ibt) {
        ap_cet_main();
        return;
    }
    if (cet.shstk)
        wrmsr(MSR_PL0_SSP, ap_token[cpu]);
    cet_enable_and_call(cet_s_cet_default(), ap_cet_main, cet.shstk);
}

static bool wait_until(volatile u64 *value, u64 target, bool halt)
{
    for (u64 i = 0; i < WAIT_LIMIT && *value < target; i++) {
        if (halt)
            sti_hlt();
        else
            __asm__ volatile("pause");
    }
    return *value >= target;
}

static void bsp_main(void)
{
    unsigned n = fw_cfg_nb_cpus();
    unsigned topo = cpuid(0xB, 1).ebx & 0xFFFF;
    tap_plan(8);
    kprintf("# %u CPUs (%s); CET at CPL0: shstk %d ibt %d\n", n, smp_x2apic ? "x2APIC" : "xAPIC", cet.shstk,
            cet.ibt);
    tap_ok(n >= 2 && n <= SMP_MAX_CPUS && topo == n && ((cpuid(1, 0).ebx >> 16) & 0xFF) == n,
           "fw_cfg NB_CPUS, CPUID.0xB and CPUID.1.EBX[23:16] agree on the CPU count", "fw_cfg %u, 0xB %u", n, topo);
    if (n < 2 || n > SMP_MAX_CPUS)
        tap_done();
    smp_init();
    irq_register(VEC_PING, ping_handler);
    irq_register(VEC_PONG, pong_handler);
    irq_register(VEC_BCAST, bcast_handler);

    unsigned started = 0;
    for (unsigned cpu = 1; cpu < n; cpu++) {
        if (cet.shstk) {
            u64 top = SHSTK_AP(cpu) + PAGE_SIZE;
            u64 token = top - 8;                 /* supervisor token: its own address, not busy */
            map_shstk_page(SHSTK_AP(cpu), false, &token, 1);
            ap_token[cpu] = token;
        }
        started += smp_start_ap(cpu, ap_main, (u64)(ap_stacks[cpu] + AP_STACK_SIZE));
    }
    tap_ok(started == n - 1, "INIT + SIPI started every AP (real mode -> long mode)", "%u of %u", started, n - 1);

    go_count = true;
    count_up(INCREMENTS);                         /* the BSP counts while the APs do */
    volatile u64 done = 0;
    for (u64 i = 0; i < WAIT_LIMIT && (done = aps_done) < n - 1; i++)
        __asm__ volatile("pause");

    bool ids = true;
    for (unsigned cpu = 1; cpu < n; cpu++) {
        struct ap_report *r = &report[cpu];
        kprintf("# AP %u: APIC ID %u (x2APIC %u, APIC %u) SSP 0x%lx token 0x%lx\n", cpu, r->cpuid_apic_id,
                r->x2apic_id, r->apic_reg_id, r->ssp_start, r->token_value);
        ids &= r->cpuid_apic_id == cpu && r->x2apic_id == cpu && r->apic_reg_id == cpu;
    }
    tap_ok(ids, "each AP reports its own APIC ID (CPUID.1, CPUID.0xB, its APIC's ID register)", "%u APs", n - 1);

    bool cet_ok = true, pairs_ok = true;
    for (unsigned cpu = 1; cpu < n; cpu++) {
        struct ap_report *r = &report[cpu];
        if (cet.shstk)
            cet_ok &= (r->cr4 & CR4_CET) && (r->s_cet & CET_SH_STK_EN) && r->ssp_start == r->token - 8 &&
                      r->token_value == (r->token | 1);          /* SETSSBSY + CALL */
        if (cet.ibt)
            cet_ok &= (r->cr4 & CR4_CET) && (r->s_cet & CET_ENDBR_EN);
        pairs_ok &= r->pairs == call_pairs_wanted && r->ssp_end == r->ssp_start;
    }
    if (!cet.shstk && !cet.ibt)
        tap_skip("each AP enabled CET on its own supervisor shadow stack", "CPUID lacks SHSTK and IBT");
    else
        tap_ok(cet_ok, "each AP enabled CET on its own supervisor shadow stack (busy token)", "S_CET 0x%lx",
               report[1].s_cet);
    tap_ok(pairs_ok && done == n - 1, "each AP ran indirect CALL/RET pairs under CET with no #CP",
           "%lu APs done, %lu pairs each", (u64)done, call_pairs_wanted);
    tap_ok(counter == (u64)n * INCREMENTS, "shared counter: LOCK CMPXCHG increments from every CPU",
           "%lu of %lu", (u64)counter, (u64)n * INCREMENTS);

    bool pings = true;
    for (unsigned cpu = 1; cpu < n; cpu++) {
        apic_send_ipi(cpu, ICR_FIXED | VEC_PING);
        pings &= wait_until(&pong, cpu, true) && ping[cpu] == 1;
    }
    tap_ok(pings && pong == n - 1, "fixed IPI to each AP (physical destination), answered by an IPI back",
           "pong %lu", (u64)pong);

    apic_send_ipi(0, ICR_ALL_BUT_SELF | ICR_FIXED | VEC_BCAST);
    bool all = true;
    for (unsigned cpu = 1; cpu < n; cpu++)
        all &= wait_until(&bcast[cpu], 1, false);
    tap_ok(all && bcast[0] == 0, "broadcast IPI (all excluding self) reaches every AP, not the BSP", "BSP %lu",
           (u64)bcast[0]);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    parse_cmdline();
    cet.shstk = cpu_has_shstk();
    cet.ibt = cpu_has_ibt();
    cet_kernel_start(bsp_main, 0);
}
