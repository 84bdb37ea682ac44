/* apic_timer: external interrupts end to end - the local APIC timer (xAPIC MMIO, then x2APIC
 * MSRs) raises its LVT vector, the VMM injects it with KVM_INTERRUPT when the window is open,
 * the CPU delivers it through the IDT (ENDBR64 stubs) with supervisor shadow stacks on.
 * Facts: SDM Vol. 3 §11.5.4 (timer: one-shot/periodic, TDCR, TMICT/TMCCT), §11.8.5 (EOI),
 * §6.8.3 (STI shadow: "sti; hlt" cannot miss the wake-up), §6.14 + CET: an interrupt at CPL0
 * without IST pushes CS, LIP and the old SSP on the current shadow stack (SSP - 24) and IRET
 * pops them [KVM vmx.c/x86.c events]. */
#include "ktest.h"

#define PCD_PWT ((1ul << 4) | (1ul << 3))
#define APIC_PHYS 0xFEE00000ul
#define MSR_APIC_BASE 0x1Bu
#define APIC_BASE_EXTD (1ul << 10)
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_LVTT 0x320
#define APIC_TMICT 0x380
#define APIC_TMCCT 0x390
#define APIC_TDCR 0x3E0
#define X2APIC_MSR(reg) (0x800u + ((reg) >> 4))
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define TDCR_DIV1 0xB
#define VEC_PERIODIC 0x40
#define VEC_ONESHOT 0x41
#define VEC_MASKED 0x42
#define VEC_X2APIC 0x43
#define TICKS 5

static u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static void apic_write(u32 reg, u32 v) { mmio_write32(APIC_PHYS + reg, v); }
static u32 apic_read(u32 reg) { return mmio_read32(APIC_PHYS + reg); }

static volatile u64 ticks[256];
static volatile u64 waiting_ssp;   /* SSP of the interrupted code (the HLT loop) */
static volatile u64 ssp_errors, ssp_checked;
static volatile bool x2apic_mode;

/* With shadow stacks on: entry SSP = interrupted SSP - 24 holding (old SSP, LIP, CS). */
static void check_event_ssp(struct trap_frame *f)
{
    if (!cet.shstk)
        return;
    const u64 *frame = (const u64 *)f->entry_ssp;
    ssp_checked++;
    if (f->entry_ssp != waiting_ssp - 24 || frame[0] != waiting_ssp || frame[1] != f->rip || frame[2] != f->cs)
        ssp_errors++;
}

static void timer_irq(struct trap_frame *f)
{
    ticks[f->vector]++;
    check_event_ssp(f);
    if (x2apic_mode)
        wrmsr(X2APIC_MSR(APIC_EOI), 0);
    else
        apic_write(APIC_EOI, 0);
}

/* Halt with interrupts enabled until ticks[vector] reaches n (bounded: the VMM's instruction
 * limit stops a guest whose timer never fires). */
static void wait_ticks(unsigned vector, u64 n)
{
    waiting_ssp = rdssp();
    while (ticks[vector] < n)
        sti_hlt();
}

static void spin(u64 n)
{
    for (volatile u64 i = 0; i < n; i++)
        ;
}

static void test_xapic_timer(void)
{
    map_page(APIC_PHYS, APIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
    for (unsigned v = VEC_PERIODIC; v <= VEC_X2APIC; v++)
        irq_register(v, timer_irq);
    apic_write(APIC_SVR, 0x1FF);
    apic_write(APIC_TDCR, TDCR_DIV1);
    apic_write(APIC_LVTT, LVT_PERIODIC | VEC_PERIODIC);
    apic_write(APIC_TMICT, 20000);
    u32 c1 = apic_read(APIC_TMCCT);
    spin(100);
    u32 c2 = apic_read(APIC_TMCCT);
    tap_ok(c1 <= 20000 && c2 < c1 && c2 > 0, "TMCCT counts down from TMICT", "%u then %u", c1, c2);

    u64 ssp_before = rdssp();
    wait_ticks(VEC_PERIODIC, TICKS);
    u64 ssp_after = rdssp();
    tap_ok(ticks[VEC_PERIODIC] == TICKS, "periodic xAPIC timer: 5 interrupts woke sti;hlt", "%lu ticks",
           ticks[VEC_PERIODIC]);
    tap_ok(ssp_errors == 0 && ssp_after == ssp_before && (!cet.shstk || ssp_checked == TICKS),
           "interrupt at CPL0: shadow-stack frame (SSP-24: SSP, LIP, CS) and SSP restored by IRET",
           "checked %lu errors %lu ssp 0x%lx", ssp_checked, ssp_errors, ssp_after);
    apic_write(APIC_TMICT, 0);

    apic_write(APIC_LVTT, VEC_ONESHOT);
    apic_write(APIC_TMICT, 10000);
    wait_ticks(VEC_ONESHOT, 1);
    sti();
    spin(20000);  /* far longer than the initial count: a one-shot timer stays quiet */
    cli();
    tap_ok(ticks[VEC_ONESHOT] == 1 && apic_read(APIC_TMCCT) == 0, "one-shot timer fires once, TMCCT ends at 0",
           "%lu ticks", ticks[VEC_ONESHOT]);

    apic_write(APIC_LVTT, LVT_MASKED | LVT_PERIODIC | VEC_MASKED);
    apic_write(APIC_TMICT, 1000);
    sti();
    spin(20000);
    cli();
    u32 counting = apic_read(APIC_TMCCT);
    apic_write(APIC_TMICT, 0);
    tap_ok(ticks[VEC_MASKED] == 0 && counting > 0, "masked LVT timer counts but never interrupts",
           "%lu ticks, TMCCT %u", ticks[VEC_MASKED], counting);
}

static void test_x2apic_timer(void)
{
    if (!(cpuid(1, 0).ecx & (1u << 21))) {
        tap_skip("x2APIC periodic timer", "CPUID.1:ECX[21] is clear");
        tap_skip("x2APIC TMCCT", "CPUID.1:ECX[21] is clear");
        return;
    }
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EXTD);
    x2apic_mode = true;
    wrmsr(X2APIC_MSR(APIC_TDCR), TDCR_DIV1);
    wrmsr(X2APIC_MSR(APIC_LVTT), LVT_PERIODIC | VEC_X2APIC);
    wrmsr(X2APIC_MSR(APIC_TMICT), 30000);
    u64 count = rdmsr(X2APIC_MSR(APIC_TMCCT));
    tap_ok(count > 0 && count <= 30000, "x2APIC TMCCT (MSR 0x839) counts", "%lu", count);
    ssp_checked = ssp_errors = 0;
    wait_ticks(VEC_X2APIC, 3);
    wrmsr(X2APIC_MSR(APIC_TMICT), 0);
    tap_ok(ticks[VEC_X2APIC] == 3 && ssp_errors == 0, "periodic x2APIC timer: 3 interrupts, EOI by MSR 0x80B",
           "%lu ticks, %lu SSP errors", ticks[VEC_X2APIC], ssp_errors);
}

static void body(void)
{
    kprintf("# CET at CPL0: shstk %d ibt %d\n", cet.shstk, cet.ibt);
    test_xapic_timer();
    test_x2apic_timer();
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(7);
    cet_kernel_start(body, 0);
}
