/* serial_irq: COM1's interrupt (ISA IRQ 4) through the I/O APIC — THR-empty as an edge-triggered
 * entry (enabling THRI raises it, reading IIR clears it, writing THR raises it again: what
 * Linux's 8250 driver relies on for user-space output), received data in loopback mode, and a
 * level-triggered entry: Remote IRR set while the interrupt is in service, TMR set in the local
 * APIC, the EOI broadcast clears Remote IRR and a line still asserted interrupts again.
 * Facts: PC16550D data sheet (IER, IIR priorities, MCR loopback); 82093AA §3.2.4 (Remote IRR);
 * SDM Vol. 3 §11.8.4 (TMR), §11.8.5 (EOI broadcast to the I/O APICs for level-triggered). */
#include "ktest.h"
#include "platform.h"

#define COM1 0x3F8
#define UART_RBR 0
#define UART_THR 0
#define UART_IER 1
#define UART_IIR 2
#define UART_MCR 4
#define UART_LSR 5
#define IER_RDI 0x01
#define IER_THRI 0x02
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10
#define MCR_DTR_RTS 0x03
#define COM1_IRQ 4
#define PM_TIMER_PORT 0x608   /* the PC machine's ACPI PM timer (FADT PM_TMR_BLK) */
#define VEC_EDGE 0x52
#define VEC_LEVEL 0x53

static volatile u64 edge_count, level_count, rx_count;
static volatile u8 edge_iir, rx_byte;
static volatile u32 level_remote_irr[2], level_tmr[2];

static bool tmr_has(unsigned vector) { return lapic_read(LAPIC_TMR + 0x10 * (vector / 32)) >> (vector % 32) & 1; }

static void edge_irq(struct trap_frame *f)
{
    u8 iir = inb(COM1 + UART_IIR);
    if ((iir & 0x0F) == 0x04 || (iir & 0x0F) == 0x0C) {   /* received data, or its FIFO timeout */
        rx_byte = inb(COM1 + UART_RBR);
        rx_count++;
    } else {
        edge_iir = iir;
        edge_count++;
    }
    lapic_eoi();
}

static void level_irq(struct trap_frame *f)
{
    u64 n = level_count++;
    if (n < 2) {
        level_remote_irr[n] = ioapic_read(IOAPIC_REDTBL(COM1_IRQ)) & REDIR_REMOTE_IRR;
        level_tmr[n] = tmr_has(VEC_LEVEL);
    }
    if (n >= 1)
        (void)inb(COM1 + UART_IIR);      /* the second time: clear THRI, the line drops */
    lapic_eoi();                         /* the first time the line stays high: delivered again */
}

static void test_thre_edge(void)
{
    ioapic_route(COM1_IRQ, VEC_EDGE, 0);
    outb(COM1 + UART_IER, IER_THRI);
    sti();
    spin(1000);
    cli();
    u64 after_enable = edge_count;
    outb(COM1 + UART_THR, ' ');           /* THR empties again: a new edge */
    /* With the FIFOs enabled (the library's console sets FCR) THRE comes once the transmit FIFO
     * has drained, at the line rate on a real 16550A: wait up to 10 ms of PM-timer time. */
    sti();
    u32 start = pm_timer_ticks(PM_TIMER_PORT);
    while (edge_count < 2 && pm_timer_delta(start, pm_timer_ticks(PM_TIMER_PORT)) < PM_TIMER_HZ / 100)
        ;
    cli();
    u64 after_write = edge_count;
    outb(COM1 + UART_IER, 0);
    tap_ok(after_enable == 1 && (edge_iir & 0x0F) == 0x02, "enabling THRI interrupts once; IIR says THR empty",
           "%lu interrupts, IIR 0x%x", after_enable, edge_iir);
    tap_ok(after_write == 2, "a THR write raises THR-empty again", "%lu interrupts", after_write);
}

static void test_rx_loopback(void)
{
    outb(COM1 + UART_MCR, MCR_LOOP | MCR_OUT2 | MCR_DTR_RTS);
    while (inb(COM1 + UART_LSR) & 1)
        (void)inb(COM1 + UART_RBR);
    outb(COM1 + UART_IER, IER_RDI);
    outb(COM1 + UART_THR, 'Z');           /* looped back into the receiver */
    u32 start = pm_timer_ticks(PM_TIMER_PORT);
    sti();                                /* below the FIFO trigger level a 16550 interrupts after */
    while (!rx_count && pm_timer_delta(start, pm_timer_ticks(PM_TIMER_PORT)) < PM_TIMER_HZ / 100)
        spin(100);                        /* a 4-character timeout: wait up to 10 ms */
    cli();
    outb(COM1 + UART_IER, 0);
    outb(COM1 + UART_MCR, MCR_OUT2 | MCR_DTR_RTS);
    tap_ok(rx_count == 1 && rx_byte == 'Z', "received data interrupts; RBR holds the byte (loopback)",
           "%lu interrupts, byte 0x%x", rx_count, rx_byte);
}

static void test_level(void)
{
    ioapic_route(COM1_IRQ, REDIR_LEVEL | VEC_LEVEL, 0);
    outb(COM1 + UART_IER, IER_THRI);
    sti();
    spin(1000);
    cli();
    outb(COM1 + UART_IER, 0);
    u32 entry = ioapic_read(IOAPIC_REDTBL(COM1_IRQ));
    ioapic_write(IOAPIC_REDTBL(COM1_IRQ), REDIR_MASKED);
    tap_ok(level_count == 2, "level-triggered: EOI with the line still high delivers again", "%lu interrupts",
           level_count);
    tap_ok(level_remote_irr[0] && level_remote_irr[1] && level_tmr[0] && level_tmr[1],
           "Remote IRR and the local APIC's TMR are set while in service", "remote IRR %x/%x TMR %u/%u",
           level_remote_irr[0], level_remote_irr[1], level_tmr[0], level_tmr[1]);
    tap_ok(!(entry & REDIR_REMOTE_IRR), "the EOI broadcast cleared Remote IRR", "entry 0x%x", entry);
}

static void body(void)
{
    platform_map();
    pic_init(0x20);
    irq_register(VEC_EDGE, edge_irq);
    irq_register(VEC_LEVEL, level_irq);
    lapic_write(LAPIC_SVR, 0x1FF);
    test_thre_edge();
    test_rx_loopback();
    test_level();
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(6);
    cet_kernel_start(body, 0);
}
