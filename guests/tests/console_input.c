/* console_input: COM1 input by interrupt — a kernel that halts (no timer) until the received-data
 * interrupt (ISA IRQ 4 through the I/O APIC) brings the bytes the host typed, echoes each and
 * stops at 'q'. Facts: PC16550D data sheet (IER bit 0, IIR 0x04, RBR, LSR.DR); 82093AA §3.2. */
#include "ktest.h"
#include "platform.h"

#define COM1 0x3F8
#define VEC_RX 0x54

static volatile u8 line[64];
static volatile u32 got;
static volatile bool quit;

static void rx_irq(struct trap_frame *f)
{
    while (inb(COM1 + 5) & 1) {
        u8 c = inb(COM1);
        if (c == 'q')
            quit = true;
        else if (got < sizeof(line) - 1)
            line[got++] = c;
    }
    lapic_eoi();
}

static void body(void)
{
    platform_map();
    pic_init(0x20);
    irq_register(VEC_RX, rx_irq);
    lapic_write(LAPIC_SVR, 0x1FF);
    ioapic_route(4, VEC_RX, 0);
    outb(COM1 + 1, 0x01);  /* IER: received data */
    u64 halts = 0;
    while (!quit && halts < 1000) {
        sti_hlt();
        halts++;
    }
    outb(COM1 + 1, 0x00);
    line[got] = 0;
    kprintf("# received '%s'\n", (const char *)line);
    tap_ok(quit && got > 0, "received-data interrupts woke the halted kernel", "got '%s' in %lu halts",
           (const char *)line, halts);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(1);
    cet_kernel_start(body, 0);
}
