/* rdrand: RDRAND from cetvm's deterministic generator [issue 10: Linux's KASLR and CRNG seed made
 * every boot different; SDM Vol. 2 RDRAND]. CF = 1 and OF/SF/ZF/AF/PF = 0 after every RDRAND;
 * 16/32-bit forms write only their width (16) or zero-extend (32); successive values differ; the
 * same works at CPL3. The values are printed: the test boots twice and compares them. */
#include "ktest.h"

#define ARITH_FLAGS 0x8D5ul /* CF PF AF ZF SF OF */

static u64 rdrand64(u64 *flags)
{
    u64 v, f;
    __asm__ volatile("xor %%eax, %%eax; cmp $1, %%eax; rdrand %0; pushfq; pop %1" : "=r"(v), "=r"(f) :: "rax", "cc");
    *flags = f;
    return v;
}

extern char user_rdrand[];
__asm__(".pushsection .utext, \"ax\"\n"
        "user_rdrand: endbr64\n rdrand %rdi\n jnc 1f\n mov $60, %eax\n syscall\n"
        "1: ud2\n"
        ".popsection\n");

static const char *names[] = {
    "RDRAND r64: CF = 1, OF/SF/ZF/AF/PF = 0",
    "successive RDRANDs differ",
    "RDRAND r16 keeps bits 63:16, r32 zero-extends",
    "RDRAND at CPL3",
};
#define N_TESTS (int)(sizeof(names) / sizeof(names[0]))

static void body(void)
{
    u64 f1, f2;
    u64 a = rdrand64(&f1), b = rdrand64(&f2);
    tap_ok((f1 & ARITH_FLAGS) == 1 && (f2 & ARITH_FLAGS) == 1, names[0], "flags 0x%lx 0x%lx", f1, f2);
    tap_ok(a != b, names[1], "0x%lx 0x%lx", a, b);
    kprintf("# values 0x%lx 0x%lx\n", a, b);
    u64 r16 = 0x1122334455667788ul, r32 = 0x1122334455667788ul;
    __asm__ volatile("rdrand %w0" : "+r"(r16) :: "cc");
    __asm__ volatile("rdrand %k0" : "+r"(r32) :: "cc");
    tap_ok((r16 >> 16) == 0x112233445566ul && (r32 >> 32) == 0, names[2], "r16 0x%lx r32 0x%lx", r16, r32);
    struct user_opts opts = {0};
    struct user_result r = run_user((void (*)(u64))user_rdrand, 0, &opts);
    tap_ok(r.kind == USER_EXITED, names[3], "kind %d vector %lu", r.kind, r.trap.vector);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(N_TESTS);
    cet_kernel_start(body, 0);
}
