/* smp.h - application processors, the local APIC and IPIs for the test kernels (smp.c, smp.S).
 * [SDM Vol. 3 §9.4.4 (INIT-SIPI-SIPI), §11.6.1 (ICR), §11.4.1 (xAPIC page at 0xFEE00000)] */
#ifndef SMP_H
#define SMP_H
#include "ktest.h"

#define SMP_MAX_CPUS 8

#define APIC_PHYS 0xFEE00000ul
#define APIC_ID 0x20
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_ICR 0x300
#define APIC_ICR2 0x310
/* ICR low: vector 7:0, delivery mode 10:8, level 14, shorthand 19:18 */
#define ICR_FIXED 0x000u
#define ICR_INIT 0x500u
#define ICR_STARTUP 0x600u
#define ICR_LEVEL_ASSERT 0x4000u
#define ICR_ALL_BUT_SELF (3u << 18)

/* Use the x2APIC MSRs instead of the xAPIC page (each CPU switches with apic_enter_x2apic). */
extern bool smp_x2apic;

unsigned fw_cfg_nb_cpus(void);          /* fw_cfg FW_CFG_NB_CPUS (0x05) */
void apic_enter_x2apic(void);
void smp_init(void);                    /* BSP: map the xAPIC page, x2APIC mode if asked, enable */
u32 apic_read(u32 reg);
void apic_write(u32 reg, u32 v);
unsigned apic_id(void);                 /* xAPIC ID bits 31:24 / the x2APIC ID register */
void apic_enable(void);
void apic_eoi(void);
void apic_send_ipi(unsigned dest, u32 icr_low);   /* all-but-self: dest ignored */
/* APs share the BSP's GDT, IDT and page tables and load no TSS (no IST stacks): an event through
 * an IST gate (#DF, NMI, #MC) on an AP is fatal.  The trampoline uses SIPI vector 0, so physical
 * page 0 is overwritten (the kernel keeps it unmapped). */

/* INIT + SIPI to APIC ID cpu; fn(cpu) then runs there (64-bit CPL0, CET off, on the stack below
 * stack_top).  Returns once the AP reached 64-bit mode (false: not within a bounded wait). */
bool smp_start_ap(int cpu, void (*fn)(int cpu), u64 stack_top);
/* INIT + SIPI(vector) to APIC ID cpu, which runs the caller's own real-mode code at vector << 12
 * (CS = vector << 8, IP = 0); that code enters protected mode with a GDT whose selector 0x08 is
 * flat 32-bit code and 0x10 flat data, and far-jumps to smp_ap_start32.  Then as smp_start_ap. */
bool smp_sipi_ap(int cpu, void (*fn)(int cpu), u64 stack_top, u8 vector);
extern char smp_ap_start32[];
#endif
