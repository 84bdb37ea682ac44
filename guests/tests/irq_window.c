/* irq_window: interrupts that wait for RFLAGS.IF are taken at the instruction boundary where
 * the window opens [SDM Vol. 3 §6.8.1 (IF), §6.8.3 (the STI shadow covers one instruction),
 * §6.9 (the highest-priority pending interrupt first)] — kvm-unit-tests eventinj "vec 32/33"
 * and ioapic "simultaneous edge interrupts". cetvm took them only at the next exit, after
 * the CLI (or the IRETQ of the first handler) had closed the window again.
 *  - two self-IPIs pending with IF = 0, then "sti; nop; cli": both are taken at the CLI, the
 *    higher vector first, the second right after the first handler's IRETQ (same RIP);
 *  - one pending, then a POPF that sets IF: taken right after the POPF (no shadow). */
#include "ktest.h"
#include "smp.h"

#define VEC_LOW 0x50
#define VEC_HIGH 0x51

extern char sti_nop_cli[], sti_window_end[], popf_if[], popf_window_end[];
__asm__(".text\n"
        "sti_nop_cli: endbr64\n sti\n nop\n sti_window_end: cli\n ret\n"
        "popf_if: endbr64\n pushfq\n orq $0x200, (%rsp)\n popfq\n popf_window_end: cli\n ret\n");

static volatile u64 order[4], rips[4];
static volatile int taken;

static void record(struct trap_frame *f)
{
    if (taken < 4) {
        order[taken] = f->vector;
        rips[taken] = f->rip;
    }
    taken++;
    apic_eoi();
}

static void self_ipi(u8 vector) { apic_send_ipi(apic_id(), ICR_FIXED | vector); }

static const char *const names[] = {
    "two interrupts pending, STI; NOP; CLI: both taken at the CLI, the higher vector first",
    "one interrupt pending, POPF setting IF: taken right after the POPF",
};

void kmain(void)
{
    kernel_init();
    tap_plan(2);
    smp_init();
    irq_register(VEC_LOW, record);
    irq_register(VEC_HIGH, record);

    cli();
    self_ipi(VEC_LOW);
    self_ipi(VEC_HIGH);
    ((void (*)(void))sti_nop_cli)();
    int n = taken;
    tap_ok(n == 2 && order[0] == VEC_HIGH && order[1] == VEC_LOW && rips[0] == (u64)sti_window_end &&
               rips[1] == (u64)sti_window_end, names[0],
           "taken %d: 0x%lx at 0x%lx, 0x%lx at 0x%lx (CLI at 0x%lx)", n, order[0], rips[0], order[1], rips[1],
           (u64)sti_window_end);

    taken = 0;
    self_ipi(VEC_LOW);
    ((void (*)(void))popf_if)();
    n = taken;
    tap_ok(n == 1 && order[0] == VEC_LOW && rips[0] == (u64)popf_window_end, names[1],
           "taken %d: 0x%lx at 0x%lx (after the POPF: 0x%lx)", n, order[0], rips[0], (u64)popf_window_end);
    sti();
    tap_done();
}
