/* ioapic_pit: the PC's timer interrupt through each path Linux uses — the 8254 PIT's channel 0
 * through the I/O APIC (pin 2: the MADT's override of ISA IRQ 0) and through the 8259 pair
 * (LVT0 ExtINT), a masked redirection entry, and channel 2 gated through port 0x61 (Linux's
 * PIT calibration: mode 0, OUT2 in port 0x61 bit 5, MSB reads).
 * Facts: 82093AA I/O APIC data sheet §3.2 (IOREGSEL/IOWIN, version register, redirection
 * entries); 8254 data sheet (modes 0/2, latch and read-back commands, status byte); 8259A data
 * sheet (ICW1-4, EOI); SDM Vol. 3 §11.5.1 (LVT0 ExtINT). */
#include "ktest.h"
#include "platform.h"

#define PM_TIMER_PORT 0x608   /* the PC machine's ACPI PM timer (FADT PM_TMR_BLK) */
#define VEC_IOAPIC 0x50
#define VEC_PIC_BASE 0x60
#define PERIOD 11932          /* 10 ms at 1.193182 MHz */
#define TICKS 5

static volatile u64 ioapic_ticks, pic_ticks;
static volatile u32 tick_pm[TICKS + 1];

static void ioapic_tick(struct trap_frame *f)
{
    if (ioapic_ticks <= TICKS)
        tick_pm[ioapic_ticks] = pm_timer_ticks(PM_TIMER_PORT);
    ioapic_ticks++;
    lapic_eoi();
}

static void pic_tick(struct trap_frame *f)
{
    pic_ticks++;
    outb(PIC1_CMD, PIC_EOI);
}

static void wait_for(volatile u64 *counter, u64 n)
{
    for (u64 guard = 0; *counter < n && guard < 1000; guard++)
        sti_hlt();
}

static void test_registers(void)
{
    u32 ver = ioapic_read(IOAPIC_REG_VER);
    tap_ok((ver & 0xFF) >= 0x11 && ((ver >> 16) & 0xFF) == 23, "I/O APIC version register: 24 entries",
           "0x%x", ver);
    ioapic_write(IOAPIC_REDTBL(5), 0x0001A9A5);     /* masked, level, low polarity, logical, vector 0xA5 */
    ioapic_write(IOAPIC_REDTBL(5) + 1, 0xAB000000);
    u32 lo = ioapic_read(IOAPIC_REDTBL(5)), hi = ioapic_read(IOAPIC_REDTBL(5) + 1);
    ioapic_write(IOAPIC_REDTBL(5), REDIR_MASKED);
    tap_ok(lo == 0x0001A9A5 && hi >> 24 == 0xAB, "redirection entry reads back (vector, modes, mask, destination)",
           "0x%x 0x%x", lo, hi);
}

static void test_ioapic_timer(void)
{
    ioapic_route(2, VEC_IOAPIC, 0);                  /* edge, active high, fixed, physical APIC 0 */
    pit_channel0(2, PERIOD);
    wait_for(&ioapic_ticks, TICKS + 1);
    pit_stop_channel0();
    tap_ok(ioapic_ticks >= TICKS + 1, "PIT channel 0 mode 2 -> I/O APIC pin 2 -> vector 0x50", "%lu ticks",
           ioapic_ticks);
    u32 span = pm_timer_delta(tick_pm[0], tick_pm[TICKS]);
    u32 expect = (u32)((u64)PERIOD * PM_TIMER_HZ / PIT_HZ);  /* 35796 PM ticks */
    tap_ok(span > TICKS * expect * 9 / 10 && span < TICKS * expect * 11 / 10,
           "ticks are 10 ms apart on the PM timer", "%u PM ticks for %d periods, expected %u each", span, TICKS,
           expect);

    u64 before = ioapic_ticks;
    ioapic_write(IOAPIC_REDTBL(2), REDIR_MASKED | VEC_IOAPIC);
    pit_channel0(2, PERIOD / 10);                    /* 1 ms */
    u32 start = pm_timer_ticks(PM_TIMER_PORT);
    sti();
    while (pm_timer_delta(start, pm_timer_ticks(PM_TIMER_PORT)) < 4 * expect / 10)
        spin(500);
    cli();
    pit_stop_channel0();
    tap_ok(ioapic_ticks == before, "a masked redirection entry delivers nothing", "%lu ticks while masked",
           ioapic_ticks - before);
}

static void test_pic_timer(void)
{
    lapic_write(LAPIC_LVT0, LVT_EXTINT);             /* virtual wire: the 8259's INTR to the BSP */
    outb(PIC1_DATA, 0xFE);                           /* only IRQ 0 */
    pit_channel0(2, PERIOD);
    wait_for(&pic_ticks, 3);
    pit_stop_channel0();
    outb(PIC1_DATA, 0xFF);
    outb(PIC1_CMD, 0x0B);                            /* OCW3: read ISR */
    u8 isr = inb(PIC1_CMD);
    tap_ok(pic_ticks >= 3 && isr == 0, "PIT -> 8259 IRQ 0 -> LVT0 ExtINT -> vector 0x60, EOI clears ISR",
           "%lu ticks, ISR 0x%x", pic_ticks, isr);
}

static void test_channel2_gate(void)
{
    outb(PORT_B, (inb(PORT_B) & ~PORT_B_SPEAKER) | PORT_B_GATE2);
    outb(PIT_CMD, 0xB0);                             /* channel 2, LSB/MSB, mode 0, binary */
    outb(PIT_CH2, 0xFF);
    outb(PIT_CH2, 0xFF);
    u32 start = pm_timer_ticks(PM_TIMER_PORT);
    (void)inb(PIT_CH2);
    u8 msb1 = inb(PIT_CH2);
    spin(200000);                                    /* about 1 ms: the MSB drops by 4 */
    (void)inb(PIT_CH2);
    u8 msb2 = inb(PIT_CH2);
    bool out_low = !(inb(PORT_B) & PORT_B_OUT2);
    tap_ok(msb2 < msb1 && out_low, "channel 2 mode 0 counts down; OUT2 (port 0x61 bit 5) low while counting",
           "MSB 0x%x then 0x%x", msb1, msb2);

    outb(PIT_CMD, 0xB0);
    outb(PIT_CH2, 1000 & 0xFF);
    outb(PIT_CH2, 1000 >> 8);
    start = pm_timer_ticks(PM_TIMER_PORT);
    u64 polls = 0;
    while (!(inb(PORT_B) & PORT_B_OUT2) && polls < 100000) {
        spin(100);                                   /* ~1 us between polls */
        polls++;
    }
    u32 elapsed = pm_timer_delta(start, pm_timer_ticks(PM_TIMER_PORT));
    u32 expect = 1000u * PM_TIMER_HZ / PIT_HZ;       /* 3000 PM ticks */
    tap_ok(elapsed >= expect * 9 / 10 && elapsed < expect * 3 / 2, "OUT2 rises after 1000 PIT ticks (838 us)",
           "%u PM ticks, expected %u", elapsed, expect);

    outb(PIT_CMD, 0xE8);                             /* read-back: status of channel 2 */
    u8 status = inb(PIT_CH2);
    tap_ok((status & 0x80) && (status & 0x3F) == 0x30, "read-back status: OUT high, LSB/MSB, mode 0",
           "0x%x", status);

    outb(PORT_B, inb(PORT_B) & ~PORT_B_GATE2);
    outb(PIT_CMD, 0xB0);
    outb(PIT_CH2, 0x00);
    outb(PIT_CH2, 0x80);
    outb(PIT_CMD, 0x80);                             /* latch channel 2 */
    u16 c1 = inb(PIT_CH2) | (u16)inb(PIT_CH2) << 8;
    spin(20000);
    outb(PIT_CMD, 0x80);
    u16 c2 = inb(PIT_CH2) | (u16)inb(PIT_CH2) << 8;
    tap_ok(c1 == 0x8000 && c2 == 0x8000, "gate low: a mode 0 count does not run", "0x%x then 0x%x", c1, c2);
}

static void body(void)
{
    platform_map();
    pic_init(VEC_PIC_BASE);
    irq_register(VEC_IOAPIC, ioapic_tick);
    irq_register(VEC_PIC_BASE, pic_tick);
    irq_register(VEC_PIC_BASE + 7, pic_tick);        /* spurious IRQ 7 */
    lapic_write(LAPIC_SVR, 0x1FF);
    test_registers();
    test_ioapic_timer();
    test_pic_timer();
    test_channel2_gate();
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(10);
    cet_kernel_start(body, 0);
}
