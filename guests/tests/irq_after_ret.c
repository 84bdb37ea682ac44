/* irq_after_ret: an external interrupt taken right after a RET sees the RET's shadow-stack pop
 * done. Interrupts are taken at instruction boundaries [SDM Vol. 3 §6.6]; the pop-and-compare is
 * part of the RET [SDM Vol. 1 §17.2.3], so the SSP the delivery saves (IA32_PL3_SSP at CPL3, the
 * SSP in the shadow-stack frame at CPL0) is the SSP after the pop, and IRET brings it back.
 *
 * The loops below call a function whose RET returns to RDSSP (an instruction cetvm emulates: the
 * engine stops there) while a periodic local APIC timer interrupts them. Whenever a tick falls
 * between the RET and the RDSSP (the RET ends a run's instruction budget, the interrupt is
 * injected before the next run), the interrupt is delivered where the engine stopped with the
 * RET's pop still to do: that pop must not be lost (the kernel's test_shadow_stack_64 on cetvm
 * found a RET entry left on a user shadow stack). Each RDSSP must read the loop's own SSP.
 * The tick period (in APIC timer counts) is not a multiple of the loop's length, so ticks fall
 * at every instruction boundary of it. SKIP without SHSTK in CPUID. */
#include "ktest.h"
#include "platform.h"

#define VEC_TICK 0x44
#define PERIOD 4099         /* timer counts between ticks (ns at DIV1): prime, not a multiple of the loop; longer than
                               a tick's own cost (its EOI exit takes 1 us of guest time) */
#define ITERATIONS 20000
#define MIN_TICKS 20

/* ret_loop(n): n times CALL a bare RET whose target is RDSSP; returns how many RDSSPs read
 * another SSP than the one the loop started with. The same code, in .utext for CPL3. */
extern u64 kret_loop(u64 n);
extern u64 uret_loop(u64 n);
#define RET_LOOP(name)                                                              \
    #name ": endbr64\n push %rbx\n xor %ebx, %ebx\n rdsspq %rbx\n xor %eax, %eax\n"  \
    "1: call 3f\n"                                                                  \
    " rdsspq %rcx\n"      /* the RET's target: an instruction cetvm emulates */     \
    " cmp %rbx, %rcx\n je 2f\n inc %rax\n mov %rbx, %rcx\n"                         \
    "2: dec %rdi\n jnz 1b\n pop %rbx\n ret\n"                                        \
    "3: ret\n"
__asm__(".text\n" RET_LOOP(kret_loop)
        ".pushsection .utext, \"ax\"\n" RET_LOOP(uret_loop) ".popsection\n");

static volatile u64 ticks;

static void tick(struct trap_frame *f)
{
    (void)f;
    ticks++;
    lapic_eoi();
}

USER_CODE static void user_ret_loop(u64 n)
{
    user_syscall(SYS_EXIT, uret_loop(n));
}

static void timer_periodic(u32 count) { lapic_write(LAPIC_TMICT, count); }

static const char *const names[] = {
    "CPL0: interrupts right after a RET keep its pop (each RDSSP at its target reads the loop's SSP)",
    "CPL3: interrupts right after a RET keep its pop (IA32_PL3_SSP saved after the pop)",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    if (!cet.shstk)
        tap_skip_rest(names, 0, N_TESTS, "CPUID lacks SHSTK");
    platform_map();
    irq_register(VEC_TICK, tick);
    lapic_write(LAPIC_SVR, 0x1FF);
    lapic_write(LAPIC_TDCR, TDCR_DIV1);
    lapic_write(LAPIC_LVTT, LVT_TIMER_PERIODIC | VEC_TICK);

    timer_periodic(PERIOD);
    sti();
    u64 bad = kret_loop(ITERATIONS);
    cli();
    timer_periodic(0);
    u64 seen = ticks;
    tap_ok(bad == 0 && seen >= MIN_TICKS, names[0], "%lu wrong SSPs, %lu ticks", bad, seen);

    struct user_opts opts = {.u_cet = CET_SH_STK_EN, .shstk = true, .interrupts = true};
    ticks = 0;
    timer_periodic(PERIOD);
    struct user_result r = run_user(user_ret_loop, ITERATIONS, &opts);
    timer_periodic(0);
    seen = ticks;
    tap_ok(r.kind == USER_EXITED && r.code == 0 && seen >= MIN_TICKS, names[1], "exit kind %d code %lu, %lu ticks",
           r.kind, r.code, seen);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
