/* smp.c - bring up application processors (see smp.S), the local APIC and IPIs, fw_cfg's
 * CPU count.  [SDM Vol. 3 §9.4 (MP initialization), §11.6 (IPIs), §11.4.1 (xAPIC page)] */
#include "smp.h"

#define FW_CFG_PORT_SEL 0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_NB_CPUS 0x05
#define PCD_PWT ((1ul << 4) | (1ul << 3))

u64 smp_ap_cr3;                     /* read by smp.S (32-bit code: must stay below 4 GiB) */
u64 smp_ap_stack;
static volatile int ap_index;
static void (*volatile ap_fn)(int cpu);
static volatile int ap_started;
static volatile u64 trampoline_phys;   /* 0: SIPI vector 0 (a variable: no NULL-pointer assumptions) */

extern char smp_trampoline[], smp_trampoline_end[];
void smp_ap_entry(void);

unsigned fw_cfg_nb_cpus(void)
{
    outw(FW_CFG_PORT_SEL, FW_CFG_NB_CPUS);
    unsigned lo = inb(FW_CFG_PORT_DATA);
    return lo | (unsigned)inb(FW_CFG_PORT_DATA) << 8;
}

#define MSR_APIC_BASE 0x1Bu
#define APIC_BASE_EXTD (1ul << 10)
#define X2APIC_MSR(reg) (0x800u + ((reg) >> 4))

bool smp_x2apic;

/* xAPIC: the MMIO page; x2APIC (smp_x2apic): MSR 0x800 + reg/16 [SDM §11.12.1.2]. */
u32 apic_read(u32 reg)
{
    return smp_x2apic ? (u32)rdmsr(X2APIC_MSR(reg)) : *(volatile u32 *)(APIC_PHYS + reg);
}
void apic_write(u32 reg, u32 v)
{
    if (smp_x2apic)
        wrmsr(X2APIC_MSR(reg), v);
    else
        *(volatile u32 *)(APIC_PHYS + reg) = v;
}
/* The APIC ID: xAPIC ID register bits 31:24, or the whole x2APIC ID register. */
unsigned apic_id(void) { return smp_x2apic ? apic_read(APIC_ID) : apic_read(APIC_ID) >> 24; }
void apic_eoi(void) { apic_write(APIC_EOI, 0); }

/* The calling CPU's APIC: xAPIC -> x2APIC mode (IA32_APIC_BASE.EXTD). */
void apic_enter_x2apic(void) { wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_EXTD); }

/* Software-enable the calling CPU's APIC (SVR bit 8, spurious vector 0xFF). */
void apic_enable(void) { apic_write(APIC_SVR, 0x1FF); }

/* xAPIC: ICR2 = destination (bits 31:24), then ICR low starts the IPI; x2APIC: one WRMSR of
 * the 64-bit ICR with the destination in bits 63:32 [SDM §11.12.9]. */
void apic_send_ipi(unsigned dest, u32 icr_low)
{
    if (smp_x2apic) {
        wrmsr(X2APIC_MSR(APIC_ICR), (u64)dest << 32 | icr_low);
        return;
    }
    apic_write(APIC_ICR2, dest << 24);
    apic_write(APIC_ICR, icr_low);
}

/* BSP: map the xAPIC page (uncached, shared page tables: every CPU reaches its own APIC), enter
 * x2APIC mode if smp_x2apic, software-enable the APIC. */
void smp_init(void)
{
    map_page(APIC_PHYS, APIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
    if (smp_x2apic)
        apic_enter_x2apic();
    apic_enable();
}

void smp_ap_entry(void)
{
    int cpu = ap_index;
    void (*fn)(int) = ap_fn;
    cpu_load_idt();
    __atomic_store_n(&ap_started, 1, __ATOMIC_SEQ_CST);   /* the BSP may start the next AP */
    fn(cpu);
    for (;;)
        sti_hlt();
}

/* INIT + SIPI(vector 0) to APIC ID `cpu`; fn(cpu) runs on it at CPL0 (64-bit, CET off, on the
 * stack below stack_top, with the kernel's GDT, IDT and page tables).  True once the AP is in
 * 64-bit mode. */
bool smp_start_ap(int cpu, void (*fn)(int cpu), u64 stack_top)
{
    if (cpu <= 0 || cpu >= SMP_MAX_CPUS)
        return false;
    u8 *dst = (u8 *)trampoline_phys;
    map_page((u64)dst, (u64)dst, PTE_P | PTE_RW);
    memcpy(dst, smp_trampoline, smp_trampoline_end - smp_trampoline);
    map_page((u64)dst, 0, 0);                  /* page 0 stays unmapped for the kernel */
    return smp_sipi_ap(cpu, fn, stack_top, (u8)(trampoline_phys >> 12));
}

/* INIT + SIPI(vector) to APIC ID `cpu`, whose real-mode code the caller put at vector << 12 and
 * which ends at smp_ap_start32 (smp.S); fn(cpu) then runs as for smp_start_ap. */
bool smp_sipi_ap(int cpu, void (*fn)(int cpu), u64 stack_top, u8 vector)
{
    if (cpu <= 0 || cpu >= SMP_MAX_CPUS)
        return false;
    smp_ap_cr3 = read_cr3();
    smp_ap_stack = stack_top;
    ap_index = cpu;
    ap_fn = fn;
    __atomic_store_n(&ap_started, 0, __ATOMIC_SEQ_CST);
    apic_send_ipi(cpu, ICR_INIT | ICR_LEVEL_ASSERT);
    apic_send_ipi(cpu, ICR_STARTUP | vector);
    for (u64 i = 0; i < 50000000; i++) {
        if (__atomic_load_n(&ap_started, __ATOMIC_SEQ_CST))
            return true;
        __asm__ volatile("pause");
    }
    return false;
}
