/* nested_cet: an L1 hypervisor running an L2 guest with CET (nested VMX) [SDM Vol. 3 ch. 24-31;
 * KVM nested.c with "KVM:nVMX: Enable CET support for nested VM" and "Refine error code
 * injection to nested VM"].
 *
 * L1 (this kernel, CPL0 with S_CET SH_STK_EN|ENDBR_EN) checks the VMX capabilities KVM reports
 * (CPUID VMX, IA32_VMX_BASIC revision and bit 56, the load-CET-state controls), the VMX
 * instructions' VMfail codes, then runs L2 in the same address space (no EPT) four ways for each
 * of the cover letter's tests:
 *   - the user SHSTK test: L2 runs ring 3 code whose RET finds a forged return address -> #CP(1)
 *     at the RET;
 *   - the kernel IBT test: L2 at CPL0 jumps (JMP *) to a target without ENDBR64 -> #CP(3) at the
 *     target;
 * with L1 intercepting #CP (EXCEPTION_BITMAP[21]: a VM exit with reason 0, VM_EXIT_INTR_INFO
 * 0x80000b15 and the error code; L1 then re-injects it with VM_ENTRY_INTR_INFO) or not (L2's
 * own IDT handler sees the #CP directly), and with or
 * without the load-CET-state VM-entry/exit controls (L2 on its own shadow stack, L1's CET state
 * reloaded from HOST_* at the exit; or L2 carrying L1's S_CET/SSP — then with the supervisor
 * shadow stack off, see body()).  Then VM-entry checks of
 * the CET state (VMfailValid 8 for a bad HOST_S_CET, a failed entry 0x80000021 for a bad
 * GUEST_S_CET) and event injection of #CP with and without an error code (IA32_VMX_BASIC[56]).
 * Then nested VMX without CET (nested_vmx_tests): the HLT activity state (IA32_VMX_MISC[6]; an
 * injected event wakes L2; an L2 HLT L1 does not intercept halts the vCPU until the LAPIC timer's
 * interrupt exits to L1), acknowledge-interrupt-on-exit with a self-IPI, the debug controls and
 * IA32_DEBUGCTL, the MSR-load/store lists, and the guest segment-register checks.
 * SKIP when the CPU shows no VMX (cetvm boot --cpu ...,-vmx or kvm_intel nested=0). */
#include "ktest.h"
#include "platform.h"

#define MSR_FEATURE_CONTROL 0x3Au
#define MSR_FS_BASE 0xC0000100u
#define MSR_GS_BASE 0xC0000101u
#define MSR_VMX_BASIC 0x480u
#define MSR_VMX_TRUE_PIN 0x48Du
#define MSR_VMX_TRUE_PROC 0x48Eu
#define MSR_VMX_TRUE_EXIT 0x48Fu
#define MSR_VMX_TRUE_ENTRY 0x490u
#define MSR_VMX_MISC 0x485u
#define MSR_DEBUGCTL 0x1D9u
#define MSR_KERNEL_GS_BASE 0xC0000102u
#define FC_LOCKED 1ul
#define FC_VMXON_OUTSIDE_SMX 4ul
#define CR4_VMXE (1ul << 13)
#define CR0_NE (1ul << 5)
#define CR0_TS (1ul << 3)
#define CR4_TSD (1ul << 2)
#define RFLAGS_CF 1ul
#define RFLAGS_ZF (1ul << 6)

/* VMCS field encodings [SDM Vol. 3 App. B] */
enum {
    GUEST_ES_SEL = 0x800, GUEST_CS_SEL = 0x802, GUEST_SS_SEL = 0x804, GUEST_DS_SEL = 0x806,
    GUEST_FS_SEL = 0x808, GUEST_GS_SEL = 0x80A, GUEST_LDTR_SEL = 0x80C, GUEST_TR_SEL = 0x80E,
    HOST_ES_SEL = 0xC00, HOST_CS_SEL = 0xC02, HOST_SS_SEL = 0xC04, HOST_DS_SEL = 0xC06,
    HOST_FS_SEL = 0xC08, HOST_GS_SEL = 0xC0A, HOST_TR_SEL = 0xC0C,
    MSR_BITMAP = 0x2004, EXIT_MSR_STORE_ADDR = 0x2006, EXIT_MSR_LOAD_ADDR = 0x2008, ENTRY_MSR_LOAD_ADDR = 0x200A,
    EXIT_MSR_STORE_CNT = 0x400E, EXIT_MSR_LOAD_CNT = 0x4010, ENTRY_MSR_LOAD_CNT = 0x4014,
    GUEST_DEBUGCTL = 0x2802, GUEST_DR7 = 0x681A, GUEST_SYSENTER_ESP = 0x6824, CR4_MASK = 0x6002, CR4_SHADOW = 0x6006, CR0_MASK = 0x6000, CR0_SHADOW = 0x6004, VMCS_LINK_PTR = 0x2800, GUEST_EFER = 0x2806, HOST_EFER = 0x2C02,
    PIN_CTLS = 0x4000, PROC_CTLS = 0x4002, EXC_BITMAP = 0x4004, EXIT_CTLS = 0x400C, ENTRY_CTLS = 0x4012,
    ENTRY_INTR_INFO = 0x4016, ENTRY_ERROR_CODE = 0x4018,
    VM_INSN_ERROR = 0x4400, EXIT_INSN_LEN = 0x440C, EXIT_REASON = 0x4402, EXIT_INTR_INFO = 0x4404, EXIT_INTR_ERROR = 0x4406,
    GUEST_ES_LIMIT = 0x4800, GUEST_GDTR_LIMIT = 0x4810, GUEST_IDTR_LIMIT = 0x4812, GUEST_ES_AR = 0x4814,
    GUEST_INTR_STATE = 0x4824, GUEST_ACTIVITY = 0x4826,
    EXIT_QUAL = 0x6400,
    GUEST_CR0 = 0x6800, GUEST_CR3 = 0x6802, GUEST_CR4 = 0x6804, GUEST_ES_BASE = 0x6806,
    GUEST_GDTR_BASE = 0x6816, GUEST_IDTR_BASE = 0x6818, GUEST_RSP = 0x681C, GUEST_RIP = 0x681E,
    GUEST_RFLAGS = 0x6820, GUEST_S_CET = 0x6828, GUEST_SSP = 0x682A, GUEST_ISST = 0x682C,
    HOST_CR0 = 0x6C00, HOST_CR3 = 0x6C02, HOST_CR4 = 0x6C04, HOST_FS_BASE = 0x6C06, HOST_GS_BASE = 0x6C08,
    HOST_TR_BASE = 0x6C0A, HOST_GDTR_BASE = 0x6C0C, HOST_IDTR_BASE = 0x6C0E, HOST_RSP = 0x6C14,
    HOST_RIP = 0x6C16, HOST_S_CET = 0x6C18, HOST_SSP = 0x6C1A, HOST_ISST = 0x6C1C,
};
#define PROC_USE_MSR_BITMAPS (1u << 28)
#define EXIT_HOST_ADDR_SPACE (1u << 9)
#define EXIT_SAVE_EFER (1u << 20)
#define EXIT_LOAD_EFER (1u << 21)
#define EXIT_LOAD_CET (1u << 28)
#define ENTRY_IA32E (1u << 9)
#define ENTRY_LOAD_EFER (1u << 15)
#define ENTRY_LOAD_CET (1u << 20)
#define EXIT_REASON_EXCEPTION 0
#define EXIT_REASON_VMCALL 18
#define EXIT_REASON_CPUID 10
#define EXIT_REASON_INVD 13
#define EXIT_REASON_FAILED_GUEST_STATE 0x80000021u
#define EXIT_REASON_FAILED_MSR_LOAD 0x80000022u
#define EXIT_REASON_EXT_INTR 1
#define PIN_EXT_INTR_EXITING 1u
#define EXIT_SAVE_DEBUG (1u << 2)
#define EXIT_ACK_INTR (1u << 15)
#define ENTRY_LOAD_DEBUG (1u << 2)
#define ACTIVITY_HLT 1
#define ACTIVITY_WAIT_SIPI 3
#define LAPIC_ICR_LO 0x300u
#define LAPIC_ICR_HI 0x310u
#define LAPIC_LVT_TIMER 0x320u
#define LAPIC_TIMER_ICR 0x380u
#define LAPIC_TIMER_DCR 0x3E0u
#define ICR_SELF (1u << 18)
#define IPI_VECTOR 0xF1u
#define TIMER_VECTOR 0xF2u
#define INTR_INFO_CP_HW_ERR 0x80000B15u /* valid | deliver error code | hardware exception | 21 */
#define INTR_INFO_CP_HW 0x80000315u

static u8 vmxon_region[4096] ALIGNED(4096);
static u8 vmcs_a[4096] ALIGNED(4096);
static u8 msr_bitmap[4096] ALIGNED(4096);
static u8 l2_stack[4 * 4096] ALIGNED(4096);
static u64 l2_idt[2 * 256] ALIGNED(16);
#define L2_SHSTK_VA (CET_REGION_BASE + 0x1F0000ul)

/* ---------------------------------------------------------------- VMX instructions */
static inline u64 flags_after(void)
{
    u64 f;
    __asm__ volatile("pushfq; popq %0" : "=r"(f));
    return f & (RFLAGS_CF | RFLAGS_ZF);
}
/* VMXON / VMCLEAR / VMPTRLD m64: the CF/ZF result (0 = VMsucceed). */
#define VMX_PTR_OP(name)                                                                          \
    static u64 name(u64 pa)                                                                       \
    {                                                                                             \
        u64 f;                                                                                    \
        __asm__ volatile(#name " %1; pushfq; popq %0" : "=r"(f) : "m"(pa) : "cc", "memory");    \
        return f & (RFLAGS_CF | RFLAGS_ZF);                                                       \
    }
VMX_PTR_OP(vmxon)
VMX_PTR_OP(vmclear)
VMX_PTR_OP(vmptrld)
static u64 vmxoff(void)
{
    u64 f;
    __asm__ volatile("vmxoff; pushfq; popq %0" : "=r"(f) : : "cc", "memory");
    return f & (RFLAGS_CF | RFLAGS_ZF);
}
static u64 vmptrst(void)
{
    u64 pa = 0;
    __asm__ volatile("vmptrst %0" : "=m"(pa) : : "cc", "memory");
    return pa;
}
/* VMWRITE with a memory source operand (exercises the memory-operand decode). */
static u64 vmwrite(u64 field, u64 value)
{
    u64 f;
    __asm__ volatile("vmwrite %2, %1; pushfq; popq %0" : "=r"(f) : "r"(field), "m"(value) : "cc", "memory");
    return f & (RFLAGS_CF | RFLAGS_ZF);
}
static u64 vmread(u64 field)
{
    u64 v = 0;
    __asm__ volatile("vmread %1, %0" : "=r"(v) : "r"(field) : "cc");
    return v;
}
static u64 vmread_flags(u64 field)
{
    u64 v = 0;
    __asm__ volatile("vmread %1, %0" : "=m"(v) : "r"(field) : "cc", "memory");
    return flags_after();
}

/* L2's general-purpose registers while L1 runs (VM exit does not switch them). */
struct l2_gprs { u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15; };
struct l2_gprs l2_regs;
u64 l2_launch;

/* vmx_enter(launch): HOST_RSP/HOST_SSP = the current stack, L2's GPRs loaded, VMLAUNCH or
 * VMRESUME. Returns 0 after a VM exit (HOST_RIP = vmx_exit_target, L2's GPRs saved), else the
 * VMfail flags (CF or ZF). */
u64 vmx_enter(u64 launch);
#define GPR_LIST(op) \
    op(rax, 0) op(rbx, 8) op(rcx, 16) op(rdx, 24) op(rsi, 32) op(rdi, 40) op(rbp, 48) op(r8, 56) \
    op(r9, 64) op(r10, 72) op(r11, 80) op(r12, 88) op(r13, 96) op(r14, 104) op(r15, 112)
#define LOAD_GPR(r, off) "  mov l2_regs+" #off "(%rip), %" #r "\n"
#define SAVE_GPR(r, off) "  mov %" #r ", l2_regs+" #off "(%rip)\n"
__asm__(".text\n"
        ".globl vmx_enter\n"
        "vmx_enter: endbr64\n"
        "  push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
        "  mov %rdi, l2_launch(%rip)\n"
        "  mov $0x6C14, %eax\n vmwrite %rsp, %rax\n"      /* HOST_RSP */
        "  xor %ecx, %ecx\n rdsspq %rcx\n"
        "  mov $0x6C1A, %eax\n vmwrite %rcx, %rax\n"      /* HOST_SSP */
        GPR_LIST(LOAD_GPR)
        "  cmpq $0, l2_launch(%rip)\n jz 1f\n vmlaunch\n jmp 2f\n1: vmresume\n"
        "2: pushfq\n pop %rax\n and $0x41, %eax\n jmp 3f\n"
        ".globl vmx_exit_target\n"
        "vmx_exit_target: endbr64\n"
        GPR_LIST(SAVE_GPR)
        "  xor %eax, %eax\n"
        "3: pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n ret\n");
extern char vmx_exit_target[];

/* ---------------------------------------------------------------- L2 */
enum l2_cmd { L2_USER_SHSTK = 1, L2_KERNEL_IBT = 2, L2_INT3 = 3, L2_NOP = 4, L2_HLT = 5, L2_CR4 = 6, L2_INVD = 7,
              L2_CR0 = 8 };
static volatile u64 l2_cmd;
static volatile struct { u64 done, faulted, vector, error, rip, cpl; } l2_out;

extern char l2_hlt[], l2_after_hlt[];
extern char l2_entry[], l2_int3[], l2_no_endbr[], l2_ibt_jmp[], user_victim[], user_victim_ret[], user_gadget[];
__asm__(".text\n"
        "l2_entry: call l2_main\n"
        "1: vmcall\n jmp 1b\n"
        "l2_ibt_jmp: endbr64\n jmp *%rdi\n"
        "l2_int3: int3\n ret\n"
        "l2_hlt: hlt\n"
        "l2_after_hlt: ret\n"
        "l2_no_endbr: nop\n ret\n"
        ".pushsection .utext, \"ax\"\n"
        "user_victim: endbr64\n"
        "  lea user_gadget(%rip), %rax\n"
        "  mov %rax, (%rsp)\n"
        "user_victim_ret: ret\n"
        "user_gadget: endbr64\n"
        "  mov $60, %eax\n mov $0x66, %edi\n syscall\n ud2\n"
        ".popsection\n");

USER_CODE static void user_rop(u64 arg)
{
    ((void (*)(void))user_victim)();
    user_syscall(SYS_EXIT, 1);
}

static void ibt_probe(void *target) { ((void (*)(void *))l2_ibt_jmp)(target); }

/* L2's C entry: the test L1 asked for, with L2's kernel catching the #CP (when L1 intercepts
 * #CP it re-injects the exception, as a hypervisor that does not consume it does). */
__attribute__((used)) void l2_main(void)
{
    struct trap_record rec = {0};
    if (l2_cmd == L2_INT3) {
        ((void (*)(void))l2_int3)();
    } else if (l2_cmd == L2_HLT) {
        ((void (*)(void))l2_hlt)();
    } else if (l2_cmd == L2_NOP) {
    } else if (l2_cmd == L2_CR0) { /* MOV from CR0 and SMSW (32-bit register) */
        l2_out.vector = read_cr0();
        u64 msw = 0;
        __asm__ volatile("smsw %k0" : "=r"(msw));
        l2_out.error = msw;
    } else if (l2_cmd == L2_INVD) {
        __asm__ volatile("invd" ::: "memory");
        l2_out.done = 1;
    } else if (l2_cmd == L2_CR4) { /* read CR4 and write back what it read */
        u64 cr4 = read_cr4();
        l2_out.vector = cr4;
        write_cr4(cr4);
    } else if (l2_cmd == L2_USER_SHSTK) {
        struct user_opts on = {.u_cet = CET_SH_STK_EN, .shstk = true};
        struct user_result r = run_user(user_rop, 0, &on);
        l2_out.faulted = r.kind == USER_FAULTED;
        l2_out.vector = r.trap.vector;
        l2_out.error = r.trap.error;
        l2_out.rip = r.trap.rip;
        l2_out.cpl = r.trap.cs & 3;
    } else {
        l2_out.faulted = run_catching(ibt_probe, l2_no_endbr, &rec);
        l2_out.vector = rec.vector;
        l2_out.error = rec.error;
        l2_out.rip = rec.rip;
        l2_out.cpl = rec.cs & 3;
    }
    l2_out.done = 1;
}

/* An IDT of L2's own for the injection tests: every vector goes to l2_event, which records the
 * stack words the delivery pushed and ends L2 with VMCALL. */
static volatile u64 l2_event_rsp, l2_event_words[3];
extern char l2_event[];
__asm__(".text\n"
        "l2_event: endbr64\n"
        "  mov %rsp, l2_event_rsp(%rip)\n"
        "  mov (%rsp), %rax\n mov %rax, l2_event_words(%rip)\n"
        "  mov 8(%rsp), %rax\n mov %rax, l2_event_words+8(%rip)\n"
        "  mov 16(%rsp), %rax\n mov %rax, l2_event_words+16(%rip)\n"
        "1: vmcall\n jmp 1b\n");

static void build_l2_idt(void)
{
    u64 h = (u64)l2_event;
    for (int v = 0; v < 256; v++) {
        l2_idt[2 * v] = (h & 0xFFFF) | ((u64)SEL_KCODE << 16) | (0x8Eul << 40) | ((h >> 16) & 0xFFFF) << 48;
        l2_idt[2 * v + 1] = h >> 32;
    }
}

/* ---------------------------------------------------------------- VMCS set-up */
struct dtr { u16 limit; u64 base; } __attribute__((packed));
static u64 ctl(u32 msr, u64 want)
{
    u64 caps = rdmsr(msr);
    return (want | (u32)caps) & (caps >> 32);
}

static u64 tss_base(struct dtr *gdt)
{
    u64 *g = (u64 *)gdt->base, lo = g[SEL_TSS / 8], hi = g[SEL_TSS / 8 + 1];
    return ((lo >> 16) & 0xFFFFFF) | ((lo >> 56) << 24) | (hi << 32);
}

static bool have_cet_controls;

/* A fresh VMCS for L2: KVM-unit-tests-style copy of L1's state (same GDT, IDT, CR3). */
static void setup_vmcs(bool load_cet, bool intercept_cp)
{
    struct dtr gdt, idt;
    __asm__ volatile("sgdt %0; sidt %1" : "=m"(gdt), "=m"(idt));
    u64 tr = tss_base(&gdt), efer = rdmsr(MSR_EFER);
    vmclear((u64)vmcs_a);
    vmptrld((u64)vmcs_a);
    u64 cet_ctls_exit = load_cet ? EXIT_LOAD_CET : 0, cet_ctls_entry = load_cet ? ENTRY_LOAD_CET : 0;
    vmwrite(PIN_CTLS, ctl(MSR_VMX_TRUE_PIN, 0));
    vmwrite(PROC_CTLS, ctl(MSR_VMX_TRUE_PROC, PROC_USE_MSR_BITMAPS));
    vmwrite(MSR_BITMAP, (u64)msr_bitmap);
    vmwrite(EXC_BITMAP, intercept_cp ? 1ul << VEC_CP : 0);
    vmwrite(ENTRY_INTR_INFO, 0); /* VMCLEAR keeps the fields: no event left from an earlier test */
    vmwrite(ENTRY_MSR_LOAD_CNT, 0);
    vmwrite(EXIT_MSR_STORE_CNT, 0);
    vmwrite(EXIT_MSR_LOAD_CNT, 0);
    vmwrite(GUEST_SYSENTER_ESP, 0);
    vmwrite(CR4_MASK, 0);
    vmwrite(CR4_SHADOW, 0);
    vmwrite(EXIT_CTLS, ctl(MSR_VMX_TRUE_EXIT, EXIT_HOST_ADDR_SPACE | EXIT_SAVE_EFER | EXIT_LOAD_EFER | cet_ctls_exit));
    vmwrite(ENTRY_CTLS, ctl(MSR_VMX_TRUE_ENTRY, ENTRY_IA32E | ENTRY_LOAD_EFER | cet_ctls_entry));
    vmwrite(VMCS_LINK_PTR, ~0ul);
    /* host state */
    vmwrite(HOST_CR0, read_cr0());
    vmwrite(HOST_CR3, read_cr3());
    vmwrite(HOST_CR4, read_cr4());
    vmwrite(HOST_EFER, efer);
    vmwrite(HOST_CS_SEL, SEL_KCODE);
    vmwrite(HOST_SS_SEL, SEL_KDATA);
    vmwrite(HOST_DS_SEL, SEL_KDATA);
    vmwrite(HOST_ES_SEL, SEL_KDATA);
    vmwrite(HOST_FS_SEL, 0);
    vmwrite(HOST_GS_SEL, 0);
    vmwrite(HOST_TR_SEL, SEL_TSS);
    vmwrite(HOST_FS_BASE, rdmsr(MSR_FS_BASE));
    vmwrite(HOST_GS_BASE, rdmsr(MSR_GS_BASE));
    vmwrite(HOST_TR_BASE, tr);
    vmwrite(HOST_GDTR_BASE, gdt.base);
    vmwrite(HOST_IDTR_BASE, idt.base);
    vmwrite(HOST_RIP, (u64)vmx_exit_target);
    if (have_cet_controls) {
        vmwrite(HOST_S_CET, rdmsr(MSR_S_CET));
        vmwrite(HOST_ISST, rdmsr(MSR_ISST));
    }
    /* guest state */
    vmwrite(GUEST_CR0, read_cr0());
    vmwrite(GUEST_CR3, read_cr3());
    vmwrite(GUEST_CR4, read_cr4());
    vmwrite(GUEST_EFER, efer);
    static const u16 sels[8] = {SEL_KDATA, SEL_KCODE, SEL_KDATA, SEL_KDATA, SEL_KDATA, SEL_KDATA, 0, SEL_TSS};
    static const u32 ars[8] = {0xC093, 0xA09B, 0xC093, 0xC093, 0xC093, 0xC093, 0x10000, 0x8B};
    for (int i = 0; i < 8; i++) {
        vmwrite(GUEST_ES_SEL + 2 * i, sels[i]);
        vmwrite(GUEST_ES_LIMIT + 2 * i, i == 7 ? 0x67 : 0xFFFFFFFF);
        vmwrite(GUEST_ES_AR + 2 * i, ars[i]);
        vmwrite(GUEST_ES_BASE + 2 * i, i == 7 ? tr : 0);
    }
    vmwrite(GUEST_GDTR_BASE, gdt.base);
    vmwrite(GUEST_GDTR_LIMIT, gdt.limit);
    vmwrite(GUEST_IDTR_BASE, idt.base);
    vmwrite(GUEST_IDTR_LIMIT, idt.limit);
    vmwrite(GUEST_RSP, (u64)l2_stack + sizeof(l2_stack) - 8);
    vmwrite(GUEST_RIP, (u64)l2_entry);
    vmwrite(GUEST_RFLAGS, 2);
    vmwrite(GUEST_ACTIVITY, 0);
    vmwrite(GUEST_INTR_STATE, 0);
    if (load_cet) {
        vmwrite(GUEST_S_CET, rdmsr(MSR_S_CET));
        vmwrite(GUEST_SSP, L2_SHSTK_VA + PAGE_SIZE);
        vmwrite(GUEST_ISST, rdmsr(MSR_ISST));
    }
}

/* ---------------------------------------------------------------- the L2 CET tests */
/* One L2 run: how it ended (enter: VMfail flags; final_reason) and the #CP exit L1 intercepted. */
struct l2_run { u64 enter, final_reason, reason, intr_info, error, guest_rip, guest_cs, guest_ssp, guest_s_cet, host_ssp; };

static struct l2_run run_l2(u64 cmd, bool load_cet, bool intercept_cp)
{
    struct l2_run r;
    memset((void *)&l2_out, 0, sizeof(l2_out));
    memset(&r, 0, sizeof(r));
    l2_cmd = cmd;
    setup_vmcs(load_cet, intercept_cp);
    memset(&l2_regs, 0, sizeof(l2_regs));
    u64 enter = vmx_enter(1);
    for (;;) {
        u64 reason = vmread(EXIT_REASON);
        if (enter != 0 || (reason != EXIT_REASON_CPUID && reason != EXIT_REASON_EXCEPTION))
            break;
        if (reason == EXIT_REASON_CPUID) { /* CPUID always exits to L1: emulate it */
            struct cpuid_regs c = cpuid((u32)l2_regs.rax, (u32)l2_regs.rcx);
            l2_regs.rax = c.eax, l2_regs.rbx = c.ebx, l2_regs.rcx = c.ecx, l2_regs.rdx = c.edx;
            vmwrite(GUEST_RIP, vmread(GUEST_RIP) + vmread(EXIT_INSN_LEN));
        } else { /* the intercepted exception: record it, re-inject it into L2 */
            r.reason = reason;
            r.intr_info = vmread(EXIT_INTR_INFO);
            r.error = vmread(EXIT_INTR_ERROR);
            r.guest_rip = vmread(GUEST_RIP);
            r.guest_cs = vmread(GUEST_CS_SEL);
            r.guest_ssp = vmread(GUEST_SSP);
            r.guest_s_cet = vmread(GUEST_S_CET);
            r.host_ssp = vmread(HOST_SSP);
            vmwrite(ENTRY_INTR_INFO, r.intr_info);
            vmwrite(ENTRY_ERROR_CODE, r.error);
        }
        enter = vmx_enter(0);
    }
    r.enter = enter;
    r.final_reason = vmread(EXIT_REASON);
    return r;
}

static void l2_cet_tests(bool load_cet)
{
    const char *how = load_cet ? "load-CET controls" : "no load-CET controls";
    u64 l1_ssp = rdssp(), l1_s_cet = rdmsr(MSR_S_CET);
    struct l2_run r;

    /* user SHSTK, L1 intercepts #CP */
    r = run_l2(L2_USER_SHSTK, load_cet, true);
    tap_ok(r.enter == 0 && r.reason == EXIT_REASON_EXCEPTION && r.intr_info == INTR_INFO_CP_HW_ERR &&
               r.error == CP_NEAR_RET && r.guest_rip == (u64)user_victim_ret && (r.guest_cs & 3) == 3 &&
               r.final_reason == EXIT_REASON_VMCALL && l2_out.faulted && l2_out.error == CP_NEAR_RET,
           load_cet ? "L2 user RET to a forged address -> #CP(1) exit to L1 (load-CET controls)"
                    : "L2 user RET to a forged address -> #CP(1) exit to L1 (no load-CET controls)",
           "%s: enter %lu reason 0x%lx info 0x%lx error %lu rip 0x%lx (RET %p) cs 0x%lx final 0x%lx", how, r.enter,
           r.reason, r.intr_info, r.error, r.guest_rip, user_victim_ret, r.guest_cs, r.final_reason);
    tap_ok(rdssp() == l1_ssp && rdmsr(MSR_S_CET) == l1_s_cet,
           load_cet ? "L1 resumes with its own SSP and S_CET (load-CET controls)"
                    : "L1 resumes with its own SSP and S_CET (no load-CET controls)",
           "ssp 0x%lx (was 0x%lx) s_cet 0x%lx (was 0x%lx)", rdssp(), l1_ssp, rdmsr(MSR_S_CET), l1_s_cet);

    /* user SHSTK, #CP not intercepted: L2's kernel sees it */
    r = run_l2(L2_USER_SHSTK, load_cet, false);
    tap_ok(r.enter == 0 && r.reason == 0 && r.final_reason == EXIT_REASON_VMCALL && l2_out.done && l2_out.faulted &&
               l2_out.vector == VEC_CP && l2_out.error == CP_NEAR_RET && l2_out.rip == (u64)user_victim_ret &&
               l2_out.cpl == 3,
           load_cet ? "L2 user #CP(1) not intercepted: L2's kernel handles it (load-CET controls)"
                    : "L2 user #CP(1) not intercepted: L2's kernel handles it (no load-CET controls)",
           "%s: final reason 0x%lx done %lu faulted %lu vector %lu error %lu rip 0x%lx cpl %lu", how, r.final_reason,
           l2_out.done, l2_out.faulted, l2_out.vector, l2_out.error, l2_out.rip, l2_out.cpl);

    /* kernel IBT, L1 intercepts #CP */
    r = run_l2(L2_KERNEL_IBT, load_cet, true);
    tap_ok(r.enter == 0 && r.reason == EXIT_REASON_EXCEPTION && r.intr_info == INTR_INFO_CP_HW_ERR &&
               r.error == CP_ENDBRANCH && r.guest_rip == (u64)l2_no_endbr && (r.guest_cs & 3) == 0 &&
               r.final_reason == EXIT_REASON_VMCALL && l2_out.faulted && l2_out.error == CP_ENDBRANCH,
           load_cet ? "L2 kernel JMP* without ENDBR64 -> #CP(3) exit to L1 (load-CET controls)"
                    : "L2 kernel JMP* without ENDBR64 -> #CP(3) exit to L1 (no load-CET controls)",
           "%s: reason 0x%lx info 0x%lx error %lu rip 0x%lx (target %p)", how, r.reason, r.intr_info,
           r.error, r.guest_rip, l2_no_endbr);
    bool ssp_ok = load_cet ? (r.guest_ssp > L2_SHSTK_VA && r.guest_ssp < L2_SHSTK_VA + PAGE_SIZE)
                           : (r.guest_s_cet & ~CET_TRACKER) == l1_s_cet; /* TRACKER: WAIT_ENDBR at the #CP(3) */
    tap_ok(ssp_ok, load_cet ? "L2 ran on the shadow stack GUEST_SSP gave it (saved back into vmcs12)"
                            : "L2 ran with L1's S_CET (carried from L1, saved into vmcs12)",
           "GUEST_SSP 0x%lx HOST_SSP 0x%lx GUEST_S_CET 0x%lx L1 S_CET 0x%lx L2 stack 0x%lx", r.guest_ssp,
           r.host_ssp, r.guest_s_cet, l1_s_cet, L2_SHSTK_VA);

    /* kernel IBT, not intercepted */
    r = run_l2(L2_KERNEL_IBT, load_cet, false);
    tap_ok(r.enter == 0 && r.intr_info == 0 && r.final_reason == EXIT_REASON_VMCALL && l2_out.done && l2_out.faulted &&
               l2_out.vector == VEC_CP && l2_out.error == CP_ENDBRANCH && l2_out.rip == (u64)l2_no_endbr,
           load_cet ? "L2 kernel #CP(3) not intercepted: L2's handler sees it (load-CET controls)"
                    : "L2 kernel #CP(3) not intercepted: L2's handler sees it (no load-CET controls)",
           "%s: final reason 0x%lx done %lu faulted %lu vector %lu error %lu rip 0x%lx", how, r.final_reason, l2_out.done,
           l2_out.faulted, l2_out.vector, l2_out.error, l2_out.rip);
}

/* ---------------------------------------------------------------- checks without L2 CET */
static void entry_check_tests(void)
{
    /* HOST_S_CET with SUPPRESS and TRACKER: VMfailValid(8) */
    setup_vmcs(true, false);
    vmwrite(HOST_S_CET, CET_SUPPRESS | CET_TRACKER);
    u64 f = vmx_enter(1);
    tap_ok(f == RFLAGS_ZF && vmread(VM_INSN_ERROR) == 8, "bad HOST_S_CET -> VMfailValid(8)",
           "flags 0x%lx error %lu", f, vmread(VM_INSN_ERROR));
    /* GUEST_S_CET with SUPPRESS and TRACKER: failed VM entry, reason 0x80000021, L1 at HOST_RIP */
    setup_vmcs(true, false);
    vmwrite(GUEST_S_CET, CET_SUPPRESS | CET_TRACKER);
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_GUEST_STATE && vmread(EXIT_QUAL) == 0,
           "bad GUEST_S_CET -> VM-entry failure 0x80000021", "enter %lu reason 0x%lx", f, vmread(EXIT_REASON));
    /* misaligned GUEST_SSP */
    setup_vmcs(true, false);
    vmwrite(GUEST_SSP, L2_SHSTK_VA + PAGE_SIZE - 2);
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_GUEST_STATE, "GUEST_SSP not 4-aligned -> VM-entry failure",
           "enter %lu reason 0x%lx", f, vmread(EXIT_REASON));
}

/* Inject an event at VM entry into L2 (its own IDT); returns the exit reason. */
static u64 inject(u64 info, u64 error)
{
    build_l2_idt();
    setup_vmcs(false, false);
    vmwrite(GUEST_IDTR_BASE, (u64)l2_idt);
    vmwrite(GUEST_IDTR_LIMIT, sizeof(l2_idt) - 1);
    vmwrite(ENTRY_INTR_INFO, info);
    vmwrite(ENTRY_ERROR_CODE, error);
    l2_event_rsp = 0;
    u64 f = vmx_enter(1);
    return f ? 0xFFFF0000ul | f : vmread(EXIT_REASON);
}

static void injection_tests(bool basic56)
{
    u64 reason = inject(INTR_INFO_CP_HW_ERR, 0x5);
    tap_ok(reason == EXIT_REASON_VMCALL && l2_event_words[0] == 0x5 && l2_event_words[1] == (u64)l2_entry,
           "#CP(5) injected at VM entry reaches L2's IDT with its error code",
           "reason 0x%lx rsp 0x%lx words 0x%lx 0x%lx", reason, l2_event_rsp, l2_event_words[0], l2_event_words[1]);
    reason = inject(INTR_INFO_CP_HW, 0);
    if (basic56)
        tap_ok(reason == EXIT_REASON_VMCALL && l2_event_words[0] == (u64)l2_entry &&
                   l2_event_words[1] == SEL_KCODE,
               "IA32_VMX_BASIC[56]: #CP injected without an error code is delivered without one",
               "reason 0x%lx rsp 0x%lx words 0x%lx", reason, l2_event_rsp, l2_event_words[0]);
    else
        tap_ok(reason == (0xFFFF0000ul | RFLAGS_ZF) && vmread(VM_INSN_ERROR) == 7,
               "IA32_VMX_BASIC[56] clear: #CP without an error code -> VMfailValid(7)",
               "reason 0x%lx error %lu", reason, vmread(VM_INSN_ERROR));
}

/* ---------------------------------------------------------------- nested VMX without CET */
struct msr_entry { u32 index, reserved; u64 value; };
static struct msr_entry entry_load[1] ALIGNED(16), exit_store[1] ALIGNED(16), exit_load[1] ALIGNED(16);
static volatile u64 irqs_taken;
static void count_irq(struct trap_frame *f)
{
    (void)f;
    irqs_taken++;
    lapic_eoi();
}

/* L2 (setup_vmcs) running command `cmd`, with `pin` extra pin-based and `exit_extra` extra exit controls. */
static u64 launch(u64 cmd, u32 pin, u32 exit_extra)
{
    setup_vmcs(false, false);
    l2_cmd = cmd;
    vmwrite(PIN_CTLS, ctl(MSR_VMX_TRUE_PIN, pin));
    vmwrite(EXIT_CTLS, vmread(EXIT_CTLS) | exit_extra);
    u64 f = vmx_enter(1);
    return f ? 0xFFFF0000ul | f : vmread(EXIT_REASON);
}

static void activity_state_tests(void)
{
    u64 misc = rdmsr(MSR_VMX_MISC);
    tap_ok((misc >> 6 & 1) && !(misc >> 8 & 1), "IA32_VMX_MISC: HLT activity state offered, wait-for-SIPI not",
           "IA32_VMX_MISC 0x%lx", misc);
    /* an entry into the HLT activity state with an external interrupt injected: it wakes L2 */
    build_l2_idt();
    setup_vmcs(false, false);
    l2_cmd = L2_NOP;
    vmwrite(GUEST_IDTR_BASE, (u64)l2_idt);
    vmwrite(GUEST_IDTR_LIMIT, sizeof(l2_idt) - 1);
    vmwrite(GUEST_ACTIVITY, ACTIVITY_HLT);
    vmwrite(ENTRY_INTR_INFO, 0x80000000u | 0x40); /* delivered although L2 has RFLAGS.IF = 0 */
    l2_event_words[0] = l2_event_words[1] = 0;
    u64 f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_VMCALL && l2_event_words[0] == (u64)l2_entry &&
               l2_event_words[1] == SEL_KCODE,
           "entry in the HLT activity state with an injected interrupt: L2 wakes into its handler",
           "flags 0x%lx reason 0x%lx words 0x%lx 0x%lx", f, vmread(EXIT_REASON), l2_event_words[0], l2_event_words[1]);
    setup_vmcs(false, false);
    vmwrite(GUEST_ACTIVITY, ACTIVITY_WAIT_SIPI);
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_GUEST_STATE,
           "wait-for-SIPI activity state (not offered) -> VM-entry failure 0x80000021", "flags 0x%lx reason 0x%lx", f,
           vmread(EXIT_REASON));
    /* an entry into the HLT activity state without an event: the vCPU halts until the timer's
     * interrupt, an external-interrupt exit to L1 (acknowledged: its vector in the exit info) */
    cli();
    lapic_write(LAPIC_TIMER_DCR, 0xB);
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_ICR, 1000000);  /* 1 ms: L1's VMREADs/VMWRITEs exit, 1 us of guest time each */
    setup_vmcs(false, false);
    l2_cmd = L2_NOP;
    vmwrite(PIN_CTLS, ctl(MSR_VMX_TRUE_PIN, PIN_EXT_INTR_EXITING));
    vmwrite(EXIT_CTLS, vmread(EXIT_CTLS) | EXIT_ACK_INTR);
    vmwrite(GUEST_ACTIVITY, ACTIVITY_HLT);
    f = vmx_enter(1);
    u64 reason = f ? 0xFFFF0000ul | f : vmread(EXIT_REASON), info = vmread(EXIT_INTR_INFO);
    lapic_eoi();
    tap_ok(reason == EXIT_REASON_EXT_INTR && info == (0x80000000u | TIMER_VECTOR) && vmread(GUEST_RIP) == (u64)l2_entry,
           "entry in the HLT activity state: L2 halts until the timer interrupt exits to L1",
           "reason 0x%lx info 0x%lx rip 0x%lx", reason, info, vmread(GUEST_RIP));
    /* an L2 HLT that L1 does not intercept halts the vCPU (KVM_EXIT_HLT for the VMM) until then */
    lapic_write(LAPIC_TIMER_ICR, 1000000);
    reason = launch(L2_HLT, PIN_EXT_INTR_EXITING, EXIT_ACK_INTR);
    info = vmread(EXIT_INTR_INFO);
    lapic_eoi();
    tap_ok(reason == EXIT_REASON_EXT_INTR && info == (0x80000000u | TIMER_VECTOR) &&
               vmread(GUEST_RIP) == (u64)l2_after_hlt,
           "L2 HLT without HLT exiting halts until the timer interrupt exits to L1 (RIP after the HLT)",
           "reason 0x%lx info 0x%lx rip 0x%lx (after HLT %p)", reason, info, vmread(GUEST_RIP), l2_after_hlt);
}

static void sti_nop_cli(void) { __asm__ volatile("sti; nop; cli" ::: "memory"); }

static void self_ipi(void)
{
    lapic_write(LAPIC_ICR_HI, 0);
    lapic_write(LAPIC_ICR_LO, ICR_SELF | IPI_VECTOR);
}

static void interrupt_exit_tests(void)
{
    irq_register(IPI_VECTOR, count_irq);
    irqs_taken = 0;
    cli();
    self_ipi(); /* pending while L1 has IF = 0: the entry into L2 exits at once */
    u64 reason = launch(L2_NOP, PIN_EXT_INTR_EXITING, EXIT_ACK_INTR);
    u64 info = vmread(EXIT_INTR_INFO);
    lapic_eoi();
    sti_nop_cli();
    tap_ok(reason == EXIT_REASON_EXT_INTR && info == (0x80000000u | IPI_VECTOR) && irqs_taken == 0,
           "acknowledge interrupt on exit: the vector in VM_EXIT_INTR_INFO, nothing left for L1",
           "reason 0x%lx info 0x%lx irqs %lu", reason, info, irqs_taken);
    self_ipi();
    reason = launch(L2_NOP, PIN_EXT_INTR_EXITING, 0);
    info = vmread(EXIT_INTR_INFO);
    sti_nop_cli(); /* the interrupt window opens after STI's shadow */
    tap_ok(reason == EXIT_REASON_EXT_INTR && !(info & 0x80000000u) && irqs_taken == 1,
           "external-interrupt exit without acknowledge: the interrupt stays pending for L1",
           "reason 0x%lx info 0x%lx irqs %lu", reason, info, irqs_taken);
    irq_register(IPI_VECTOR, NULL);
}

static void debug_control_tests(void)
{
    struct trap_record rec = {0};
    bool lbr_faults = wrmsr_faults(MSR_DEBUGCTL, 1, &rec);
    bool tr_faults = wrmsr_faults(MSR_DEBUGCTL, 1ul << 6, &rec);
    tap_ok(!lbr_faults && rdmsr(MSR_DEBUGCTL) == 0 && tr_faults,
           "IA32_DEBUGCTL: LBR dropped (no LBR virtualization), an unsupported bit #GP",
           "LBR write faults %d, reads 0x%lx, TR write faults %d", lbr_faults, rdmsr(MSR_DEBUGCTL), tr_faults);
    __asm__ volatile("mov %0, %%dr7" ::"r"(0x402ul));
    setup_vmcs(false, false);
    l2_cmd = L2_NOP;
    vmwrite(ENTRY_CTLS, vmread(ENTRY_CTLS) | ENTRY_LOAD_DEBUG);
    vmwrite(EXIT_CTLS, vmread(EXIT_CTLS) | EXIT_SAVE_DEBUG);
    vmwrite(GUEST_DR7, 0x500);
    u64 f = vmx_enter(1), dr7;
    __asm__ volatile("mov %%dr7, %0" : "=r"(dr7));
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_VMCALL && vmread(GUEST_DR7) == 0x500 && dr7 == 0x400,
           "debug controls: GUEST_DR7 loaded and saved back, L1's DR7 is 0x400 after the exit",
           "flags 0x%lx reason 0x%lx GUEST_DR7 0x%lx L1 DR7 0x%lx", f, vmread(EXIT_REASON), vmread(GUEST_DR7), dr7);
}

/* A fresh L2 with one-entry MSR lists (entry load, exit store, exit load). */
static void setup_msr_lists(void)
{
    setup_vmcs(false, false);
    l2_cmd = L2_NOP;
    vmwrite(ENTRY_MSR_LOAD_ADDR, (u64)entry_load);
    vmwrite(ENTRY_MSR_LOAD_CNT, 1);
    vmwrite(EXIT_MSR_STORE_ADDR, (u64)exit_store);
    vmwrite(EXIT_MSR_STORE_CNT, 1);
    vmwrite(EXIT_MSR_LOAD_ADDR, (u64)exit_load);
    vmwrite(EXIT_MSR_LOAD_CNT, 1);
}

static void msr_list_tests(void)
{
    u64 saved = rdmsr(MSR_KERNEL_GS_BASE);
    entry_load[0] = (struct msr_entry){MSR_KERNEL_GS_BASE, 0, 0x1111000ul};
    exit_store[0] = (struct msr_entry){MSR_KERNEL_GS_BASE, 0, 0};
    exit_load[0] = (struct msr_entry){MSR_KERNEL_GS_BASE, 0, 0x2222000ul};
    setup_msr_lists();
    u64 f = vmx_enter(1), after = rdmsr(MSR_KERNEL_GS_BASE);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_VMCALL && exit_store[0].value == 0x1111000ul &&
               after == 0x2222000ul,
           "MSR lists: entry load, exit store of L2's value, exit load for L1",
           "flags 0x%lx reason 0x%lx stored 0x%lx L1 KERNEL_GS_BASE 0x%lx", f, vmread(EXIT_REASON),
           exit_store[0].value, after);
    entry_load[0].index = MSR_FS_BASE; /* never in a load list */
    setup_msr_lists();
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_MSR_LOAD && vmread(EXIT_QUAL) == 1,
           "FS_BASE in the entry MSR-load list -> VM-entry failure 0x80000022, qualification 1",
           "flags 0x%lx reason 0x%lx qualification %lu", f, vmread(EXIT_REASON), vmread(EXIT_QUAL));
    setup_msr_lists();
    vmwrite(ENTRY_MSR_LOAD_ADDR, (u64)entry_load + 8);
    f = vmx_enter(1);
    tap_ok(f == RFLAGS_ZF && vmread(VM_INSN_ERROR) == 7, "MSR-load list not 16-byte aligned -> VMfailValid(7)",
           "flags 0x%lx error %lu", f, vmread(VM_INSN_ERROR));
    wrmsr(MSR_KERNEL_GS_BASE, saved);
}

static void segment_check_tests(void)
{
    setup_vmcs(false, false);
    vmwrite(GUEST_TR_SEL, SEL_TSS | 4);
    u64 f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_GUEST_STATE,
           "GUEST_TR selector with TI set -> VM-entry failure 0x80000021", "flags 0x%lx reason 0x%lx", f,
           vmread(EXIT_REASON));
    setup_vmcs(false, false);
    vmwrite(GUEST_SS_SEL, SEL_KDATA | 3);
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_GUEST_STATE,
           "GUEST_SS RPL != CS RPL -> VM-entry failure 0x80000021", "flags 0x%lx reason 0x%lx", f,
           vmread(EXIT_REASON));
    setup_vmcs(false, false);
    vmwrite(GUEST_SYSENTER_ESP, 0xAAAAAAAAAAAAAAAAul);
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_FAILED_GUEST_STATE,
           "non-canonical GUEST_SYSENTER_ESP -> VM-entry failure 0x80000021", "flags 0x%lx reason 0x%lx", f,
           vmread(EXIT_REASON));
}

/* L1 owns CR4.TSD (clear in L2's CR4) and shows it set: L2 reads it set, writes it back without
 * an exit (same as the shadow), and its real CR4.TSD stays clear. */
static void cr4_shadow_tests(void)
{
    setup_vmcs(false, false);
    l2_cmd = L2_CR4;
    memset((void *)&l2_out, 0, sizeof(l2_out));
    vmwrite(GUEST_CR4, read_cr4() & ~CR4_TSD);
    vmwrite(CR4_MASK, CR4_TSD);
    vmwrite(CR4_SHADOW, CR4_TSD);
    u64 f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_VMCALL && (l2_out.vector & CR4_TSD) &&
               !(vmread(GUEST_CR4) & CR4_TSD),
           "CR4 read shadow: L2 reads the shadow's TSD, writing it back neither exits nor sets it",
           "flags 0x%lx reason 0x%lx L2 read 0x%lx GUEST_CR4 0x%lx", f, vmread(EXIT_REASON), l2_out.vector,
           vmread(GUEST_CR4));
}

/* INVD exits to L1 unconditionally [SDM Vol. 3 §26.1.2] (L0's KVM reflects it: L1 decides),
 * with its instruction length; L1 skips it and L2 goes on (on its own supervisor shadow stack
 * with the load-CET-state controls, as L1 runs code between the two entries; without them the
 * guest has no CET). */
static void invd_exit_test(void)
{
    setup_vmcs(have_cet_controls, false);
    l2_cmd = L2_INVD;
    memset((void *)&l2_out, 0, sizeof(l2_out));
    u64 f = vmx_enter(1);
    u64 reason = vmread(EXIT_REASON), len = vmread(EXIT_INSN_LEN), done_before = l2_out.done;
    vmwrite(GUEST_RIP, vmread(GUEST_RIP) + len);
    u64 g = vmx_enter(0);
    tap_ok(f == 0 && reason == EXIT_REASON_INVD && len == 2 && !done_before && g == 0 &&
               vmread(EXIT_REASON) == EXIT_REASON_VMCALL && l2_out.done,
           "L2's INVD exits to L1 (reason 13, length 2); L1 skips it and L2 goes on",
           "flags 0x%lx reason 0x%lx len %lu, then flags 0x%lx reason 0x%lx done %lu", f, reason, len, g,
           vmread(EXIT_REASON), l2_out.done);
}

/* L1 owns CR0.TS (clear in L2's CR0) and shows it set: MOV from CR0 and SMSW in L2 both read
 * the shadow's TS [SDM Vol. 3 §26.3]; the real CR0.TS stays clear (no #NM in L2). */
static void cr0_shadow_test(void)
{
    setup_vmcs(false, false);
    l2_cmd = L2_CR0;
    memset((void *)&l2_out, 0, sizeof(l2_out));
    vmwrite(GUEST_CR0, read_cr0() & ~CR0_TS);
    vmwrite(CR0_MASK, CR0_TS);
    vmwrite(CR0_SHADOW, CR0_TS);
    u64 f = vmx_enter(1);
    vmwrite(CR0_MASK, 0);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_VMCALL && (l2_out.vector & CR0_TS) && (l2_out.error & CR0_TS)
               && !(vmread(GUEST_CR0) & CR0_TS),
           "CR0 read shadow: MOV from CR0 and SMSW in L2 read the shadow's TS, the real TS stays clear",
           "flags 0x%lx reason 0x%lx MOV 0x%lx SMSW 0x%lx GUEST_CR0 0x%lx", f, vmread(EXIT_REASON), l2_out.vector,
           l2_out.error, vmread(GUEST_CR0));
}

#define N_NESTED_VMX 18
static void nested_vmx_tests(void)
{
    platform_map();
    lapic_write(LAPIC_SVR, 0x1FF);
    activity_state_tests();
    interrupt_exit_tests();
    debug_control_tests();
    msr_list_tests();
    segment_check_tests();
    cr4_shadow_tests();
    invd_exit_test();
    cr0_shadow_test();
}

static void body(void)
{
    static const char *names[] = {
        "CPUID.1:ECX.VMX",
        "IA32_FEATURE_CONTROL locked with VMXON outside SMX",
        "IA32_VMX_BASIC: KVM's vmcs12 revision, TRUE controls",
        "load-CET-state controls offered with SHSTK/IBT",
        "VMXON with CR4.VMXE clear -> #UD",
        "VMXON -> VMsucceed",
        "VMXON in VMX operation -> VMfail (no current VMCS: VMfailInvalid)",
        "VMCLEAR of the VMXON region -> VMfailValid(3)",
        "VMPTRLD / VMPTRST round trip",
        "VMREAD of an unknown field -> VMfailValid(12)",
        "VMWRITE / VMREAD of GUEST_S_CET",
    };
    const int n_base = 11, n_cet = 12, n_entry = 3, n_inject = 2, n_end = 3;
    struct trap_record rec = {0};
    int i = 0;

    if (!(cpuid(1, 0).ecx & (1u << 5))) {
        for (int k = 0; k < n_base + n_cet + n_entry + n_inject + n_end + N_NESTED_VMX; k++)
            tap_skip(k < n_base ? names[k] : "nested VMX test", "CPUID lacks VMX (kvm_intel nested=0 or -vmx)");
        tap_done();
    }
    tap_ok(true, names[i++], "VMX shown");
    u64 fc = rdmsr(MSR_FEATURE_CONTROL);
    if (!(fc & FC_LOCKED))
        wrmsr(MSR_FEATURE_CONTROL, fc | FC_LOCKED | FC_VMXON_OUTSIDE_SMX);
    fc = rdmsr(MSR_FEATURE_CONTROL);
    bool wr_faults = wrmsr_faults(MSR_FEATURE_CONTROL, 0, &rec);
    tap_ok((fc & (FC_LOCKED | FC_VMXON_OUTSIDE_SMX)) == (FC_LOCKED | FC_VMXON_OUTSIDE_SMX) && wr_faults, names[i++],
           "IA32_FEATURE_CONTROL 0x%lx, write after lock faults %d", fc, wr_faults);
    u64 basic = rdmsr(MSR_VMX_BASIC);
    bool basic56 = basic >> 56 & 1;
    tap_ok((u32)basic == 0x11e57ed0 && (basic >> 55 & 1) && ((basic >> 32) & 0x1FFF) == 4096, names[i++],
           "IA32_VMX_BASIC 0x%lx", basic);
    u64 exit_caps = rdmsr(MSR_VMX_TRUE_EXIT), entry_caps = rdmsr(MSR_VMX_TRUE_ENTRY);
    have_cet_controls = (exit_caps >> 32 & EXIT_LOAD_CET) && (entry_caps >> 32 & ENTRY_LOAD_CET);
    bool guest_cet = cpu_has_shstk() || cpu_has_ibt();
    tap_ok(have_cet_controls == guest_cet && (!guest_cet || basic56), names[i++],
           "exit 0x%lx entry 0x%lx basic56 %d guest CET %d", exit_caps, entry_caps, basic56, guest_cet);

    write_cr4(read_cr4() & ~CR4_VMXE);
    bool ud = expect_fault(VEC_UD, -1, (probe_fn)(void *)vmxon, (void *)(u64)vmxon_region, &rec);
    tap_ok(ud, names[i++], "vector %lu", rec.vector);
    write_cr4(read_cr4() | CR4_VMXE);
    write_cr0(read_cr0() | CR0_NE); /* IA32_VMX_CR0_FIXED0: PE, NE, PG */
    *(u32 *)vmxon_region = (u32)basic;
    *(u32 *)vmcs_a = (u32)basic;
    u64 f = vmxon((u64)vmxon_region);
    tap_ok(f == 0, names[i++], "flags 0x%lx", f);
    f = vmxon((u64)vmxon_region);
    tap_ok(f == RFLAGS_CF, names[i++], "flags 0x%lx (no current VMCS: VMfailInvalid)", f);
    /* with a current VMCS the error number is stored */
    vmclear((u64)vmcs_a);
    vmptrld((u64)vmcs_a);
    f = vmclear((u64)vmxon_region);
    tap_ok(f == RFLAGS_ZF && vmread(VM_INSN_ERROR) == 3, names[i++], "flags 0x%lx error %lu", f, vmread(VM_INSN_ERROR));
    vmptrld((u64)vmcs_a);
    tap_ok(vmptrst() == (u64)vmcs_a, names[i++], "VMPTRST 0x%lx", vmptrst());
    f = vmread_flags(0x7FFE);
    tap_ok(f == RFLAGS_ZF && vmread(VM_INSN_ERROR) == 12, names[i++], "flags 0x%lx error %lu", f, vmread(VM_INSN_ERROR));
    if (have_cet_controls) {
        f = vmwrite(GUEST_S_CET, CET_ENDBR_EN);
        tap_ok(f == 0 && vmread(GUEST_S_CET) == CET_ENDBR_EN, names[i++], "flags 0x%lx value 0x%lx", f,
               vmread(GUEST_S_CET));
    } else {
        tap_skip(names[i++], "no load-CET-state controls");
    }

    if (!have_cet_controls) {
        for (int k = 0; k < n_cet + n_entry; k++)
            tap_skip("L2 CET test", "no load-CET-state controls (guest without SHSTK/IBT)");
    } else {
        map_shstk_page(L2_SHSTK_VA, false, NULL, 0);
        l2_cet_tests(true);
        /* Without the load-CET-state controls nothing switches S_CET/SSP: L2 would share L1's
         * supervisor shadow stack, which L1's own calls between VM exit and VMRESUME overwrite.
         * So L1 (like a hypervisor without those controls) runs its L2 with the supervisor
         * shadow stack off, IBT on; L2's user shadow stack (U_CET/PL3_SSP, XSAVE state) works. */
        u64 s_cet = rdmsr(MSR_S_CET);
        bool kshstk = cet.shstk;
        wrmsr(MSR_S_CET, s_cet & ~CET_SH_STK_EN);
        cet.shstk = false;
        l2_cet_tests(false);
        cet.shstk = kshstk;
        wrmsr(MSR_S_CET, s_cet);
        entry_check_tests();
    }
    injection_tests(basic56);
    nested_vmx_tests();
    /* INT3 in L2 with EXCEPTION_BITMAP[3]: a software-exception exit (type 6), RIP at the INT3 */
    setup_vmcs(false, false);
    vmwrite(EXC_BITMAP, 1ul << 3);
    l2_cmd = L2_INT3;
    f = vmx_enter(1);
    tap_ok(f == 0 && vmread(EXIT_REASON) == EXIT_REASON_EXCEPTION && vmread(EXIT_INTR_INFO) == 0x80000603u &&
               vmread(EXIT_INSN_LEN) == 1 && vmread(GUEST_RIP) == (u64)l2_int3,
           "L2 INT3 with EXCEPTION_BITMAP[3] -> software-exception exit to L1", "flags 0x%lx reason 0x%lx info 0x%lx "
           "len %lu rip 0x%lx", f, vmread(EXIT_REASON), vmread(EXIT_INTR_INFO), vmread(EXIT_INSN_LEN), vmread(GUEST_RIP));
    /* VMLAUNCH of a launched VMCS: VMfailValid(4) */
    setup_vmcs(false, false);
    l2_cmd = 0;
    vmx_enter(1);
    f = vmx_enter(1);
    tap_ok(f == RFLAGS_ZF && vmread(VM_INSN_ERROR) == 4, "VMLAUNCH of a launched VMCS -> VMfailValid(4)",
           "flags 0x%lx error %lu", f, vmread(VM_INSN_ERROR));
    f = vmxoff();
    bool ud_after = expect_fault(VEC_UD, -1, (probe_fn)(void *)vmxoff, NULL, &rec);
    tap_ok(f == 0 && ud_after, "VMXOFF; VMX instructions #UD outside VMX operation", "flags 0x%lx ud %d", f, ud_after);
    (void)n_inject;
    (void)n_end;
    tap_done();
}

void kmain(void)
{
    kernel_init();
    tap_plan(11 + 12 + 3 + 2 + 3 + N_NESTED_VMX);
    cet_kernel_start(body, 0);
}
