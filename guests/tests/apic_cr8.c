/* apic_cr8: the local APIC switched off and on, and CR8 as the APIC's task priority.
 * - IA32_APIC_BASE.EN = 0 [SDM Vol. 3 §11.4.3]: KVM clears CPUID.1:EDX.APIC for the guest
 *   (kvm_update_cpuid_runtime) and sets it again when the APIC is enabled; the xAPIC page is no
 *   longer the APIC: it reads all ones and drops writes (KVM's LAPIC_MMIO_HOLE quirk), as it
 *   does in x2APIC mode; the APIC's registers are as they were when it comes back.
 * - CR8 [SDM Vol. 3 §11.8.6.1]: MOV from CR8 reads what MOV to CR8 wrote (APIC on or off); bits
 *   63:4 are reserved (#GP(0)); CR8[3:0] is TPR[7:4]: a CR8 write shows in the TPR (xAPIC page,
 *   x2APIC MSR 0x808) with TPR[3:0] = 0, a TPR write shows in CR8, and a priority class CR8
 *   raises holds back a self-IPI until CR8 drops — at once: the interrupt is taken right after
 *   the STI shadow that follows the MOV to CR8 lowering it (KVM without an in-kernel LAPIC
 *   exits to userspace with KVM_EXIT_SET_TPR when the guest lowers its TPR, cetvm's CPU through
 *   the TPR threshold, so the VMM's APIC knows before the guest runs on). */
#include "ktest.h"

#define MSR_APIC_BASE 0x1Bu
#define MSR_X2APIC_TPR 0x808u
#define MSR_X2APIC_SELF_IPI 0x83Fu
#define MSR_X2APIC_EOI 0x80Bu
#define APIC_BASE_EXTD (1ul << 10)
#define APIC_BASE_EN (1ul << 11)
#define CPUID_1_EDX_APIC (1u << 9)
#define CPUID_1_ECX_X2APIC (1u << 21)

#define PCD_PWT ((1ul << 4) | (1ul << 3))
#define APIC_PHYS 0xFEE00000ul
#define APIC_LVR 0x30
#define APIC_TPR 0x80
#define APIC_EOI 0xB0
#define APIC_SVR 0xF0
#define APIC_ICR_LO 0x300
#define ICR_SELF (1u << 18)
#define VEC_SELF 0x80  /* priority class 8 */

static volatile u32 *reg(u32 off) { return (volatile u32 *)(APIC_PHYS + off); }
static inline u64 read_cr8(void) { u64 v; __asm__ volatile("mov %%cr8, %0" : "=r"(v)); return v; }
static inline void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" ::"r"(v) : "memory"); }
static bool cpuid_apic(void) { return cpuid(1, 0).edx & CPUID_1_EDX_APIC; }

static volatile u64 self_irqs;
static bool x2apic_mode;

static void self_irq(struct trap_frame *f)
{
    (void)f;
    self_irqs++;
    if (x2apic_mode)
        wrmsr(MSR_X2APIC_EOI, 0);
    else
        *reg(APIC_EOI) = 0;
}

static void do_write_cr8(void *arg) { write_cr8(*(u64 *)arg); }

/* The xAPIC page of an APIC that is off or in x2APIC mode: ones read, writes vanish. */
static bool page_is_a_hole(void)
{
    memset((void *)APIC_PHYS, 0xff, 0x400);
    return *reg(APIC_LVR) == 0xFFFFFFFFu && *reg(APIC_TPR) == 0xFFFFFFFFu;
}

static void test_disable(u64 base, u32 version)
{
    tap_ok(cpuid_apic(), "CPUID.1:EDX.APIC is set while the APIC is enabled", "edx 0x%x", cpuid(1, 0).edx);
    wrmsr(MSR_APIC_BASE, base & ~(APIC_BASE_EN | APIC_BASE_EXTD));
    tap_ok(!(rdmsr(MSR_APIC_BASE) & APIC_BASE_EN) && !cpuid_apic(),
           "IA32_APIC_BASE.EN = 0: CPUID.1:EDX.APIC reads clear", "base 0x%lx edx 0x%x", rdmsr(MSR_APIC_BASE),
           cpuid(1, 0).edx);
    tap_ok(page_is_a_hole(), "a disabled APIC's page reads all ones and drops writes", "LVR 0x%x TPR 0x%x",
           *reg(APIC_LVR), *reg(APIC_TPR));
    write_cr8(9);
    u64 off = read_cr8();
    write_cr8(4);
    tap_ok(off == 9 && read_cr8() == 4, "CR8 reads what was written while the APIC is disabled", "CR8 %lu", off);
    wrmsr(MSR_APIC_BASE, base);
    tap_ok(cpuid_apic() && *reg(APIC_LVR) == version && *reg(APIC_TPR) == 0x40,
           "enabled again: CPUID.1:EDX.APIC set, the page is the APIC's, TPR = the CR8 written meanwhile",
           "edx 0x%x LVR 0x%x TPR 0x%x", cpuid(1, 0).edx, *reg(APIC_LVR), *reg(APIC_TPR));
}

static void test_cr8_tpr(void)
{
    write_cr8(0xA);
    u64 cr8 = read_cr8();
    u32 tpr = *reg(APIC_TPR);
    tap_ok(cr8 == 0xA && tpr == 0xA0, "MOV to CR8: CR8 reads it back, TPR = CR8 << 4", "CR8 0x%lx TPR 0x%x", cr8, tpr);
    *reg(APIC_TPR) = 0x50;
    cr8 = read_cr8();
    tap_ok(cr8 == 5, "a TPR write (xAPIC page) shows in CR8 as TPR[7:4]", "CR8 0x%lx", cr8);
    u64 bad = 0x10;
    struct trap_record rec = {0};
    tap_ok(expect_fault(VEC_GP, 0, do_write_cr8, &bad, &rec) && read_cr8() == 5,
           "MOV to CR8 with bit 4 set -> #GP(0), CR8 unchanged", "vector %lu CR8 0x%lx", rec.vector, read_cr8());
}

/* A self-IPI of class 8 while CR8 = 8: held back through an exit with IF = 1, then taken once
 * CR8 drops (the VMM learns CR8 at the next exit: the HLT of the wait). */
static void test_cr8_masks(void)
{
    irq_register(VEC_SELF, self_irq);
    write_cr8(8);
    if (x2apic_mode)
        wrmsr(MSR_X2APIC_SELF_IPI, VEC_SELF);
    else
        *reg(APIC_ICR_LO) = ICR_SELF | VEC_SELF;
    sti();
    cpuid(0, 0);  /* an exit with IF = 1: the VMM could deliver the IPI here */
    cli();
    u64 held = self_irqs;
    write_cr8(7);
    for (int i = 0; i < 10 && self_irqs == 0; i++)
        sti_hlt();
    tap_ok(held == 0 && self_irqs == 1, x2apic_mode ? "x2APIC: CR8 = 8 holds back a class-8 self-IPI, CR8 = 7 lets it in"
                                                    : "CR8 = 8 holds back a class-8 self-IPI, CR8 = 7 lets it in",
           "%lu before, %lu after", held, self_irqs);
    write_cr8(0);
    self_irqs = 0;
}

static void test_cr8_lowered(void)
{
    write_cr8(8);
    *reg(APIC_ICR_LO) = ICR_SELF | VEC_SELF;
    cpuid(0, 0);
    u64 held = self_irqs;
    write_cr8(0);  /* IF = 0: the interrupt waits for the window */
    __asm__ volatile("sti\n\tnop\n\tcli" ::: "memory");
    u64 taken = self_irqs;
    tap_ok(held == 0 && taken == 1, "lowering CR8 lets a held-back self-IPI in after the next STI shadow",
           "%lu before, %lu right after sti; nop", held, taken);
    self_irqs = 0;
}

static void test_x2apic(u64 base)
{
    if (!(cpuid(1, 0).ecx & CPUID_1_ECX_X2APIC)) {
        for (int i = 0; i < 3; i++)
            tap_skip("x2APIC mode", "CPUID.1:ECX.x2APIC is clear");
        return;
    }
    wrmsr(MSR_APIC_BASE, base | APIC_BASE_EXTD);
    x2apic_mode = true;
    write_cr8(3);
    u64 tpr = rdmsr(MSR_X2APIC_TPR);
    wrmsr(MSR_X2APIC_TPR, 0x60);
    u64 cr8 = read_cr8();
    tap_ok(cpuid_apic() && tpr == 0x30 && cr8 == 6, "x2APIC: CR8 and the TPR MSR 0x808 are one register",
           "TPR 0x%lx CR8 0x%lx", tpr, cr8);
    write_cr8(0);
    tap_ok(page_is_a_hole(), "x2APIC mode: the xAPIC page reads all ones and drops writes", "LVR 0x%x",
           *reg(APIC_LVR));
    test_cr8_masks();
}

static void body(void)
{
    map_page(APIC_PHYS, APIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
    u64 base = rdmsr(MSR_APIC_BASE);
    *reg(APIC_SVR) = 0x1FF;
    u32 version = *reg(APIC_LVR);
    test_disable(base, version);
    test_cr8_tpr();
    write_cr8(0);
    test_cr8_masks();
    test_cr8_lowered();
    test_x2apic(base);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(13);
    cet_kernel_start(body, 0);
}
