/*
 * platform.h - the PC interrupt platform from a test kernel: 8259 pair, I/O APIC, 8254 PIT,
 * local APIC (xAPIC page), port I/O of every width. Facts: Intel 8259A / 8254 / 82093AA data
 * sheets, SDM Vol. 3 ch. 11 (local APIC), ACPI 6.4 §4.8 (PM timer).
 */
#ifndef PLATFORM_H
#define PLATFORM_H
#include "ktest.h"

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xA0
#define PIC2_DATA 0xA1
#define PIC_EOI 0x20
#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PORT_B 0x61
#define PORT_B_GATE2 0x01
#define PORT_B_SPEAKER 0x02
#define PORT_B_OUT2 0x20
#define PIT_HZ 1193182u
#define PM_TIMER_HZ 3579545u

#define IOAPIC_PHYS 0xFEC00000ul
#define IOAPIC_REG_ID 0x00
#define IOAPIC_REG_VER 0x01
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define IOAPIC_EOI_REG 0x40
#define REDIR_MASKED (1u << 16)
#define REDIR_LEVEL (1u << 15)
#define REDIR_REMOTE_IRR (1u << 14)
#define REDIR_LOGICAL (1u << 11)
#define REDIR_LOWEST_PRIO (1u << 8)

#define LAPIC_PHYS 0xFEE00000ul
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xB0
#define LAPIC_LDR 0xD0
#define LAPIC_DFR 0xE0
#define LAPIC_SVR 0xF0
#define LAPIC_TMR 0x180
#define LAPIC_LVT0 0x350
#define LAPIC_LVTT 0x320      /* LVT timer [SDM Vol. 3 §11.5.4] */
#define LAPIC_TMICT 0x380     /* initial count */
#define LAPIC_TDCR 0x3E0      /* divide configuration */
#define LVT_TIMER_PERIODIC (1u << 17)
#define TDCR_DIV1 0xB
#define LVT_EXTINT (7u << 8)
#define PCD_PWT ((1ul << 4) | (1ul << 3))

static inline u16 inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }

static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

/* Identity-map the local APIC and I/O APIC pages uncached. */
static inline void platform_map(void)
{
    map_page(LAPIC_PHYS, LAPIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
    map_page(IOAPIC_PHYS, IOAPIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
}

static inline u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_PHYS + reg); }
static inline void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_PHYS + reg, v); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

static inline u32 ioapic_read(u32 reg)
{
    mmio_write32(IOAPIC_PHYS, reg);
    return mmio_read32(IOAPIC_PHYS + 0x10);
}
static inline void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_PHYS, reg);
    mmio_write32(IOAPIC_PHYS + 0x10, v);
}
/* Redirection entry of `pin`: low dword `low` (vector, modes, mask), destination `dest`. */
static inline void ioapic_route(unsigned pin, u32 low, u8 dest)
{
    ioapic_write(IOAPIC_REDTBL(pin), REDIR_MASKED);
    ioapic_write(IOAPIC_REDTBL(pin) + 1, (u32)dest << 24);
    ioapic_write(IOAPIC_REDTBL(pin), low);
}

/* ICW1..ICW4: master vectors base..base+7, slave base+8.., cascade on IR2; everything masked. */
static inline void pic_init(u8 base)
{
    outb(PIC1_DATA, 0xFF);
    outb(PIC2_DATA, 0xFF);
    outb(PIC1_CMD, 0x11);
    outb(PIC1_DATA, base);
    outb(PIC1_DATA, 0x04);
    outb(PIC1_DATA, 0x01);
    outb(PIC2_CMD, 0x11);
    outb(PIC2_DATA, base + 8);
    outb(PIC2_DATA, 0x02);
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, 0xFF);
    outb(PIC2_DATA, 0xFF);
}

/* PIT channel 0 in `mode` (2 rate generator, 3 square wave, 0 one-shot), LSB then MSB. */
static inline void pit_channel0(unsigned mode, u16 count)
{
    outb(PIT_CMD, 0x30 | (mode << 1));
    outb(PIT_CH0, count & 0xFF);
    outb(PIT_CH0, count >> 8);
}
static inline void pit_stop_channel0(void) { pit_channel0(0, 0); }

/* The ACPI PM timer port, from the FADT (0: none). */
static inline u32 pm_timer_ticks(u16 port) { return inl(port) & 0xFFFFFF; }
static inline u32 pm_timer_delta(u32 from, u32 to) { return (to - from) & 0xFFFFFF; }

static inline void spin(u64 n)
{
    for (volatile u64 i = 0; i < n; i++)
        ;
}
#endif
