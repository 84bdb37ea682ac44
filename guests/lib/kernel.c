/* kernel.c - GDT/TSS/IDT, paging, the trap dispatcher, fault expectations, CET setup and
 * ring-3 entry for the CET test kernels. */
#include "ktest.h"

/* ---------------- layout of the CET region (4 KiB pages, see map_page) ---------------- */
#define SHSTK_MAIN (CET_REGION_BASE + 0x10000)     /* M: main kernel shadow stack */
#define SHSTK_USER_ENTRY (CET_REGION_BASE + 0x12000) /* K: PL0_SSP while at CPL3 */
#define SHSTK_IST(n) (CET_REGION_BASE + 0x14000 + 0x2000 * ((n) - 1)) /* IST1..3 */
#define USER_STACK (CET_REGION_BASE + 0x20000)
#define USER_SHSTK (CET_REGION_BASE + 0x22000)
#define PAGE_POOL_PAGES 64
#define KSTACK_SIZE 16384

struct tss64 {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} __attribute__((packed));

struct idt_entry {
    u16 offset_low, selector;
    u8 ist, type_attr;
    u16 offset_mid;
    u32 offset_high, zero;
} __attribute__((packed));

struct user_ctx {              /* shared with entry.S: keep offsets in sync */
    u64 krsp, m_restore, k_restore, k_token, rip, rsp, arg;
    u8 kshstk, pad[7];
    u64 fn;
    u64 cs;
    u64 rflags;
};

/* The one CPU's kernel state. */
struct ktest_cpu {
    struct tss64 tss ALIGNED(16);
    struct idt_entry idt[256] ALIGNED(16);
    u64 pml4[512] ALIGNED(4096);
    u64 pdpt[512] ALIGNED(4096);
    u64 pd_low[512] ALIGNED(4096);
    u64 pt_low[2][512] ALIGNED(4096);
    u8 pool[PAGE_POOL_PAGES][4096] ALIGNED(4096);
    int pool_used;
    u8 trap_stack[KSTACK_SIZE] ALIGNED(16);
    u8 ist_stack[3][4096] ALIGNED(16);
    u64 isst[8] ALIGNED(64);   /* interrupt SSP table: entries 1..7 */
    struct try_state *armed;
    struct user_ctx uctx;
    struct user_result uresult;
    void (*kernel_main)(void);
    irq_handler_fn irq_handlers[256];
};
static struct ktest_cpu this_cpu;

struct cet_kernel cet;
u64 kernel_rsp0;               /* read by syscall_entry */
u64 syscall_user_rsp;          /* scratch for syscall_entry */

extern u64 gdt[];
extern struct { u16 limit; u64 base; } __attribute__((packed)) gdt_desc;
extern char isr_stubs[];
extern char syscall_entry[];
extern char user_start[];
extern void cet_enable_and_call(u64 s_cet, void (*fn)(void), int shstk);
extern u64 run_user_enter(struct user_ctx *ctx);
extern NORETURN void user_return_to_kernel(struct user_ctx *ctx, u64 value);
void trap(struct trap_frame *f);

/* ---------------- CPUID ---------------- */
struct cpuid_regs cpuid(u32 leaf, u32 subleaf)
{
    struct cpuid_regs r;
    __asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
                     : "a"(leaf), "c"(subleaf));
    return r;
}

static u32 max_basic_leaf(void) { return cpuid(0, 0).eax; }
bool cpu_has_shstk(void) { return max_basic_leaf() >= 7 && (cpuid(7, 0).ecx & (1u << 7)); }
bool cpu_has_ibt(void) { return max_basic_leaf() >= 7 && (cpuid(7, 0).edx & (1u << 20)); }
bool cpu_has_xsave(void) { return cpuid(1, 0).ecx & (1u << 26); }
bool cpu_has_xsaves(void)
{
    return cpu_has_xsave() && max_basic_leaf() >= 0xD && (cpuid(0xD, 1).eax & (1u << 3));
}
u64 cpu_supported_xss(void)
{
    if (!cpu_has_xsaves())
        return 0;
    struct cpuid_regs r = cpuid(0xD, 1);
    return r.ecx | ((u64)r.edx << 32);
}

/* ---------------- paging ---------------- */
#define TABLE_FLAGS (PTE_P | PTE_RW | PTE_US) /* upper levels permit everything; leaves decide */

u64 alloc_page(void)
{
    if (this_cpu.pool_used >= PAGE_POOL_PAGES) {
        puts_serial("Bail out! page pool exhausted\n");
        exit_qemu(1);
    }
    u8 *p = this_cpu.pool[this_cpu.pool_used++];
    memset(p, 0, PAGE_SIZE);
    return (u64)p;
}

static u64 *next_table(u64 *table, unsigned index)
{
    if (!(table[index] & PTE_P))
        table[index] = alloc_page() | TABLE_FLAGS;
    if (table[index] & PTE_PS) {
        puts_serial("Bail out! map_page over a large page\n");
        exit_qemu(1);
    }
    return (u64 *)(table[index] & 0x000FFFFFFFFFF000ul);
}

static u64 *leaf_slot(u64 va, bool create)
{
    u64 *t = this_cpu.pml4;
    for (int shift = 39; shift > 12; shift -= 9) {
        unsigned idx = (va >> shift) & 511;
        if (!create && (!(t[idx] & PTE_P) || (t[idx] & PTE_PS)))
            return NULL;
        t = next_table(t, idx);
    }
    return &t[(va >> 12) & 511];
}

void map_page(u64 va, u64 pa, u64 flags)
{
    *leaf_slot(va, true) = (pa & ~0xFFFul) | flags;
    invlpg(va);
}

u64 *pte_lookup(u64 va) { return leaf_slot(va, false); }

u64 map_data_page(u64 va, bool user)
{
    u64 pa = alloc_page();
    map_page(va, pa, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX | (user ? PTE_US : 0));
    return pa;
}

/* A shadow-stack page is a leaf with R/W=0 and D=1 [SDM Vol. 1 ch. 18 Paging].  Tokens are written while the
 * page is still an ordinary data page (no WRSS needed), then it becomes a shadow-stack page. */
u64 map_shstk_page(u64 va, bool user, const u64 *init, int n_init)
{
    u64 pa = map_data_page(va, false);
    for (int i = 0; i < n_init; i++)
        ((u64 *)(va + PAGE_SIZE))[-1 - i] = init[i];
    map_page(va, pa, PTE_P | PTE_A | PTE_D | PTE_NX | (user ? PTE_US : 0));
    return pa;
}

static void set_user_range(char *start, char *end, u64 extra)
{
    for (u64 va = (u64)start; va < (u64)end; va += PAGE_SIZE)
        map_page(va, va, PTE_P | PTE_US | PTE_A | extra);
}

/* Identity map: 0..4 MiB as 4 KiB pages (page 0 absent, .utext/.udata user pages),
 * 4 MiB..1 GiB as 2 MiB pages; the CET region (1 GiB) is filled by map_page. */
static void paging_init(void)
{
    struct ktest_cpu *c = &this_cpu;
    c->pml4[0] = (u64)c->pdpt | TABLE_FLAGS;
    c->pdpt[0] = (u64)c->pd_low | TABLE_FLAGS;
    for (int i = 0; i < 2; i++) {
        c->pd_low[i] = (u64)c->pt_low[i] | TABLE_FLAGS;
        for (int j = 0; j < 512; j++)
            c->pt_low[i][j] = ((u64)(i * 512 + j) << 12) | PTE_P | PTE_RW;
    }
    c->pt_low[0][0] = 0;
    for (int i = 2; i < 512; i++)
        c->pd_low[i] = ((u64)i << 21) | PTE_P | PTE_RW | PTE_PS;
    set_user_range(__utext_start, __utext_end, 0);
    set_user_range(__udata_start, __udata_end, PTE_RW | PTE_D | PTE_NX);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_NXE);
    write_cr3((u64)c->pml4);
}

/* ---------------- GDT / TSS / IDT / SYSCALL ---------------- */
static void tss_init(void)
{
    struct ktest_cpu *c = &this_cpu;
    u64 base = (u64)&c->tss;
    u64 limit = sizeof(struct tss64) - 1;
    kernel_rsp0 = (u64)(c->trap_stack + KSTACK_SIZE);
    c->tss.rsp[0] = kernel_rsp0;
    for (int i = 0; i < 3; i++)
        c->tss.ist[i] = (u64)(c->ist_stack[i] + 4096);
    c->tss.iomap_base = sizeof(struct tss64);
    gdt[SEL_TSS / 8] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ul << 40) |
                       ((limit >> 16 & 0xF) << 48) | ((base >> 24 & 0xFF) << 56);
    gdt[SEL_TSS / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(SEL_TSS));
}

static void idt_set(unsigned vec, u64 handler, unsigned ist, unsigned dpl)
{
    struct idt_entry *e = &this_cpu.idt[vec];
    e->offset_low = handler & 0xFFFF;
    e->selector = SEL_KCODE;
    e->ist = ist;
    e->type_attr = 0x8E | (dpl << 5);   /* present 64-bit interrupt gate */
    e->offset_mid = (handler >> 16) & 0xFFFF;
    e->offset_high = handler >> 32;
    e->zero = 0;
}

void idt_set_gate(unsigned vector, unsigned ist, unsigned dpl)
{
    if (vector < 256)
        idt_set(vector, (u64)isr_stubs + 16 * vector, ist & 7, dpl & 3);
}

void isst_set(unsigned n, u64 ssp)
{
    if (n >= 1 && n <= 7)
        this_cpu.isst[n] = ssp;
}

void tss_set_ist(unsigned n, u64 rsp)
{
    if (n >= 1 && n <= 7)
        this_cpu.tss.ist[n - 1] = rsp;
}

/* #DF, NMI and #MC run on IST1..3 (fatal); INT 0x80 is callable from ring 3. */
static void idt_init(void)
{
    for (unsigned v = 0; v < 256; v++)
        idt_set(v, (u64)isr_stubs + 16 * v, 0, 0);
    idt_set(VEC_DF, (u64)isr_stubs + 16 * VEC_DF, 1, 0);
    idt_set(2, (u64)isr_stubs + 16 * 2, 2, 0);
    idt_set(18, (u64)isr_stubs + 16 * 18, 3, 0);
    idt_set(VEC_SYSCALL_INT, (u64)isr_stubs + 16 * VEC_SYSCALL_INT, 0, 3);
    struct { u16 limit; u64 base; } __attribute__((packed)) d = {
        sizeof(this_cpu.idt) - 1, (u64)this_cpu.idt};
    __asm__ volatile("lidt %0" ::"m"(d));
}

void cpu_load_idt(void)
{
    struct { u16 limit; u64 base; } __attribute__((packed)) d = {
        sizeof(this_cpu.idt) - 1, (u64)this_cpu.idt};
    __asm__ volatile("lidt %0" ::"m"(d));
}

/* STAR[47:32] = kernel CS (SS = +8); STAR[63:48] = 0x1B so SYSRET loads CS 0x2B, SS 0x23. */
static void syscall_init(void)
{
    wrmsr(MSR_STAR, ((u64)SEL_UCODE32 << 48) | ((u64)SEL_KCODE << 32));
    wrmsr(MSR_LSTAR, (u64)syscall_entry);
    wrmsr(MSR_FMASK, 0x47700);          /* clear TF, IF, DF, IOPL, NT, AC */
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
}

static void user_pages_init(void)
{
    map_data_page(USER_STACK, true);
    map_shstk_page(USER_SHSTK, true, NULL, 0);
}

extern u32 boot_mb_magic, boot_mb_info;

const char *kernel_cmdline(void)
{
    if (boot_mb_magic != 0x2BADB002u || !boot_mb_info)
        return "";
    const u32 *info = (const u32 *)(u64)boot_mb_info;
    if (!(info[0] & (1u << 2)) || !info[4])
        return "";
    return (const char *)(u64)info[4];
}

const char *cmdline_value(const char *key)
{
    for (const char *p = kernel_cmdline(); *p; p++) {
        int i = 0;
        while (key[i] && p[i] == key[i])
            i++;
        if (!key[i])
            return p + i;
    }
    return NULL;
}

bool cmdline_has(const char *word) { return cmdline_value(word) != NULL; }

u64 cmdline_number(const char *key, u64 fallback)
{
    const char *p = cmdline_value(key);
    u64 v = 0;
    for (; p && *p >= '0' && *p <= '9'; p++)
        v = v * 10 + (u64)(*p - '0');
    return v ? v : fallback;
}

extern char cc_outer[], cc_inner[];
__asm__(".text\n"
        "cc_inner: endbr64\n  ret\n"
        "cc_outer: endbr64\n  call *%r11\n  ret\n");

u64 call_chain_loop(u64 n)
{
    __asm__ volatile("mov %2, %%r11\n"
                     "1: call *%1\n"
                     "  dec %0\n"
                     "  jnz 1b\n"
                     : "+r"(n) : "r"(cc_outer), "r"(cc_inner) : "r11", "memory");
    return n;
}

void kernel_init(void)
{
    serial_init();
    write_cr0(read_cr0() | CR0_WP);
    paging_init();
    tss_init();
    idt_init();
    syscall_init();
    user_pages_init();
}

/* ---------------- traps ---------------- */
static struct trap_record record_trap(const struct trap_frame *f)
{
    struct trap_record r = {
        .valid = true, .vector = f->vector, .error = f->error, .rip = f->rip,
        .rsp = f->rsp, .cs = f->cs, .cr2 = read_cr2(), .ssp = 0, .rflags = f->rflags,
    };
    if ((f->cs & 3) == 3) {
        if (cet.shstk)
            r.ssp = rdmsr(MSR_PL3_SSP);     /* saved there on the switch to CPL0 */
    } else if (f->entry_ssp) {
        r.ssp = *(u64 *)f->entry_ssp;       /* the frame's previous SSP [SDM Vol. 1 ch. 18] */
        r.ss_lip = *(u64 *)(f->entry_ssp + 8);
    }
    return r;
}

static void print_trap(const char *what, const struct trap_record *r)
{
    kprintf("# %s: vector %lu error 0x%lx rip 0x%lx cs 0x%lx rsp 0x%lx ssp 0x%lx cr2 0x%lx\n",
            what, r->vector, r->error, r->rip, r->cs, r->rsp, r->ssp, r->cr2);
}

static void handle_user_syscall(struct trap_frame *f)
{
    switch (f->rax) {
    case SYS_EXIT:
        this_cpu.uresult.kind = USER_EXITED;
        this_cpu.uresult.code = f->rdi;
        user_return_to_kernel(&this_cpu.uctx, 0);
    case SYS_ADD1:
        f->rax = f->rdi + 1;
        return;
    default:
        f->rax = (u64)-1;
    }
}

void irq_register(unsigned vector, irq_handler_fn fn)
{
    if (vector < 256)
        this_cpu.irq_handlers[vector] = fn;
}

void trap(struct trap_frame *f)
{
    if (f->vector < 256 && this_cpu.irq_handlers[f->vector]) {
        this_cpu.irq_handlers[f->vector](f);
        return;
    }
    struct trap_record r = record_trap(f);
    bool from_user = (f->cs & 3) == 3;
    if (from_user && (f->vector == 256 || f->vector == VEC_SYSCALL_INT)) {
        handle_user_syscall(f);
        return;
    }
    if (from_user) {
        this_cpu.uresult.kind = USER_FAULTED;
        this_cpu.uresult.trap = r;
        user_return_to_kernel(&this_cpu.uctx, 0);
    }
    struct try_state *t = this_cpu.armed;
    if (t && f->vector != VEC_DF) {
        this_cpu.armed = NULL;
        t->trap = r;
        cet_longjmp(&t->jb, 1);
    }
    print_trap("unexpected exception", &r);
    puts_serial("Bail out! unexpected exception\n");
    exit_qemu(1);
}

void try_arm(struct try_state *t)
{
    t->trap.valid = false;
    this_cpu.armed = t;
}

void try_disarm(struct try_state *t)
{
    if (this_cpu.armed == t)
        this_cpu.armed = NULL;
}

bool run_catching(probe_fn fn, void *arg, struct trap_record *rec)
{
    struct try_state t;
    memset(rec, 0, sizeof(*rec));
    TRY(t) {
        fn(arg);
        END_TRY(t);
        rec->valid = false;
        return false;
    } CATCH {
        *rec = t.trap;
        return true;
    }
}

bool expect_fault(u64 vector, s64 error, probe_fn fn, void *arg, struct trap_record *rec)
{
    if (!run_catching(fn, arg, rec))
        return false;
    return rec->vector == vector && (error < 0 || rec->error == (u64)error);
}

struct msr_probe { u32 msr; u64 value; };

static void probe_wrmsr(void *arg)
{
    struct msr_probe *p = arg;
    wrmsr(p->msr, p->value);
}

static void probe_rdmsr(void *arg)
{
    struct msr_probe *p = arg;
    p->value = rdmsr(p->msr);
}

bool wrmsr_faults(u32 msr, u64 value, struct trap_record *rec)
{
    struct msr_probe p = {msr, value};
    return run_catching(probe_wrmsr, &p, rec);
}

bool rdmsr_faults(u32 msr, u64 *value, struct trap_record *rec)
{
    struct msr_probe p = {msr, 0};
    bool faulted = run_catching(probe_rdmsr, &p, rec);
    if (value)
        *value = p.value;
    return faulted;
}

/* ---------------- CET ---------------- */
u64 cet_s_cet_default(void)
{
    return (cet.shstk ? CET_SH_STK_EN : 0) | (cet.ibt ? CET_ENDBR_EN : 0);
}

/* Supervisor token: bits 63:3 its own address, busy bit 0 clear [SDM Vol. 1 ch. 18].  Restore token for
 * RSTORSSP at address m: (m + 8) | 1 (64-bit mode). */
static u64 supervisor_token_at(u64 addr) { return addr; }
static u64 restore_token_for(u64 addr) { return (addr + 8) | 1; }

static void shadow_stacks_init(void)
{
    u64 top = SHSTK_MAIN + PAGE_SIZE;
    u64 m_token = supervisor_token_at(top - 8);
    map_shstk_page(SHSTK_MAIN, false, &m_token, 1);
    cet.main_token = top - 8;

    top = SHSTK_USER_ENTRY + PAGE_SIZE;
    u64 k_init[2] = {supervisor_token_at(top - 8), restore_token_for(top - 16)};
    map_shstk_page(SHSTK_USER_ENTRY, false, k_init, 2);
    cet.user_entry_token = top - 8;

    for (int n = 1; n <= 3; n++) {
        top = SHSTK_IST(n) + PAGE_SIZE;
        u64 tok = supervisor_token_at(top - 8);
        map_shstk_page(SHSTK_IST(n), false, &tok, 1);
        cet.ist_token[n] = top - 8;
        this_cpu.isst[n] = top - 8;
    }
    wrmsr(MSR_ISST, (u64)this_cpu.isst);
    wrmsr(MSR_PL0_SSP, cet.main_token);
}

static void cet_kernel_trampoline(void)
{
    if (cet.shstk)
        wrmsr(MSR_PL0_SSP, cet.user_entry_token);   /* M is in use; K takes CPL3 -> CPL0 */
    this_cpu.kernel_main();
    puts_serial("# kernel main returned\n");
    exit_qemu(1);
}

NORETURN void cet_kernel_start(void (*fn)(void), u64 extra_s_cet)
{
    cet.shstk = cpu_has_shstk();
    cet.ibt = cpu_has_ibt();
    this_cpu.kernel_main = fn;
    if (!cet.shstk && !cet.ibt) {
        fn();
        puts_serial("# kernel main returned\n");
        exit_qemu(1);
    }
    if (cet.shstk)
        shadow_stacks_init();
    cet_enable_and_call(cet_s_cet_default() | extra_s_cet, cet_kernel_trampoline, cet.shstk);
    __builtin_unreachable();
}

/* ---------------- ring 3 ---------------- */
u64 user_ssp_top(void) { return USER_SHSTK + PAGE_SIZE; }

struct user_result run_user(void (*fn)(u64), u64 arg, const struct user_opts *opts)
{
    struct user_ctx *u = &this_cpu.uctx;
    memset(&this_cpu.uresult, 0, sizeof(this_cpu.uresult));
    u->rip = opts->compat ? (u64)fn : (u64)user_start;
    u->cs = opts->compat ? SEL_UCODE32 : SEL_UCODE;
    u->rflags = opts->interrupts ? 0x202 : 0x2;
    u->fn = (u64)fn;
    u->arg = arg;
    u->rsp = USER_STACK + PAGE_SIZE - 1024;
    u->k_restore = cet.user_entry_token - 8;
    u->k_token = cet.user_entry_token;
    u->kshstk = cet.shstk;
    if (cpu_has_shstk())
        wrmsr(MSR_PL3_SSP, opts->shstk ? user_ssp_top() : 0);
    if (cpu_has_shstk() || cpu_has_ibt())
        wrmsr(MSR_U_CET, opts->u_cet);
    run_user_enter(u);
    struct user_result res = this_cpu.uresult;
    if (cpu_has_shstk())
        res.pl3_ssp_after = rdmsr(MSR_PL3_SSP);
    if (cpu_has_shstk() || cpu_has_ibt())
        wrmsr(MSR_U_CET, 0);
    return res;
}
