/* ss_loads: MOV SS in 64-bit mode [SDM Vol. 2B MOV: "IF SS is loaded ... IF segment selector is
 * NULL ... #GP(0)" unless CPL < 3 and RPL = CPL]. kvm-unit-tests x86/emulator ("mov null, %ss
 * (with ss.rpl != cpl)"): the engine took a null selector with RPL 3 at CPL 0, and the next
 * IRETQ with that SS in its frame raised #GP. Register, memory and MMIO operands (the emulator
 * test reads the selector from a device page). A GDT selector must name a writable data segment
 * with RPL = DPL = CPL, else #GP(selector) — the engine's #GP carried error code 0. MOV SS
 * blocking: on Intel the instruction after MOV SS takes no instruction breakpoint (kvm-unit-tests
 * emulator "#DB suppressed after MOV SS"); the one after it does. */
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

/* DR0 = the instruction after the MOV SS (mov_ss_next) or the one after that (mov_ss_later),
 * an execute breakpoint enabled in DR7 (L0, R/W0 = LEN0 = 0). Returns 0xFFFF when the probe
 * ran through, else the vector << 32 | the low half of the faulting RIP. */
extern char mov_ss_db[], mov_ss_next[], mov_ss_later[], mov_ss_cpuid[], mov_ss_after_cpuid[];
__asm__(".text\n mov_ss_db: endbr64\n mov %ss, %ecx\n mov %ecx, %ss\n"
        " mov_ss_next: xor %eax, %eax\n mov_ss_later: nop\n ret\n"
        /* the instruction in the shadow is one the CPU exits on (CPUID): the breakpoint after it fires */
        "mov_ss_cpuid: endbr64\n push %rbx\n xor %eax, %eax\n mov %ss, %ecx\n mov %ecx, %ss\n cpuid\n"
        " mov_ss_after_cpuid: nop\n pop %rbx\n ret\n");

static u64 breakpoint_at(char *probe, char *where)
{
    struct trap_record rec = {0};
    __asm__ volatile("mov %0, %%dr0" ::"r"((u64)where));
    __asm__ volatile("mov %0, %%dr7" ::"r"(0x401ul));
    bool faulted = run_catching((probe_fn)(void *)probe, 0, &rec);
    __asm__ volatile("mov %0, %%dr7" ::"r"(0x400ul));
    return faulted ? rec.vector << 32 | (rec.rip & 0xFFFFFFFFul) : 0xFFFF;
}

void kmain(void)
{
    kernel_init();
    tap_plan(9);
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
    gp = expect_fault(VEC_GP, SEL_KDATA, load_ss_reg, (void *)(u64)(SEL_KDATA | 3), &rec);
    tap_ok(gp && read_ss() == SEL_KDATA, "MOV SS: data selector with RPL 3 at CPL 0 -> #GP(selector)",
           "vector %lu error 0x%lx", rec.vector, rec.error);
    gp = expect_fault(VEC_GP, SEL_KCODE, load_ss_reg, (void *)(u64)SEL_KCODE, &rec);
    tap_ok(gp && read_ss() == SEL_KDATA, "MOV SS: code selector -> #GP(selector)", "vector %lu error 0x%lx",
           rec.vector, rec.error);
    u64 next = breakpoint_at(mov_ss_db, mov_ss_next), later = breakpoint_at(mov_ss_db, mov_ss_later);
    tap_ok(next == 0xFFFF && later == ((u64)VEC_DB << 32 | ((u64)mov_ss_later & 0xFFFFFFFFul)),
           "MOV SS blocking: no instruction breakpoint on the next instruction, one on the instruction after",
           "breakpoint after MOV SS 0x%lx, one later 0x%lx", next, later);
    u64 after_cpuid = breakpoint_at(mov_ss_cpuid, mov_ss_after_cpuid);
    tap_ok(after_cpuid == ((u64)VEC_DB << 32 | ((u64)mov_ss_after_cpuid & 0xFFFFFFFFul)),
           "MOV SS; CPUID: the breakpoint on the instruction after the CPUID fires (RF cleared)",
           "0x%lx", after_cpuid);
    tap_done();
}
