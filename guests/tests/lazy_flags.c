/* lazy_flags: CMPXCHG16B and CMPXCHG8B leave every flag but ZF as the instruction before them
 * set it [SDM Vol. 2A CMPXCHG8B/CMPXCHG16B: "ZF is set if ... cleared otherwise; the CF, PF, AF,
 * SF and OF flags are unaffected"], wherever the engine's runs start and end.
 *
 * Why it needs a test: the engine (Unicorn 2.1.4, QEMU 5.0's TCG) computes their flags from its
 * lazy condition-code state as it was last stored in memory, without storing the state the
 * instructions before them in the same translation block left (every other helper that reads
 * the flags stores it first). Inside a block that follows another, the stored state names the
 * other block's last flag operation: wrong CF/PF/AF/SF/OF. At the start of each engine run, and
 * after each RFLAGS write through the engine's API (the SYSCALL that cetvm's native path
 * delivers), it says "the flags are this word"; an ADD then puts its operand in that word, and
 * CMPXCHG16B took the operand as RFLAGS: with the Linux guest's slab allocator (ADD; ...;
 * CMPXCHG16B at the top of a run) RFLAGS.VM came on and the next PUSHF was #GP. cetvm makes the
 * engine store the state in front of each CMPXCHG8B/16B (cetvm.cpu.flag_sync). The operands of
 * the ADD/SUB below have RFLAGS.VM and other bits no flag can have; each case compares the whole
 * RFLAGS with the ADD's/SUB's own:
 *  - CPUID (the vCPU emulates it: the next run starts after it); ADD; CMPXCHG16B that fails;
 *  - CPUID; SUB; CMPXCHG8B that succeeds (ZF set, the other flags the SUB's);
 *  - a SYSCALL entry whose first block is ADD; CMPXCHG16B (20 SYSCALLs from CPL3);
 *  - a loop of XOR; ADD; CMPXCHG16B, block after block and across engine runs (the VMM's run
 *    slices and the budget's stops in front of blocks start runs inside it). */
#include "ktest.h"

#define RFLAGS_CF (1ul << 0)
#define RFLAGS_PF (1ul << 2)
#define RFLAGS_AF (1ul << 4)
#define RFLAGS_ZF (1ul << 6)
#define RFLAGS_SF (1ul << 7)
#define RFLAGS_OF (1ul << 11)
#define RFLAGS_VM (1ul << 17)
#define ARITH (RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF)
/* What the SYSCALL entry compares of RFLAGS (its AND immediate): ARITH, VM and the bits that are
 * reserved as 0 (3, 5, 15, 22-63). */
#define ENTRY_KEPT 0xFFFFFFFFFFC288FDul

/* ADD operands: the sum carries and overflows (CF, OF, PF set); the second has RFLAGS.VM and the
 * bits the Linux guest's RFLAGS showed (0x2264000). */
#define ADD_X 0x8000000000000000ul
#define ADD_Y 0x8000000002264000ul
/* SUB operands: 0x20001 - 0x20002 = -1 (CF, PF, AF, SF set); the second has RFLAGS.VM. */
#define SUB_X 0x20001ul
#define SUB_Y 0x20002ul

static u64 cx_mem[2] __attribute__((aligned(16)));

/* RFLAGS after ``ADD y, x`` alone (the reference the cases compare with). */
static u64 flags_of_add(u64 x, u64 y)
{
    u64 flags;
    __asm__ volatile("add %[y], %[x]\n\tpushfq\n\tpop %[f]" : [f] "=r"(flags), [x] "+r"(x) : [y] "r"(y) : "cc");
    return flags;
}

static u64 flags_of_sub(u64 x, u64 y)
{
    u64 flags;
    __asm__ volatile("sub %[y], %[x]\n\tpushfq\n\tpop %[f]" : [f] "=r"(flags), [x] "+r"(x) : [y] "r"(y) : "cc");
    return flags;
}

/* CPUID; ADD y, x; CMPXCHG16B cx_mem against RDX:RAX = hi:lo; RFLAGS right after it. The XOR at
 * the end leaves the engine a fresh flag state whatever happened (a wrong RFLAGS stays in the
 * result only). */
static u64 cmpxchg16b_after_cpuid(u64 x, u64 y, u64 lo, u64 hi)
{
    u64 flags;
    __asm__ volatile("xor %%eax, %%eax\n\t"
                     "xor %%ecx, %%ecx\n\t"
                     "cpuid\n\t"
                     "mov %[lo], %%rax\n\t"
                     "mov %[hi], %%rdx\n\t"
                     "mov %[lo], %%rbx\n\t"
                     "mov %[hi], %%rcx\n\t"
                     "add %[y], %[x]\n\t"
                     "cmpxchg16b %[mem]\n\t"
                     "pushfq\n\t"
                     "pop %[f]\n\t"
                     "xor %%eax, %%eax"
                     : [f] "=&r"(flags), [x] "+&r"(x), [mem] "+m"(cx_mem)
                     : [y] "r"(y), [lo] "r"(lo), [hi] "r"(hi)
                     : "rax", "rbx", "rcx", "rdx", "cc", "memory");
    return flags;
}

/* CPUID; SUB y, x; CMPXCHG8B cx_mem against EDX:EAX = the low quadword's halves (equal: the
 * exchange happens); RFLAGS right after it. */
static u64 cmpxchg8b_after_cpuid(u64 x, u64 y, u64 expected, u64 replacement)
{
    u64 flags;
    __asm__ volatile("xor %%eax, %%eax\n\t"
                     "xor %%ecx, %%ecx\n\t"
                     "cpuid\n\t"
                     "mov %[e], %%rax\n\t"
                     "mov %[e], %%rdx\n\t"
                     "shr $32, %%rdx\n\t"
                     "mov %[r], %%rbx\n\t"
                     "mov %[r], %%rcx\n\t"
                     "shr $32, %%rcx\n\t"
                     "sub %[y], %[x]\n\t"
                     "cmpxchg8b %[mem]\n\t"
                     "pushfq\n\t"
                     "pop %[f]\n\t"
                     "xor %%eax, %%eax"
                     : [f] "=&r"(flags), [x] "+&r"(x), [mem] "+m"(cx_mem[0])
                     : [y] "r"(y), [e] "r"(expected), [r] "r"(replacement)
                     : "rax", "rbx", "rcx", "rdx", "cc", "memory");
    return flags;
}

/* SYSCALL entry: the first block after the SYSCALL (a new engine run when the SYSCALL is
 * emulated; an RFLAGS write of the native delivery otherwise) does ADD; CMPXCHG16B (failing) on
 * a private stack and registers it saves, counts the entries whose RFLAGS is not the ADD's
 * arithmetic flags with ZF clear (entry_bad) and keeps the last RFLAGS (entry_flags); then the
 * library's entry. */
extern char cx_syscall_entry[];
u64 entry_save[7], entry_count, entry_bad, entry_flags, entry_expect;
static u8 entry_stack[512] __attribute__((aligned(16)));
u8 *entry_stack_top = entry_stack + sizeof(entry_stack);
__asm__(".text\n"
        "cx_syscall_entry: endbr64\n"
        "  mov %rax, entry_save+0(%rip)\n"
        "  mov %rbx, entry_save+8(%rip)\n"
        "  mov %rcx, entry_save+16(%rip)\n"
        "  mov %rdx, entry_save+24(%rip)\n"
        "  mov %r8, entry_save+32(%rip)\n"
        "  mov %r9, entry_save+40(%rip)\n"
        "  mov %rsp, entry_save+48(%rip)\n"
        "  mov entry_stack_top(%rip), %rsp\n"
        "  movabs $0x8000000000000000, %r8\n"  /* ADD_X */
        "  movabs $0x8000000002264000, %r9\n"  /* ADD_Y */
        "  mov $1, %eax\n"                     /* RDX:RAX = 0:1, never cx_mem's 0:0 */
        "  xor %edx, %edx\n"
        "  xor %ebx, %ebx\n"
        "  xor %ecx, %ecx\n"
        "  add %r9, %r8\n"
        "  cmpxchg16b cx_mem(%rip)\n"
        "  pushfq\n"
        "  pop %r8\n"
        "  mov %r8, entry_flags(%rip)\n"
        "  and $0xFFFFFFFFFFC288FD, %r8\n"     /* ENTRY_KEPT */
        "  cmp entry_expect(%rip), %r8\n"
        "  je 1f\n"
        "  incq entry_bad(%rip)\n"
        "1: incq entry_count(%rip)\n"
        "  mov entry_save+0(%rip), %rax\n"
        "  mov entry_save+8(%rip), %rbx\n"
        "  mov entry_save+16(%rip), %rcx\n"
        "  mov entry_save+24(%rip), %rdx\n"
        "  mov entry_save+32(%rip), %r8\n"
        "  mov entry_save+40(%rip), %r9\n"
        "  mov entry_save+48(%rip), %rsp\n"
        "  jmp syscall_entry\n");

USER_CODE static void user_syscalls(u64 n)
{
    u64 sum = 0;
    for (u64 i = 0; i < n; i++)
        sum += user_syscall(SYS_ADD1, i) - i;
    user_syscall(SYS_EXIT, sum);
}

/* ``n`` times ADD; CMPXCHG16B (failing): how many RFLAGS differed from ``expect``. */
static u64 cmpxchg16b_loop(u64 n, u64 expect)
{
    u64 bad = 0;
    for (u64 i = 0; i < n; i++) {
        u64 x = ADD_X, flags;
        __asm__ volatile("mov $1, %%eax\n\t"
                         "xor %%edx, %%edx\n\t"
                         "xor %%ebx, %%ebx\n\t"
                         "xor %%ecx, %%ecx\n\t"
                         "add %[y], %[x]\n\t"
                         "cmpxchg16b %[mem]\n\t"
                         "pushfq\n\t"
                         "pop %[f]"
                         : [f] "=&r"(flags), [x] "+&r"(x), [mem] "+m"(cx_mem)
                         : [y] "r"(ADD_Y)
                         : "rax", "rbx", "rcx", "rdx", "cc", "memory");
        bad += flags != expect;
    }
    return bad;
}

#define LOOPS 300000ul

static const char *names[] = {
    "CPUID; ADD; CMPXCHG16B (no match): RFLAGS is the ADD's with ZF clear",
    "CPUID; SUB; CMPXCHG8B (match): RFLAGS is the SUB's with ZF set, memory exchanged",
    "a SYSCALL entry starting with ADD; CMPXCHG16B: RFLAGS is the ADD's on all 20 SYSCALLs",
    "300000 x ADD; CMPXCHG16B in a loop, across engine runs: RFLAGS is the ADD's every time",
};

static void body(void)
{
    u64 add_flags = flags_of_add(ADD_X, ADD_Y);
    u64 expect = add_flags & ~RFLAGS_ZF;
    cx_mem[0] = cx_mem[1] = 0;
    u64 got = cmpxchg16b_after_cpuid(ADD_X, ADD_Y, 1, 0);
    tap_ok(got == expect && (add_flags & ARITH) == (RFLAGS_CF | RFLAGS_PF | RFLAGS_OF), names[0],
           "RFLAGS 0x%lx, the ADD's 0x%lx", got, add_flags);

    u64 sub_flags = flags_of_sub(SUB_X, SUB_Y);
    cx_mem[0] = 0x1122334455667788ul;
    got = cmpxchg8b_after_cpuid(SUB_X, SUB_Y, cx_mem[0], 0x99AABBCCDDEEFF00ul);
    tap_ok(got == (sub_flags | RFLAGS_ZF) && cx_mem[0] == 0x99AABBCCDDEEFF00ul &&
               (sub_flags & ARITH) == (RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_SF),
           names[1], "RFLAGS 0x%lx, the SUB's 0x%lx, memory 0x%lx", got, sub_flags, cx_mem[0]);

    cx_mem[0] = cx_mem[1] = 0;
    entry_expect = add_flags & ARITH & ~RFLAGS_ZF; /* and VM and the reserved bits clear */
    u64 lstar = rdmsr(MSR_LSTAR);
    wrmsr(MSR_LSTAR, (u64)cx_syscall_entry);
    struct user_opts plain = {0};
    struct user_result r = run_user(user_syscalls, 20, &plain);
    wrmsr(MSR_LSTAR, lstar);
    tap_ok(r.kind == USER_EXITED && r.code == 20 && entry_count == 21 && entry_bad == 0, names[2],
           "kind %d code %lu entries %lu wrong %lu, last RFLAGS 0x%lx", r.kind, r.code, entry_count, entry_bad,
           entry_flags);

    u64 bad = cmpxchg16b_loop(LOOPS, expect);
    tap_ok(bad == 0, names[3], "%lu of %lu wrong", bad, LOOPS);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(4);
    cet_kernel_start(body, 0);
}
