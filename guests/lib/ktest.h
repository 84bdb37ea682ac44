/*
 * ktest.h - a tiny bare-metal x86-64 test-kernel framework for CET guests.
 *
 * Boot: multiboot v1 (32-bit entry `_start`, a.out kludge) or ELF64 entry `_start64`;
 * both reach kernel_entry64 -> kmain().  kmain() calls kernel_init() first.
 *
 * Architectural facts cite the Intel SDM (CET: vol. 1 ch. 18; XSAVE: vol. 1 ch. 13; CET MSRs:
 * vol. 4 table 2-2; events: vol. 3 ch. 6) and KVM's behaviour its vmx.c / x86.c functions.
 */
#ifndef KTEST_H
#define KTEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#define USER_CODE __attribute__((section(".utext"), noinline, used))
#define USER_DATA __attribute__((section(".udata")))
#define ALIGNED(n) __attribute__((aligned(n)))
#define NORETURN __attribute__((noreturn))
#define NOINLINE __attribute__((noinline))

/* ---- architectural numbers [SDM Vol. 1 ch. 13; SDM Vol. 1 ch. 18] ---- */
#define MSR_EFER 0xC0000080u
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_CSTAR 0xC0000083u
#define MSR_FMASK 0xC0000084u
#define MSR_U_CET 0x6A0u
#define MSR_S_CET 0x6A2u
#define MSR_PL0_SSP 0x6A4u
#define MSR_PL1_SSP 0x6A5u
#define MSR_PL2_SSP 0x6A6u
#define MSR_PL3_SSP 0x6A7u
#define MSR_ISST 0x6A8u
#define MSR_XSS 0xDA0u

#define EFER_SCE (1ul << 0)
#define EFER_NXE (1ul << 11)

#define CET_SH_STK_EN (1ul << 0)
#define CET_WR_SHSTK_EN (1ul << 1)
#define CET_ENDBR_EN (1ul << 2)
#define CET_LEG_IW_EN (1ul << 3)
#define CET_NO_TRACK_EN (1ul << 4)
#define CET_SUPPRESS (1ul << 10)
#define CET_TRACKER (1ul << 11)

#define CR0_WP (1ul << 16)
#define CR4_OSXSAVE (1ul << 18)
#define CR4_CET (1ul << 23)

#define XFEATURE_CET_U (1ul << 11)
#define XFEATURE_CET_S (1ul << 12)

#define VEC_DB 1
#define VEC_UD 6
#define VEC_DF 8
#define VEC_SS 12
#define VEC_GP 13
#define VEC_PF 14
#define VEC_MF 16
#define VEC_CP 21
#define VEC_SYSCALL_INT 0x80

#define CP_NEAR_RET 1
#define CP_FAR_RET_IRET 2
#define CP_ENDBRANCH 3
#define CP_RSTORSSP 4
#define CP_SETSSBSY 5

/* GDT layout: SYSCALL loads CS=0x08/SS=0x10; SYSRET (STAR[63:48]=0x18|3) loads SS=0x23, CS=0x2B. */
#define SEL_KCODE 0x08
#define SEL_KDATA 0x10
#define SEL_UCODE32 0x1B
#define SEL_UDATA 0x23
#define SEL_UCODE 0x2B
#define SEL_TSS 0x30

/* Page-table entry bits [SDM 4.5]. A shadow-stack leaf is R/W=0, D=1 [SDM Vol. 1 ch. 18 Paging]. */
#define PTE_P (1ul << 0)
#define PTE_RW (1ul << 1)
#define PTE_US (1ul << 2)
#define PTE_A (1ul << 5)
#define PTE_D (1ul << 6)
#define PTE_PS (1ul << 7)
#define PTE_NX (1ul << 63)
#define PAGE_SIZE 4096ul

/* The CET test region: 4 KiB pages mapped with map_page() (PML4[0], PDPT[1]). */
#define CET_REGION_BASE 0x40000000ul
#define CET_REGION_SIZE 0x00200000ul

/* ---- low-level helpers (inline asm) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u64 read_cr0(void) { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(u64 v) { __asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory"); }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void write_cr4(u64 v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static inline void invlpg(u64 va) { __asm__ volatile("invlpg (%0)" ::"r"(va) : "memory"); }
/* RDSSPQ is a NOP when shadow stacks are off: the register keeps 0 [SDM Vol. 1 ch. 18]. */
static inline u64 rdssp(void)
{
    u64 v = 0;
    __asm__ volatile("rdsspq %0" : "+r"(v));
    return v;
}

struct cpuid_regs { u32 eax, ebx, ecx, edx; };
struct cpuid_regs cpuid(u32 leaf, u32 subleaf);

/* ---- CPU features (CPUID) ---- */
bool cpu_has_shstk(void);   /* CPUID.(7,0):ECX[7] */
bool cpu_has_ibt(void);     /* CPUID.(7,0):EDX[20] */
bool cpu_has_xsave(void);   /* CPUID.1:ECX[26] */
bool cpu_has_xsaves(void);  /* CPUID.(0xD,1):EAX[3] */
u64 cpu_supported_xss(void); /* CPUID.(0xD,1):ECX|EDX<<32 */

/* ---- console, TAP and exit ---- */
void serial_init(void);
void putc_serial(char c);
void puts_serial(const char *s);
int kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
NORETURN void exit_qemu(u32 code);
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

void tap_plan(int n);
void tap_ok(bool cond, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void tap_skip(const char *name, const char *reason);
/* tap_skip for names[from..n-1], then tap_done() (a feature the rest of a kernel needs is absent). */
NORETURN void tap_skip_rest(const char *const *names, int from, int n, const char *reason);
NORETURN void tap_done(void);

/* ---- kernel init ---- */
void kernel_init(void);          /* serial, GDT/TSS, IDT, paging, EFER.NXE, CR0.WP */
/* The multiboot v1 command line (info flags bit 2, cmdline at offset 16), "" without one. */
const char *kernel_cmdline(void);
/* The command line contains `word` (e.g. "fep=1"); cmdline_value("key=") -> the text after it or NULL. */
bool cmdline_has(const char *word);
const char *cmdline_value(const char *key);
/* The decimal number after "key=" on the command line, or `fallback` when absent or 0. */
u64 cmdline_number(const char *key, u64 fallback);
/* The bench loop at the current CPL, n iterations: CALL * -> ENDBR64; CALL * -> ENDBR64; RET ->
 * RET; DEC; JNZ (8 instructions an iteration; kernel text, so CPL0 only). Returns 0. */
u64 call_chain_loop(u64 n);
void kmain(void);                 /* provided by each kernel */

/* ---- traps ---- */
struct trap_frame {               /* built by the IDT stubs in entry.S */
    u64 entry_ssp, pad;           /* SSP when the stub started (0: shadow stacks off) */
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss; /* hardware frame */
};
struct trap_record {
    bool valid;
    u64 vector, error, rip, rsp, cs, ssp, cr2;
    u64 ss_lip;                   /* LIP of the supervisor shadow-stack frame (CPL0 traps), else 0 */
    u64 rflags;                   /* the RFLAGS image in the hardware frame */
};

/* setjmp-like context that also restores SSP (see entry.S: cet_longjmp). */
struct jmp_ctx { u64 rbx, rbp, r12, r13, r14, r15, rsp, rip, ssp; };
__attribute__((returns_twice)) int cet_setjmp(struct jmp_ctx *ctx);
NORETURN void cet_longjmp(struct jmp_ctx *ctx, int value);

/*
 * Kernel-mode fault expectation.  try_arm() makes the next CPL0 exception (any vector) resume
 * after the matching cet_setjmp() with value 1 and the trap recorded in t->trap.
 * Usage:
 *     struct try_state t;
 *     TRY(t) { ...code that may fault...; END_TRY(t); } CATCH { use t.trap }
 */
struct try_state { struct jmp_ctx jb; struct trap_record trap; };
void try_arm(struct try_state *t);
void try_disarm(struct try_state *t);
#define TRY(t) if ((try_arm(&(t)), cet_setjmp(&(t).jb)) == 0)
#define END_TRY(t) try_disarm(&(t))
#define CATCH else

typedef void (*probe_fn)(void *arg);
/* Run fn(arg) at CPL0; returns true if it faulted (record in *rec), false if it returned. */
bool run_catching(probe_fn fn, void *arg, struct trap_record *rec);
/* true iff fn faulted with `vector` and (error < 0 or the error code matched). */
bool expect_fault(u64 vector, s64 error, probe_fn fn, void *arg, struct trap_record *rec);

/* Convenience probes */
bool wrmsr_faults(u32 msr, u64 value, struct trap_record *rec);
bool rdmsr_faults(u32 msr, u64 *value, struct trap_record *rec);

/* ---- external interrupts ---- */
/* An interrupt handler: called from trap() (IDT stub with ENDBR64, CALL_TRAP frame, IRETQ). */
typedef void (*irq_handler_fn)(struct trap_frame *f);
/* Route `vector` to fn (NULL: back to "unexpected exception"). */
void irq_register(unsigned vector, irq_handler_fn fn);
/* Point IDT[vector] at the default stub as a 64-bit interrupt gate with this IST index and DPL. */
void idt_set_gate(unsigned vector, unsigned ist, unsigned dpl);
/* Interrupt SSP table entry n (1..7) = ssp (IA32_INTERRUPT_SSP_TABLE_ADDR points at the table). */
void isst_set(unsigned n, u64 ssp);
/* TSS IST entry n (1..7) = rsp (the data stack a gate with IST index n switches to). */
void tss_set_ist(unsigned n, u64 rsp);
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); } /* wait, IF=0 after */
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }

/* Load the kernel's IDT on the calling CPU (application processors share it). */
void cpu_load_idt(void);

/* ---- paging ---- */
u64 alloc_page(void);                                   /* zeroed 4 KiB physical page */
void map_page(u64 va, u64 pa, u64 flags);               /* 4 KiB leaf, invlpg */
u64 *pte_lookup(u64 va);                                /* leaf PTE or NULL */
u64 map_data_page(u64 va, bool user);                   /* RW, NX; returns pa */
/* Shadow-stack page (R/W=0, D=1, NX); `init` gives 8-byte words to write at the top first
 * (init[0] at top-8, init[1] at top-16, ...), written while the page is still a data page. */
u64 map_shstk_page(u64 va, bool user, const u64 *init, int n_init);

/* ---- CET ---- */
struct cet_kernel {
    bool shstk, ibt;             /* what the kernel turned on at CPL0 */
    u64 main_token;              /* supervisor token of the main kernel shadow stack */
    u64 user_entry_token;        /* PL0_SSP while at CPL3 (stack K) */
    u64 ist_token[4];            /* ISST entries 1..3 */
};
extern struct cet_kernel cet;

/* Enable CR4.CET and S_CET (SH_STK_EN if SHSTK, ENDBR_EN if IBT, plus extra_s_cet) on a fresh
 * supervisor shadow stack (SETSSBSY), then call fn(); never returns (fn is expected to exit). */
NORETURN void cet_kernel_start(void (*fn)(void), u64 extra_s_cet);
u64 cet_s_cet_default(void);

/* ---- ring 3 ---- */
enum user_exit_kind { USER_EXITED = 1, USER_FAULTED = 2 };
struct user_result {
    enum user_exit_kind kind;
    u64 code;                    /* syscall exit code */
    struct trap_record trap;     /* when faulted */
    u64 pl3_ssp_after;           /* IA32_PL3_SSP after returning to ring 0 */
};
struct user_opts {
    u64 u_cet;                   /* written to IA32_U_CET before entry */
    bool shstk;                  /* give the user a shadow stack (PL3_SSP) */
    bool via_sysret;             /* unused: entry is always IRETQ */
    bool compat;                 /* enter fn itself as 32-bit code (CS = SEL_UCODE32); arg in RSI */
    bool interrupts;             /* enter with RFLAGS.IF = 1 (external interrupts reach CPL3) */
};
/* Run fn(arg) at CPL3 (IRETQ) with a fresh user stack; returns when it calls sys_exit (SYSCALL
 * or INT 0x80) or takes an exception.  fn must live in .utext.  With opts->compat, fn is 32-bit
 * code entered directly in compatibility mode (it must exit by INT 0x80 or fault). */
struct user_result run_user(void (*fn)(u64), u64 arg, const struct user_opts *opts);
u64 user_ssp_top(void);

#define SYS_EXIT 60
#define SYS_ADD1 1     /* returns arg+1 (tests the return-to-user paths) */

/* user-side syscall helpers (inline, usable from .utext) */
static inline __attribute__((always_inline)) u64 user_syscall(u64 nr, u64 arg)
{
    u64 ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(arg) : "rcx", "r11", "memory");
    return ret;
}
static inline __attribute__((always_inline)) u64 user_int80(u64 nr, u64 arg)
{
    u64 ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "D"(arg) : "memory");
    return ret;
}

/* indirect-branch helpers (entry.S): CALL *fn / NOTRACK CALL *fn; user_call_indirect is in .utext */
void call_indirect(void (*fn)(void));
void call_notrack(void (*fn)(void));
void user_call_indirect(void (*fn)(void));

/* symbols from the linker script */
extern char __utext_start[], __utext_end[], __udata_start[], __udata_end[];
extern char __kernel_start[], __kernel_end[];

#endif
