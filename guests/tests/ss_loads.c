/* ss_loads: MOV SS in 64-bit mode [SDM Vol. 2B MOV: "IF SS is loaded ... IF segment selector is
 * NULL ... #GP(0)" unless CPL < 3 and RPL = CPL]. kvm-unit-tests x86/emulator ("mov null, %ss
 * (with ss.rpl != cpl)"): the engine took a null selector with RPL 3 at CPL 0, and the next
 * IRETQ with that SS in its frame raised #GP. Register, memory and MMIO operands (the emulator
 * test reads the selector from a device page). */
#include "ktest.h"

static inline u16 read_ss(void)
{
    u16 ss;
    __asm__ volatile("mov %%ss, %0" : "=r"(ss));
    return ss;
}

static void load_ss_reg(void *arg) { __asm__ volatile("mov %0, %%ss" ::"r"((u64)arg) : "memory"); }

#define APIC_PA 0xFEE00000ul
#define VA_APIC (CET_REGION_BASE + 0x110000)
#define TPR (VA_APIC + 0x80) /* xAPIC task priority: bits 7:0 read back what was written */

static void load_ss_tpr(void *arg)
{
    (void)arg;
    __asm__ volatile("mov (%0), %%ss" ::"r"(TPR) : "memory");
}

static u16 selector_in_memory;
static void load_ss_mem(void *arg)
{
    selector_in_memory = (u16)(u64)arg;
    __asm__ volatile("mov %0, %%ss" ::"m"(selector_in_memory) : "memory");
}

void kmain(void)
{
    kernel_init();
    tap_plan(5);
    struct trap_record rec = {0};

    bool gp = expect_fault(VEC_GP, 0, load_ss_reg, (void *)3ul, &rec);
    tap_ok(gp && read_ss() == SEL_KDATA, "MOV SS, reg: null selector with RPL 3 at CPL 0 -> #GP(0)",
           "vector %lu error %lu SS 0x%x", rec.vector, rec.error, read_ss());
    gp = expect_fault(VEC_GP, 0, load_ss_mem, (void *)3ul, &rec);
    tap_ok(gp && read_ss() == SEL_KDATA, "MOV SS, mem: the same", "vector %lu error %lu", rec.vector, rec.error);
    bool faulted = run_catching(load_ss_reg, (void *)0ul, &rec);
    u16 ss = read_ss();
    load_ss_reg((void *)(u64)SEL_KDATA);
    tap_ok(!faulted && ss == 0, "MOV SS: null selector with RPL 0 at CPL 0 loads", "SS 0x%x", ss);
    load_ss_mem((void *)(u64)SEL_KDATA);
    tap_ok(read_ss() == SEL_KDATA, "MOV SS, mem: a data selector loads", "SS 0x%x", read_ss());
    map_page(VA_APIC, APIC_PA, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX | (1ul << 4));
    *(volatile u32 *)TPR = 3;
    gp = expect_fault(VEC_GP, 0, load_ss_tpr, 0, &rec);
    *(volatile u32 *)TPR = 0;
    tap_ok(gp && read_ss() == SEL_KDATA, "MOV SS from an MMIO register holding 3 -> #GP(0)",
           "vector %lu error %lu", rec.vector, rec.error);
    tap_done();
}
