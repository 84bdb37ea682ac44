/* clocks: the clocks a KVM guest kernel (Linux with CONFIG_KVM_GUEST) uses.
 * - TSC: RDTSC/RDTSCP [SDM Vol. 2B], IA32_TSC_AUX in ECX, CR4.TSD -> #GP(0) at CPL3, WRMSR of
 *   IA32_TIME_STAMP_COUNTER [SDM Vol. 3 §18.17], the rate in CPUID.15H/16H [SDM Vol. 2A CPUID]
 *   and against the local APIC timer (1 GHz bus, divide by 1).
 * - kvmclock [Documentation/virt/kvm/x86/msr.rst]: CPUID 0x40000000/1 (KVM_FEATURE_CLOCKSOURCE2,
 *   CLOCKSOURCE_STABLE_BIT), MSR_KVM_SYSTEM_TIME_NEW's pvclock_vcpu_time_info (even version,
 *   PVCLOCK_TSC_STABLE_BIT, mul/shift), MSR_KVM_WALL_CLOCK_NEW, the legacy MSRs #GP.
 * - CMOS RTC (MC146818A at ports 0x70/0x71): registers A-D, BCD/binary, 12/24 h, SET, the
 *   memory-size bytes.
 * - LAPIC TSC-deadline mode [SDM Vol. 3 §11.5.4.1]: IA32_TSC_DEADLINE fires when the TSC reaches
 *   it, clears itself, 0 disarms, ignored outside the mode.
 * - VM exits take guest time, as on real KVM where the TSC runs on while the host handles one:
 *   cetvm's rule is 1 us per exit (KVM's in cetvm.kvm.timekeeping), whoever handles it (a CPUID
 *   in KVM, a port read in the VMM), charged when the exit happens (a timer programmed by an
 *   exiting write starts when the exit ends; a HLT pays before the vCPU sleeps). The checks
 *   that time a stretch with exits in it allow one measured exit cost per exit.
 * Lines starting "# t" print clock values: a deterministic machine prints the same ones on every
 * run and after a snapshot restore. */
#include "ktest.h"

#define MSR_TSC 0x10u
#define MSR_TSC_AUX 0xC0000103u
#define MSR_TSC_DEADLINE 0x6E0u
#define MSR_KVM_WALL_CLOCK 0x11u
#define MSR_KVM_SYSTEM_TIME 0x12u
#define MSR_KVM_WALL_CLOCK_NEW 0x4B564D00u
#define MSR_KVM_SYSTEM_TIME_NEW 0x4B564D01u
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define KVM_FEATURE_CLOCKSOURCE_STABLE_BIT (1u << 24)
#define PVCLOCK_TSC_STABLE_BIT 1u
#define CR4_TSD (1ul << 2)

#define PCD_PWT ((1ul << 4) | (1ul << 3))
#define APIC_PHYS 0xFEE00000ul
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_LVTT 0x320
#define APIC_TMICT 0x380
#define APIC_TDCR 0x3E0
#define LVT_TSC_DEADLINE (2u << 17)
#define TDCR_DIV1 0xB
#define VEC_ONESHOT 0x50
#define VEC_DEADLINE 0x51

#define RTC_INDEX 0x70
#define RTC_DATA 0x71

static void apic_write(u32 reg, u32 v) { *(volatile u32 *)(APIC_PHYS + reg) = v; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}

static inline u64 rdtscp(u32 *aux)
{
    u32 lo, hi, c;
    __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(c));
    *aux = c;
    return (u64)hi << 32 | lo;
}

static void spin(u64 n)
{
    for (volatile u64 i = 0; i < n; i++)
        ;
}

static volatile u64 irq_tsc[256];
static volatile u64 irq_count[256];

static void timer_irq(struct trap_frame *f)
{
    irq_tsc[f->vector] = rdtsc();
    irq_count[f->vector]++;
    apic_write(APIC_EOI, 0);
}

static void wait_irq(unsigned vector, u64 n)
{
    while (irq_count[vector] < n)
        sti_hlt();
}

static u64 tsc_hz;
/* TSC ticks one VM exit costs, measured with CPUID (test_exit_cost) */
static u64 exit_ticks;

struct pvclock_vcpu_time_info {
    u32 version, pad0;
    u64 tsc_timestamp, system_time;
    u32 tsc_to_system_mul;
    signed char tsc_shift;
    u8 flags, pad[2];
};
struct pvclock_wall_clock { u32 version, sec, nsec; };

static volatile struct pvclock_vcpu_time_info pvti ALIGNED(64);
static volatile struct pvclock_wall_clock wall ALIGNED(64);

/* ---------------------------------------------------------------- TSC */
static void test_cpuid_rate(void)
{
    struct cpuid_regs l15 = cpuid(0x15, 0), l16 = cpuid(0x16, 0);
    bool stated = cpuid(0, 0).eax >= 0x16 && l15.eax && l15.ebx && l15.ecx;
    bool intel = cpuid(0, 0).ebx == 0x756e6547;  /* "Genu" */
    if (!intel) {  /* AMD: no 15H; the rate is kvmclock's (Linux kvm_get_tsc_khz) */
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&pvti | 1);
        u64 hz = (1000000000ul << 32) / pvti.tsc_to_system_mul;
        tsc_hz = pvti.tsc_shift >= 0 ? hz >> pvti.tsc_shift : hz << -pvti.tsc_shift;
        tap_skip("CPUID.15H states the TSC rate", "not an Intel CPU");
        tap_skip("CPUID.16H agrees", "not an Intel CPU");
        kprintf("# TSC %lu Hz\n", tsc_hz);
        return;
    }
    if (stated)
        tsc_hz = (u64)l15.ecx * l15.ebx / l15.eax;
    tap_ok(stated && tsc_hz >= 100000000ul, "CPUID.15H states the TSC rate (crystal x ratio)",
           "max leaf 0x%x, 15H %u/%u/%u", cpuid(0, 0).eax, l15.eax, l15.ebx, l15.ecx);
    tap_ok(stated && l16.eax == tsc_hz / 1000000 && l16.ebx == l16.eax && l15.ecx / 1000000 == l16.ecx,
           "CPUID.16H base/max MHz = TSC rate, bus MHz = the crystal", "16H %u %u %u", l16.eax, l16.ebx, l16.ecx);
    kprintf("# TSC %lu Hz\n", tsc_hz);
}

static void test_rdtsc_monotonic(void)
{
    u64 prev = rdtsc(), bad = 0, first = prev;
    for (int i = 0; i < 1000; i++) {
        u64 now = rdtsc();
        if (now <= prev)
            bad++;
        prev = now;
    }
    tap_ok(bad == 0, "RDTSC strictly increases over 1000 reads", "%lu non-increasing", bad);
    kprintf("# t rdtsc %lu .. %lu\n", first, prev);
}

/* ---------------------------------------------------------------- VM exits take guest time */

/* TSC ticks per iteration of a loop around one instruction: CPUID (an exit KVM handles) or,
 * with the same registers, NOP (no exit) */
static u64 ticks_per_cpuid(bool exiting, int n)
{
    u64 t0 = rdtsc();
    for (int i = 0; i < n; i++) {
        u32 a = 0, b, c = 0, d;
        if (exiting)
            __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
        else
            __asm__ volatile("nop" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    }
    return (rdtsc() - t0) / n;
}

#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_B 0x61

/* Polls of port 0x61 until the PIT's channel 2 has counted ``ms`` milliseconds (mode 0: OUT2,
 * bit 5, rises at the end), at most ``cap`` */
static u64 pit_polls(unsigned ms, u64 cap)
{
    u32 count = 1193182u * ms / 1000;
    outb(PORT_B, (inb(PORT_B) & ~2u) | 1);  /* gate 2 on, speaker off */
    outb(PIT_CMD, 0xB0);                   /* channel 2, LSB then MSB, mode 0 */
    outb(PIT_CH2, count & 0xFF);
    outb(PIT_CH2, count >> 8);
    u64 polls = 0;
    while (!(inb(PORT_B) & 0x20) && polls < cap)
        polls++;
    outb(PORT_B, inb(PORT_B) & ~1u);
    return polls;
}

static void test_exit_cost(void)
{
    const u64 us = tsc_hz / 1000000;
    u64 with = ticks_per_cpuid(true, 1000), without = ticks_per_cpuid(false, 1000);
    exit_ticks = with - without;
    tap_ok(with > without && exit_ticks >= us && exit_ticks <= us + us / 10,
           "a VM exit (CPUID, handled by KVM) takes 1 us of guest time", "%lu ticks per CPUID loop, %lu per NOP loop",
           with, without);
    kprintf("# t exit: %lu TSC ticks\n", exit_ticks);

    /* an exit to the VMM costs the same: a 30 ms PIT count ends after ~30,000 polls of port 0x61
     * (Linux's verify_pmtmr_rate / pit_calibrate_tsc poll like this); free exits would make
     * it millions (the cap stops the loop) */
    u64 polls = pit_polls(30, 40000);
    tap_ok(polls > 27000 && polls <= 30000, "an I/O exit takes 1 us too: a 30 ms PIT count is ~30,000 polls",
           "%lu polls", polls);
}

static void test_tsc_vs_apic_timer(void)
{
    const u64 count = 100000;  /* APIC bus 1 GHz, divide by 1: 100 us */
    irq_register(VEC_ONESHOT, timer_irq);
    apic_write(APIC_TDCR, TDCR_DIV1);
    apic_write(APIC_LVTT, VEC_ONESHOT);
    u64 t0 = rdtsc();
    apic_write(APIC_TMICT, (u32)count);
    wait_irq(VEC_ONESHOT, 1);
    u64 ticks = irq_tsc[VEC_ONESHOT] - t0, expect = count * (tsc_hz / 1000000) / 1000;
    /* the TMICT write is an exit: the count starts when it ends */
    tap_ok(ticks >= expect + exit_ticks && ticks < expect + expect / 100 + exit_ticks,
           "a 100 us APIC one-shot timer lasts 100 us of TSC (CPUID.15H rate)", "%lu ticks, expected %lu",
           ticks, expect);
    kprintf("# t apic one-shot: %lu TSC ticks\n", ticks);
}

static void test_rdtscp(void)
{
    wrmsr(MSR_TSC_AUX, 0x1234abcd);
    u32 aux = 0;
    u64 a = rdtsc(), b = rdtscp(&aux), c = rdtsc();
    tap_ok(aux == 0x1234abcd && a < b && b < c, "RDTSCP: ECX = IA32_TSC_AUX, EDX:EAX between two RDTSCs",
           "aux 0x%x, %lu %lu %lu", aux, a, b, c);
}

static void do_rdtsc(void *arg) { *(u64 *)arg = rdtsc(); }

USER_CODE static void user_rdtsc(u64 arg)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    user_syscall(SYS_EXIT, ((u64)hi << 32 | lo) != 0);
}

static void test_cr4_tsd(void)
{
    struct user_opts o = {.u_cet = cet.shstk ? CET_SH_STK_EN : 0, .shstk = cet.shstk};
    struct user_result r = run_user(user_rdtsc, 0, &o);
    tap_ok(r.kind == USER_EXITED && r.code == 1, "RDTSC at CPL3 with CR4.TSD = 0", "kind %d code %lu",
           r.kind, r.code);
    write_cr4(read_cr4() | CR4_TSD);
    r = run_user(user_rdtsc, 0, &o);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_GP && r.trap.error == 0,
           "RDTSC at CPL3 with CR4.TSD = 1 -> #GP(0)", "kind %d vector %lu error %lu", r.kind, r.trap.vector,
           r.trap.error);
    struct trap_record rec = {0};
    u64 value = 0;
    tap_ok(!run_catching(do_rdtsc, &value, &rec) && value, "RDTSC at CPL0 with CR4.TSD = 1 works",
           "vector %lu", rec.vector);
    write_cr4(read_cr4() & ~CR4_TSD);
}

static void test_tsc_write(void)
{
    const u64 target = 1ul << 40;
    wrmsr(MSR_TSC, target);
    u64 a = rdtsc(), m = rdmsr(MSR_TSC);  /* the RDMSR exits (KVM reads the TSC for it) */
    tap_ok(a >= target && a < target + 1000 && m > a && m < a + 1000 + exit_ticks,
           "WRMSR IA32_TIME_STAMP_COUNTER: RDTSC and RDMSR continue from the value", "%lu %lu", a, m);
    kprintf("# t after WRMSR TSC: %lu\n", a - target);
}

/* ---------------------------------------------------------------- kvmclock */

/* The guest side of pvclock (Linux pvclock_clocksource_read): retry while the version is odd
 * or changed; time = system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32. */
static u64 pvclock_read(u64 *tsc_out)
{
    u32 version;
    u64 ns, tsc;
    do {
        version = pvti.version;
        __asm__ volatile("" ::: "memory");
        tsc = rdtsc();
        u64 delta = tsc - pvti.tsc_timestamp;
        delta = pvti.tsc_shift >= 0 ? delta << pvti.tsc_shift : delta >> -pvti.tsc_shift;
        ns = pvti.system_time + (u64)(((unsigned __int128)delta * pvti.tsc_to_system_mul) >> 32);
        __asm__ volatile("" ::: "memory");
    } while ((version & 1) || version != pvti.version);
    *tsc_out = tsc;
    return ns;
}

static bool msr_faults_gp(u32 msr, u64 value)
{
    struct trap_record rec = {0};
    return wrmsr_faults(msr, value, &rec) && rec.vector == VEC_GP;
}

static void test_kvmclock(void)
{
    struct cpuid_regs sig = cpuid(0x40000000, 0), feat = cpuid(0x40000001, 0);
    bool kvm = sig.ebx == 0x4b4d564b && sig.ecx == 0x564b4d56 && sig.edx == 0x4d && sig.eax >= 0x40000001;
    u32 want = KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;
    tap_ok(kvm && (feat.eax & want) == want, "CPUID 0x40000001: KVM_FEATURE_CLOCKSOURCE2 + CLOCKSOURCE_STABLE_BIT",
           "0x40000000 eax 0x%x, 0x40000001 eax 0x%x", sig.eax, feat.eax);
    tap_ok(msr_faults_gp(MSR_KVM_SYSTEM_TIME, (u64)&pvti | 1) && msr_faults_gp(MSR_KVM_WALL_CLOCK, (u64)&wall),
           "legacy kvmclock MSRs 0x11/0x12 #GP (KVM_FEATURE_CLOCKSOURCE not advertised)", "%s", "no #GP");

    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&pvti | 1);
    tap_ok(rdmsr(MSR_KVM_SYSTEM_TIME_NEW) == ((u64)&pvti | 1) && pvti.version && !(pvti.version & 1) &&
               (pvti.flags & PVCLOCK_TSC_STABLE_BIT),
           "MSR_KVM_SYSTEM_TIME_NEW publishes pvclock_vcpu_time_info (even version, TSC_STABLE)",
           "version %u flags 0x%x", pvti.version, pvti.flags);
    u64 tsc1, tsc2;
    u64 ns1 = pvclock_read(&tsc1);
    spin(20000);
    u64 ns2 = pvclock_read(&tsc2);
    u64 expect = (tsc2 - tsc1) * 1000000000ul / tsc_hz;
    tap_ok(ns2 > ns1 && ns2 - ns1 + 1 >= expect && ns2 - ns1 <= expect + 1,
           "kvmclock advances at the TSC's CPUID.15H rate", "%lu ns for %lu ticks (expected %lu ns)",
           ns2 - ns1, tsc2 - tsc1, expect);
    kprintf("# t kvmclock %lu ns at TSC %lu (mul %u shift %d)\n", ns1, tsc1, pvti.tsc_to_system_mul, pvti.tsc_shift);

    /* a TSC write moves the TSC, not kvmclock: KVM republishes the pair, and kvmclock goes on
     * from where it was by the time the WRMSR's exit took */
    u64 tsc_before, before = pvclock_read(&tsc_before);
    wrmsr(MSR_TSC, 1ul << 44);
    u64 tsc3, ns3 = pvclock_read(&tsc3);
    u64 exit_ns = exit_ticks * 1000000000ul / tsc_hz;
    tap_ok(tsc3 >= 1ul << 44 && ns3 > before && ns3 - before < exit_ns + 1000,
           "after WRMSR IA32_TSC kvmclock still continues", "%lu ns after %lu (an exit is %lu ns)", ns3, before,
           exit_ns);

    wrmsr(MSR_KVM_WALL_CLOCK_NEW, (u64)&wall);
    tap_ok(!(wall.version & 1) && wall.version && wall.sec > 1600000000u && wall.nsec < 1000000000u,
           "MSR_KVM_WALL_CLOCK_NEW publishes pvclock_wall_clock", "version %u sec %u nsec %u", wall.version,
           wall.sec, wall.nsec);
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
    u32 v = pvti.version;
    wrmsr(MSR_TSC, 1ul << 45);
    tap_ok(pvti.version == v && rdmsr(MSR_KVM_SYSTEM_TIME_NEW) == 0, "kvmclock disabled by writing 0: no more updates",
           "version %u -> %u", v, pvti.version);
}

/* ---------------------------------------------------------------- CMOS RTC */
static u8 cmos_read(u8 reg)
{
    outb(RTC_INDEX, reg);
    return inb(RTC_DATA);
}

static void cmos_write(u8 reg, u8 v)
{
    outb(RTC_INDEX, reg);
    outb(RTC_DATA, v);
}

static unsigned bcd(u8 v) { return (v >> 4) * 10 + (v & 0xF); }

struct rtc_time { unsigned sec, min, hour, wday, mday, mon, year; };

/* Read the time after UIP clears, in the current format (binary or BCD, 12 or 24 h). */
static struct rtc_time rtc_read(void)
{
    while (cmos_read(0x0A) & 0x80)
        ;
    u8 b = cmos_read(0x0B);
    unsigned (*dec)(u8) = (b & 4) ? NULL : bcd;
    u8 raw[7] = {cmos_read(0), cmos_read(2), cmos_read(4), cmos_read(6), cmos_read(7), cmos_read(8), cmos_read(9)};
    u8 century = cmos_read(0x32);
    unsigned v[7];
    for (int i = 0; i < 7; i++)
        v[i] = dec ? dec(raw[i] & (i == 2 && !(b & 2) ? 0x7F : 0xFF)) : (raw[i] & (i == 2 && !(b & 2) ? 0x7F : 0xFF));
    if (!(b & 2))  /* 12-hour: 12 AM = 0, 12 PM = 12 */
        v[2] = v[2] % 12 + ((raw[2] & 0x80) ? 12 : 0);
    struct rtc_time t = {v[0], v[1], v[2], v[3], v[4], v[5], (dec ? dec(century) : century) * 100 + v[6]};
    return t;
}

static u64 rtc_seconds_of_day(struct rtc_time t) { return t.hour * 3600ul + t.min * 60ul + t.sec; }

static void test_rtc(void)
{
    u8 a = cmos_read(0x0A), b = cmos_read(0x0B), d = cmos_read(0x0D);
    tap_ok((a & 0x7F) == 0x26 && b == 0x02 && d == 0x80, "RTC registers A/B/D at reset: 0x26, 24h BCD, VRT",
           "A 0x%x B 0x%x D 0x%x", a, b, d);
    struct rtc_time t = rtc_read();
    kprintf("# t rtc %u-%u-%u %u:%u:%u wday %u\n", t.year, t.mon, t.mday, t.hour, t.min, t.sec, t.wday);
    tap_ok(t.year >= 2000 && t.mon >= 1 && t.mon <= 12 && t.mday >= 1 && t.mday <= 31 && t.hour < 24 &&
               t.min < 60 && t.sec < 60 && t.wday >= 1 && t.wday <= 7,
           "RTC time registers hold a valid BCD date", "%u-%u-%u %u:%u:%u", t.year, t.mon, t.mday, t.hour, t.min,
           t.sec);

    /* kvmclock's wall clock + kvmclock = the RTC's time (same epoch, same guest time) */
    wrmsr(MSR_KVM_SYSTEM_TIME_NEW, (u64)&pvti | 1);
    u64 tsc, now = pvclock_read(&tsc);
    u64 wall_sec = wall.sec + (wall.nsec + now) / 1000000000ul;
    tap_ok(wall_sec % 86400 >= rtc_seconds_of_day(t) && wall_sec % 86400 <= rtc_seconds_of_day(t) + 1,
           "kvmclock wall clock agrees with the RTC", "wall %lu s of day, rtc %lu", wall_sec % 86400,
           rtc_seconds_of_day(t));

    /* about 1.5 s of halted guest time: the RTC's seconds advance */
    apic_write(APIC_LVTT, VEC_ONESHOT);
    apic_write(APIC_TDCR, TDCR_DIV1);
    u64 before = irq_count[VEC_ONESHOT];
    apic_write(APIC_TMICT, 1500000000u);
    wait_irq(VEC_ONESHOT, before + 1);
    struct rtc_time t2 = rtc_read();
    u64 s1 = rtc_seconds_of_day(t), s2 = rtc_seconds_of_day(t2);
    tap_ok(s2 == s1 + 1 || s2 == s1 + 2, "RTC seconds advance with guest time (1.5 s)", "%lu -> %lu", s1, s2);

    /* 12-hour binary format, then set the time with SET */
    cmos_write(0x0B, 0x04);
    struct rtc_time t3 = rtc_read();
    tap_ok(cmos_read(0x0B) == 0x04 && t3.year == t2.year && rtc_seconds_of_day(t3) >= s2 &&
               rtc_seconds_of_day(t3) <= s2 + 1,
           "binary 12-hour format reads the same time", "%u:%u:%u", t3.hour, t3.min, t3.sec);
    cmos_write(0x0B, 0x84);                    /* SET, binary, 12 h */
    cmos_write(4, 0x80 | 1);                   /* 1 PM */
    cmos_write(2, 30);
    cmos_write(0, 5);
    u8 frozen = cmos_read(0);
    cmos_write(0x0B, 0x04);                    /* run (the registers are read as written) */
    cmos_write(0x0B, 0x06);                    /* binary, 24 h */
    struct rtc_time t4 = rtc_read();
    tap_ok(frozen == 5 && t4.hour == 13 && t4.min == 30 && t4.sec <= 6,
           "SET freezes the registers; the written 1:30:05 PM runs on as 13:30", "%u:%u:%u", t4.hour, t4.min,
           t4.sec);
    cmos_write(0x0B, 0x02);

    u16 above_16m = cmos_read(0x34) | cmos_read(0x35) << 8;
    u16 ext = cmos_read(0x30) | cmos_read(0x31) << 8;
    tap_ok(above_16m == (32 - 16) * 16 && ext == (32 - 1) * 1024 && cmos_read(0x15) == 0x80 && cmos_read(0x16) == 2,
           "CMOS memory-size bytes for 32 MiB", "0x34/35 %u, 0x30/31 %u", above_16m, ext);
}

/* ---------------------------------------------------------------- TSC deadline */
static void test_tsc_deadline(void)
{
    if (!(cpuid(1, 0).ecx & (1u << 24))) {
        for (int i = 0; i < 4; i++)
            tap_skip("TSC-deadline timer", "CPUID.1:ECX[24] is clear");
        return;
    }
    irq_register(VEC_DEADLINE, timer_irq);
    apic_write(APIC_LVTT, VEC_DEADLINE);
    wrmsr(MSR_TSC_DEADLINE, rdtsc() + 1000);
    tap_ok(rdmsr(MSR_TSC_DEADLINE) == 0, "IA32_TSC_DEADLINE is ignored and reads 0 outside TSC-deadline mode",
           "0x%lx", rdmsr(MSR_TSC_DEADLINE));

    apic_write(APIC_LVTT, LVT_TSC_DEADLINE | VEC_DEADLINE);
    u64 deadline = rdtsc() + 200000;   /* 100 us at 2 GHz */
    wrmsr(MSR_TSC_DEADLINE, deadline);
    u64 armed = rdmsr(MSR_TSC_DEADLINE);
    wait_irq(VEC_DEADLINE, 1);
    u64 late = irq_tsc[VEC_DEADLINE] - deadline;
    tap_ok(armed == deadline && irq_tsc[VEC_DEADLINE] >= deadline && late < 2000 &&
               rdmsr(MSR_TSC_DEADLINE) == 0,
           "TSC-deadline timer fires when the TSC reaches the deadline, then reads 0",
           "armed 0x%lx, irq at deadline+%ld", armed, (long)(irq_tsc[VEC_DEADLINE] - deadline));
    kprintf("# t deadline interrupt %lu ticks after the deadline\n", late);

    u64 t = rdtsc();
    wrmsr(MSR_TSC_DEADLINE, t - 10);
    wait_irq(VEC_DEADLINE, 2);
    /* two exits: the WRMSR, and the HLT of the wait (VMX exits on HLT before the interrupt wakes it) */
    tap_ok(irq_tsc[VEC_DEADLINE] - t < 2000 + 2 * exit_ticks, "a deadline in the past fires at once",
           "after %lu ticks", irq_tsc[VEC_DEADLINE] - t);

    wrmsr(MSR_TSC_DEADLINE, rdtsc() + 20000);
    wrmsr(MSR_TSC_DEADLINE, 0);
    sti();
    spin(100000);
    cli();
    tap_ok(irq_count[VEC_DEADLINE] == 2, "writing 0 disarms the TSC-deadline timer", "%lu interrupts",
           irq_count[VEC_DEADLINE]);
    apic_write(APIC_LVTT, 1u << 16);
}

static void body(void)
{
    map_page(APIC_PHYS, APIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
    apic_write(APIC_SVR, 0x1FF);
    test_cpuid_rate();
    test_rdtsc_monotonic();
    test_exit_cost();
    test_tsc_vs_apic_timer();
    test_rdtscp();
    test_cr4_tsd();
    test_tsc_write();
    test_kvmclock();
    test_rtc();
    test_tsc_deadline();
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(29);
    cet_kernel_start(body, 0);
}
