/* fast_events: the events cetvm delivers inside the engine on its native path (SYSCALL, SYSRETQ,
 * IRETQ, #PF) at the edges where it leaves them to the Python reference [issue 13]. Every line
 * must read the same on every CET path (tests/boot runs this kernel on each).
 *  - SYSRETQ with a non-canonical RCX -> #GP(0) at CPL0, RIP at the SYSRETQ [SDM SYSRET];
 *  - SYSCALL with IA32_EFER.SCE = 0 -> #UD at the SYSCALL [SDM SYSCALL];
 *  - IRETQ whose frame names a data segment as CS -> #GP(selector) at the IRETQ [SDM IRET];
 *  - a CPL0 write to a read-only page with CR0.WP = 1 -> #PF(P|W), CR2 = the address;
 *  - a CPL3 write to a supervisor page -> #PF(P|W|U) at the store, CR2 = the address, frame CS
 *    the user code selector, and with user shadow stacks SSP saved in IA32_PL3_SSP (the user
 *    function was called: one entry below the top);
 *  - a CPL3 read of a not-present page -> #PF(U) at the load;
 *  - a CPL3 REP MOVSB from its stack to a not-present page -> #PF(W|U), CR2 = the destination
 *    (the write faults; Python derives the error code the engine does not give it from the
 *    access that touches CR2's page: MOVS reads [RSI] and writes [RDI]);
 *  - many SYSCALL -> SYSRETQ round trips from CPL3 return the kernel's result each time;
 *  - a SYSCALL entry whose first instructions read a local APIC register (MMIO): the engine stops
 *    at the read in the run that went from CPL3 through a SYSCALL it delivered itself, and the
 *    read is decoded and done at CPL0 (a vCPU that still took itself for CPL3 fetched the kernel
 *    code as a user: #PF, and miscounted the instructions retired before the read). */
#include "ktest.h"
#include "platform.h"

extern char sysret_nc[], syscall_ud[], iret_bad_cs[];
__asm__(".text\n"
        "sysret_probe: endbr64\n"
        "  mov $0x0000800000000000, %rcx\n"
        "  mov $2, %r11\n"
        "sysret_nc: sysretq\n"
        "syscall_probe: endbr64\n"
        "syscall_ud: syscall\n"
        "  ret\n"
        "iret_probe: endbr64\n"
        "  mov %rsp, %rax\n"
        "  pushq $0x10\n"            /* SS */
        "  pushq %rax\n"             /* RSP */
        "  pushfq\n"
        "  pushq $0x10\n"            /* CS: the kernel data segment */
        "  lea 1f(%rip), %rax\n"
        "  pushq %rax\n"
        "iret_bad_cs: iretq\n"
        "1: ret\n");

/* SYSCALL entry for the last test: counts entries and reads the local APIC version register into
 * mmio_entry_value (RDX kept in a global: the stack is still the user's), then goes on at the
 * library's entry. RCX and R11 (the SYSCALL's) are left alone. */
#define LAPIC_VERSION 0x30
extern char mmio_syscall_entry[];
u64 mmio_entry_count, mmio_entry_rdx;
u32 mmio_entry_value;
__asm__(".text\n"
        "mmio_syscall_entry: endbr64\n"
        "  mov %rdx, mmio_entry_rdx(%rip)\n"
        "  movabs $0xFEE00030, %rdx\n"  /* LAPIC_PHYS + LAPIC_VERSION */
        "  mov (%rdx), %edx\n"
        "  mov %edx, mmio_entry_value(%rip)\n"
        "  incq mmio_entry_count(%rip)\n"
        "  mov mmio_entry_rdx(%rip), %rdx\n"
        "  jmp syscall_entry\n");
void sysret_probe(void *arg);
void syscall_probe(void *arg);
void iret_probe(void *arg);

static u8 ro_page[4096] __attribute__((aligned(4096)));
static u64 kernel_word;

static void write_ro(void *arg) { *(volatile u8 *)arg = 1; }

USER_CODE static void user_write_kernel(u64 address) { *(volatile u64 *)address = 5; }
USER_CODE static void user_read_unmapped(u64 address) { (void)*(volatile u64 *)address; }
USER_CODE static void user_movs_to_unmapped(u64 address)
{
    u8 source[16] = {1, 2, 3};
    u64 count = sizeof(source);
    __asm__ volatile("rep movsb" : "+D"(address), "+c"(count) : "S"(source) : "memory");
}
USER_CODE static void user_syscalls(u64 n)
{
    u64 sum = 0;
    for (u64 i = 0; i < n; i++)
        sum += user_syscall(SYS_ADD1, i) - i;
    user_syscall(SYS_EXIT, sum);
}
/* Each SYSCALL after a CPUID, which the vCPU emulates: the engine run that delivers the SYSCALL
 * starts at CPL3. */
USER_CODE static void user_cpuid_syscalls(u64 n)
{
    u64 sum = 0;
    for (u64 i = 0; i < n; i++) {
        u32 a = 0, b, c = 0, d;
        __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
        sum += user_syscall(SYS_ADD1, i) - i;
    }
    user_syscall(SYS_EXIT, sum);
}

#define UNMAPPED_USER 0x7f0000001000ul /* PML4 entry 254: never present */

static const char *names[] = {
    "SYSRETQ with a non-canonical RCX -> #GP(0) at CPL0, RIP at the SYSRETQ",
    "SYSCALL with EFER.SCE = 0 -> #UD at the SYSCALL",
    "IRETQ to a data segment as CS -> #GP(selector) at the IRETQ",
    "CPL0 write to a read-only page with CR0.WP = 1 -> #PF(P|W), CR2",
    "CPL3 write to a supervisor page -> #PF(P|W|U) at the store, CR2, user CS in the frame",
    "the same with a user shadow stack: SSP (one CALL deep) saved in IA32_PL3_SSP",
    "CPL3 read of a not-present page -> #PF(U) at the load",
    "CPL3 REP MOVSB to a not-present page -> #PF(W|U), CR2 the destination",
    "1000 SYSCALL -> SYSRETQ round trips from CPL3 return the kernel's result",
    "a SYSCALL entry reading a local APIC register (MMIO) first reads it at CPL0 on every SYSCALL",
};

static void body(void)
{
    struct trap_record rec = {0};
    bool f = run_catching(sysret_probe, NULL, &rec);
    tap_ok(f && rec.vector == VEC_GP && rec.error == 0 && rec.rip == (u64)sysret_nc && rec.cs == SEL_KCODE, names[0],
           "faulted %d vector %lu error 0x%lx rip 0x%lx cs 0x%lx", f, rec.vector, rec.error, rec.rip, rec.cs);

    u64 efer = rdmsr(MSR_EFER);
    wrmsr(MSR_EFER, efer & ~EFER_SCE);
    f = run_catching(syscall_probe, NULL, &rec);
    wrmsr(MSR_EFER, efer);
    tap_ok(f && rec.vector == VEC_UD && rec.rip == (u64)syscall_ud, names[1], "faulted %d vector %lu rip 0x%lx", f,
           rec.vector, rec.rip);

    f = run_catching(iret_probe, NULL, &rec);
    tap_ok(f && rec.vector == VEC_GP && rec.error == SEL_KDATA && rec.rip == (u64)iret_bad_cs, names[2],
           "faulted %d vector %lu error 0x%lx rip 0x%lx", f, rec.vector, rec.error, rec.rip);

    u64 *pte = pte_lookup((u64)ro_page);
    *pte &= ~PTE_RW;
    invlpg((u64)ro_page);
    f = run_catching(write_ro, ro_page + 24, &rec);
    *pte |= PTE_RW;
    invlpg((u64)ro_page);
    tap_ok(f && rec.vector == VEC_PF && rec.error == 3 && rec.cr2 == (u64)(ro_page + 24) && ro_page[24] == 0, names[3],
           "faulted %d vector %lu error 0x%lx cr2 0x%lx", f, rec.vector, rec.error, rec.cr2);

    struct user_opts plain = {0};
    struct user_result r = run_user(user_write_kernel, (u64)&kernel_word, &plain);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_PF && r.trap.error == 7 && r.trap.cr2 == (u64)&kernel_word &&
               r.trap.cs == SEL_UCODE && kernel_word == 0,
           names[4], "kind %d vector %lu error 0x%lx cr2 0x%lx cs 0x%lx", r.kind, r.trap.vector, r.trap.error,
           r.trap.cr2, r.trap.cs);
    if (cpu_has_shstk()) {
        struct user_opts shstk = {.u_cet = CET_SH_STK_EN, .shstk = true};
        r = run_user(user_write_kernel, (u64)&kernel_word, &shstk);
        tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_PF && r.trap.error == 7 &&
                   r.pl3_ssp_after == user_ssp_top() - 8,
               names[5], "kind %d vector %lu error 0x%lx PL3_SSP 0x%lx (top 0x%lx)", r.kind, r.trap.vector,
               r.trap.error, r.pl3_ssp_after, user_ssp_top());
    } else {
        tap_skip(names[5], "CPUID lacks SHSTK");
    }
    r = run_user(user_read_unmapped, UNMAPPED_USER, &plain);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_PF && r.trap.error == 4 && r.trap.cr2 == UNMAPPED_USER,
           names[6], "kind %d vector %lu error 0x%lx cr2 0x%lx", r.kind, r.trap.vector, r.trap.error, r.trap.cr2);
    r = run_user(user_movs_to_unmapped, UNMAPPED_USER, &plain);
    tap_ok(r.kind == USER_FAULTED && r.trap.vector == VEC_PF && r.trap.error == 6 && r.trap.cr2 == UNMAPPED_USER,
           names[7], "kind %d vector %lu error 0x%lx cr2 0x%lx", r.kind, r.trap.vector, r.trap.error, r.trap.cr2);

    struct user_opts opts = {.u_cet = cpu_has_shstk() ? CET_SH_STK_EN : 0, .shstk = cpu_has_shstk()};
    r = run_user(user_syscalls, 1000, &opts);
    tap_ok(r.kind == USER_EXITED && r.code == 1000, names[8], "kind %d code %lu vector %lu", r.kind, r.code,
           r.trap.vector);

    platform_map();
    u32 version = lapic_read(LAPIC_VERSION);
    u64 lstar = rdmsr(MSR_LSTAR);
    wrmsr(MSR_LSTAR, (u64)mmio_syscall_entry);
    r = run_user(user_cpuid_syscalls, 50, &plain);
    wrmsr(MSR_LSTAR, lstar);
    tap_ok(r.kind == USER_EXITED && r.code == 50 && mmio_entry_count == 51 && version != 0 &&
               mmio_entry_value == version,
           names[9], "kind %d code %lu entries %lu version 0x%x read 0x%x", r.kind, r.code, mmio_entry_count,
           version, mmio_entry_value);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(10);
    cet_kernel_start(body, 0);
}
