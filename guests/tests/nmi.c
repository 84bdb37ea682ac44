/* nmi: non-maskable interrupts end to end — the local APIC's ICR with delivery mode NMI, KVM_NMI,
 * injection at VM entry (VM_ENTRY_INTR_INFO type NMI), delivery through IDT vector 2 (an IST gate
 * here: IST2 and interrupt-SSP-table entry 2, the supervisor token taken and freed with shadow
 * stacks on) and blocking by NMI until IRET [SDM Vol. 3 §6.7.1 "Handling multiple NMIs", §11.6.1
 * (ICR delivery mode 100b), §28.6.1.2; KVM: process_nmi, vmx_nmi_blocked, NMI-window exiting].
 *  1. a self-NMI (physical destination) runs the vector-2 handler once, on IST2's shadow stack,
 *     and returns to the instruction after the ICR write with the SSP as it was;
 *  2. a self-NMI sent from inside the handler waits for the handler's IRETQ: it is delivered
 *     right after it (at the first NMI's return address), not nested;
 *  3. three more sent from inside the handler: one is delivered after the IRETQ, the others are
 *     lost (one NMI pending at most while NMIs are blocked);
 *  4. an NMI is taken with RFLAGS.IF = 0 (shorthand self);
 *  5. an NMI from another CPU wakes a CPU halted with IF = 0, which goes on after its HLT. */
#include "ktest.h"
#include "smp.h"

#define VEC_NMI 2
#define ICR_NMI 0x400u
#define ICR_SELF (1u << 18)
#define RFLAGS_IF (1ul << 9)
#define AP_STACK_SIZE 16384
#define WAIT_LIMIT 2000000ul
#define AP_DELAY 20000ul

extern char after_hlt[];
__asm__(".text\n"
        "halt_for_nmi: endbr64\n movl $1, bsp_halting(%rip)\n hlt\n after_hlt: ret\n");
void halt_for_nmi(void);

volatile int bsp_halting;
static volatile int nmis, nested_seen, sends_in_handler;
static volatile u64 rips[4], flags[4], entry_ssps[4];
static u8 ap_stack[AP_STACK_SIZE] ALIGNED(16);

static void send_self_nmi(void) { apic_send_ipi(apic_id(), ICR_NMI | ICR_LEVEL_ASSERT); }

/* The handler: record the frame; on the first NMI send `sends_in_handler` more to self and spin,
 * checking that none of them nests into this handler. */
static void nmi_handler(struct trap_frame *f)
{
    int n = nmis;
    if (n < 4) {
        rips[n] = f->rip;
        flags[n] = f->rflags;
        entry_ssps[n] = f->entry_ssp;
    }
    nmis = n + 1;
    if (n == 0) {
        for (int i = 0; i < sends_in_handler; i++)
            send_self_nmi();
        for (volatile int i = 0; i < 1000; i++)
            ;
        if (nmis != 1)
            nested_seen = 1;
    }
}

/* An IST2 delivery with shadow stacks: the SSP at the stub is ISST[2]'s token - 24 (the frame
 * CS, LIP, SSP pushed below the busy token). */
static bool on_ist_shadow_stack(u64 entry_ssp)
{
    return !cet.shstk || entry_ssp == cet.ist_token[2] - 24;
}

static void reset(int sends)
{
    nmis = nested_seen = 0;
    sends_in_handler = sends;
    for (int i = 0; i < 4; i++)
        rips[i] = flags[i] = entry_ssps[i] = 0;
}

extern char self_nmi_return[];
__asm__(".text\n"
        "self_nmi_physical: endbr64\n push %rbx\n mov %rdi, %rbx\n"
        "movl %esi, 0x300(%rbx)\n self_nmi_return: pop %rbx\n ret\n");
void self_nmi_physical(volatile void *apic, u32 icr_low);

static void test_self_nmi(void)
{
    reset(0);
    u64 ssp = rdssp();
    apic_write(APIC_ICR2, apic_id() << 24);
    self_nmi_physical((volatile void *)APIC_PHYS, ICR_NMI | ICR_LEVEL_ASSERT);
    int n = nmis;
    tap_ok(n == 1 && rips[0] == (u64)self_nmi_return && on_ist_shadow_stack(entry_ssps[0]) && rdssp() == ssp,
           "self-NMI through the ICR: the vector-2 handler runs once, on IST2's shadow stack, and returns",
           "%d NMIs, rip 0x%lx (expected 0x%lx), entry SSP 0x%lx (token 0x%lx), SSP 0x%lx -> 0x%lx", n, rips[0],
           (u64)self_nmi_return, entry_ssps[0], cet.ist_token[2], ssp, rdssp());
}

static void test_blocked_until_iret(void)
{
    reset(1);
    send_self_nmi();
    int n = nmis;
    tap_ok(n == 2 && !nested_seen && rips[1] == rips[0] && on_ist_shadow_stack(entry_ssps[1]),
           "an NMI sent in the NMI handler is delivered right after its IRETQ, not nested",
           "%d NMIs, nested %d, rips 0x%lx 0x%lx", n, nested_seen, rips[0], rips[1]);
}

static void test_one_pending_while_blocked(void)
{
    reset(3);
    send_self_nmi();
    int n = nmis;
    tap_ok(n == 2 && !nested_seen, "three NMIs sent while NMIs are blocked: one is delivered after the IRETQ",
           "%d NMIs, nested %d", n, nested_seen);
}

static void test_if_clear(void)
{
    reset(0);
    cli();
    apic_send_ipi(0, ICR_NMI | ICR_SELF);
    int n = nmis;
    tap_ok(n == 1 && !(flags[0] & RFLAGS_IF), "an NMI is taken with RFLAGS.IF = 0 (shorthand self)",
           "%d NMIs, RFLAGS 0x%lx", n, flags[0]);
}

static void ap_send_nmi(int cpu)
{
    (void)cpu;
    while (!bsp_halting)
        __asm__ volatile("pause");
    for (volatile u64 i = 0; i < AP_DELAY; i++)
        ;
    apic_send_ipi(0, ICR_NMI | ICR_LEVEL_ASSERT);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void test_hlt_wakes(void)
{
    if (fw_cfg_nb_cpus() < 2 || apic_id() != 0) {
        tap_skip("an NMI from another CPU wakes a CPU halted with IF = 0", "needs 2 CPUs (--smp 2)");
        return;
    }
    reset(0);
    if (!smp_start_ap(1, ap_send_nmi, (u64)(ap_stack + AP_STACK_SIZE))) {
        tap_ok(false, "an NMI from another CPU wakes a CPU halted with IF = 0", "AP 1 did not start");
        return;
    }
    cli();
    halt_for_nmi();
    int n = nmis;
    tap_ok(n == 1 && rips[0] == (u64)after_hlt && !(flags[0] & RFLAGS_IF),
           "an NMI from another CPU wakes a CPU halted with IF = 0",
           "%d NMIs, rip 0x%lx (after the HLT: 0x%lx), RFLAGS 0x%lx", n, rips[0], (u64)after_hlt, flags[0]);
}

static void body(void)
{
    kprintf("# CET at CPL0: shstk %d ibt %d\n", cet.shstk, cet.ibt);
    smp_init();
    irq_register(VEC_NMI, nmi_handler);
    test_self_nmi();
    test_blocked_until_iret();
    test_one_pending_while_blocked();
    test_if_clear();
    test_hlt_wakes();
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(5);
    cet_kernel_start(body, 0);
}
