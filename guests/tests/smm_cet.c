/* smm_cet: an SMI taken with shadow stacks and IBT on returns with the CET state intact
 * [SDM Vol. 3 ch. 32 (SMM), KVM smm.c "Save and reload SSP to/from SMRAM"].
 *
 * The kernel turns on supervisor shadow stacks and IBT (S_CET), gives U_CET and PL0-3_SSP
 * distinctive values, copies a 16-bit SMI handler to SMBASE + 0x8000 and raises SMIs by writing
 * the chipset's APM control port 0xB2.  The handler runs in SMM's real-mode-like state (CS.base
 * = SMBASE, 4 GiB limits) and addresses SMRAM CS-relative, so the same bytes work at any SMBASE:
 * it counts its runs, records CR0/CR4 as it sees them and the SSP and CR4 of the state-save map
 * (KVM's 64-bit layout: SSP at SMBASE + 0xFF18, CR4 at + 0xFF48, SMBASE at + 0xFF00), and obeys
 * a command word: corrupt the saved SSP (misaligned / non-canonical) or relocate SMBASE.
 *
 * Default run: RSM outside SMM is #UD; after an SMI and RSM, SSP, S_CET, U_CET, PL0-3_SSP and
 * CR4 are unchanged and shadow stacks and IBT are still enforced; SMBASE relocation moves the
 * next SMI; a self-IPI with ICR delivery mode SMI enters SMM too; with `--smp 2`, an SMI IPI
 * wakes an AP halted with IF = 0, whose handler runs at its own SMBASE (0x30000: only the BSP
 * relocated), and RSM resumes the AP after its HLT.  With "corrupt=misalign" or "corrupt=noncanonical" on the command line the handler
 * corrupts the saved SSP: RSM must fail and the VM shut down (KVM: triple fault,
 * KVM_EXIT_SHUTDOWN), so the kernel's last TAP line must never print.
 * SKIP without SHSTK. */
#include "ktest.h"
#include "smp.h"

#define APM_CNT 0xB2
#define SMBASE_RESET 0x30000ul
#define SMBASE_RELOCATED 0x50000ul
#define SMM_HANDLER 0x8000ul
#define ICR_SMI 0x200u
#define WAIT_LIMIT 20000000ul
/* The handler's data block at SMBASE + 0x7000 (offsets the 16-bit code uses). */
struct smm_data {
    u32 ran;          /* 0x00 */
    u32 cr4;          /* 0x04: CR4 inside SMM */
    u64 saved_ssp;    /* 0x08: the map's SSP field */
    u32 saved_cr4;    /* 0x10: the map's CR4 field (low half) */
    u32 command;      /* 0x14: SMM_CMD_* */
    u32 cr0;          /* 0x18: CR0 inside SMM */
    u32 new_smbase;   /* 0x1C: for SMM_CMD_RELOCATE */
};
_Static_assert(sizeof(struct smm_data) == 0x20, "the handler's offsets");
#define SMM_DATA 0x7000ul
#define SMM_CMD_MISALIGN_SSP 1
#define SMM_CMD_NONCANONICAL_SSP 2
#define SMM_CMD_RELOCATE 4

extern char smm_handler[], smm_handler_end[];
__asm__(".pushsection .rodata\n"
        ".code16\n"
        "smm_handler:\n"
        "  incl %cs:0x7000\n"
        "  mov %cr4, %eax\n"
        "  mov %eax, %cs:0x7004\n"
        "  mov %cr0, %eax\n"
        "  mov %eax, %cs:0x7018\n"
        "  mov %cs:0xff18, %eax\n"        /* state-save map: SSP */
        "  mov %eax, %cs:0x7008\n"
        "  mov %cs:0xff1c, %eax\n"
        "  mov %eax, %cs:0x700c\n"
        "  mov %cs:0xff48, %eax\n"        /* state-save map: CR4 */
        "  mov %eax, %cs:0x7010\n"
        "  mov %cs:0x7014, %eax\n"        /* command */
        "  test $1, %al\n"
        "  jz 1f\n"
        "  orb $2, %cs:0xff18\n"          /* SSP no longer 4-byte aligned */
        "1: test $2, %al\n"
        "  jz 2f\n"
        "  movb $0x80, %cs:0xff1e\n"      /* SSP bit 55 set, 63:56 clear: not canonical */
        "2: test $4, %al\n"
        "  jz 3f\n"
        "  mov %cs:0x701c, %ebx\n"
        "  mov %ebx, %cs:0xff00\n"        /* state-save map: SMBASE */
        "3: rsm\n"
        "smm_handler_end:\n"
        ".code64\n"
        ".popsection\n");

extern char rsm_insn[], kern_rop_victim[], kern_rop_victim_ret[], kern_gadget[], kern_no_endbr[];
__asm__(".text\n"
        "rsm_insn: rsm\n"
        "  ret\n"
        "kern_rop_victim: endbr64\n"
        "  lea kern_gadget(%rip), %rax\n"
        "  mov %rax, (%rsp)\n"
        "kern_rop_victim_ret: ret\n"
        "kern_gadget: endbr64\n"
        "  movl $1, kern_gadget_ran(%rip)\n"
        "  ret\n"
        "kern_no_endbr: nop\n"
        "  ret\n");
volatile int kern_gadget_ran;

static volatile struct smm_data *smm_data(u64 smbase) { return (volatile struct smm_data *)(smbase + SMM_DATA); }

static void install_handler(u64 smbase)
{
    memcpy((void *)(smbase + SMM_HANDLER), smm_handler, smm_handler_end - smm_handler);
    memset((void *)smm_data(smbase), 0, sizeof(struct smm_data));
}

static void do_rsm(void *arg) { ((void (*)(void))rsm_insn)(); }
static void do_rop(void *arg) { ((void (*)(void))kern_rop_victim)(); __asm__ volatile("" ::: "memory"); }
static void do_call(void *arg) { call_indirect((void (*)(void))arg); }

struct cet_msrs { u64 s_cet, u_cet, pl[4]; };

static u8 ap_stack[16384] ALIGNED(16);
static volatile int ap_halting;
static volatile u64 ap_hlt_returns;

static void ap_main(int cpu)
{
    for (;;) {
        ap_halting = 1;
        __asm__ volatile("cli; hlt" ::: "memory");  /* only an SMI (or INIT) can end this */
        ap_hlt_returns++;
    }
}

static bool wait_for(volatile u32 *value, u32 want)
{
    for (u64 i = 0; i < WAIT_LIMIT && *value != want; i++)
        __asm__ volatile("pause");
    return *value == want;
}

static void smi_to_halted_ap(const char *name)
{
    if (fw_cfg_nb_cpus() < 2) {
        tap_skip(name, "one CPU (boot with --smp 2)");
        return;
    }
    install_handler(SMBASE_RESET);
    volatile struct smm_data *d = smm_data(SMBASE_RESET);
    bool started = smp_start_ap(1, ap_main, (u64)(ap_stack + sizeof(ap_stack)));
    for (u64 i = 0; i < WAIT_LIMIT && !ap_halting; i++)
        __asm__ volatile("pause");
    apic_send_ipi(1, ICR_SMI);
    bool ran = wait_for(&d->ran, 1);
    for (u64 i = 0; i < WAIT_LIMIT && !ap_hlt_returns; i++)
        __asm__ volatile("pause");
    tap_ok(started && ran && ap_hlt_returns == 1 && d->cr4 == 0, name, "started %d handler runs %u hlt returns %lu",
           started, d->ran, ap_hlt_returns);
}

static struct cet_msrs read_cet_msrs(void)
{
    struct cet_msrs m = {rdmsr(MSR_S_CET), rdmsr(MSR_U_CET),
                         {rdmsr(MSR_PL0_SSP), rdmsr(MSR_PL1_SSP), rdmsr(MSR_PL2_SSP), rdmsr(MSR_PL3_SSP)}};
    return m;
}

static bool same_cet_msrs(const struct cet_msrs *a, const struct cet_msrs *b)
{
    return a->s_cet == b->s_cet && a->u_cet == b->u_cet && a->pl[0] == b->pl[0] && a->pl[1] == b->pl[1]
        && a->pl[2] == b->pl[2] && a->pl[3] == b->pl[3];
}

/* SSP at the OUT to APM_CNT and after RSM (same call depth: both in this function). */
static NOINLINE void smi(u64 *ssp_at_smi, u64 *ssp_after)
{
    *ssp_at_smi = rdssp();
    outb(APM_CNT, 0);
    *ssp_after = rdssp();
}

static NORETURN void corrupted_rsm(u32 command, const char *what)
{
    tap_plan(2);
    install_handler(SMBASE_RESET);
    smm_data(SMBASE_RESET)->command = command;
    tap_ok(true, "SMI handler armed to corrupt the saved SSP", "%s", what);
    u64 at, after;
    smi(&at, &after);
    tap_ok(false, "RSM with a corrupted saved SSP shuts the VM down", "RSM returned (ssp 0x%lx)", after);
    tap_done();
}

static const char *const names[] = {
    "RSM outside SMM -> #UD",
    "SMI handler ran once, in SMM",
    "in SMM: CR4 = 0 (CET off), CR0.PE and CR0.PG clear",
    "SMRAM state-save map holds the SSP at SMBASE+0xFF18 and CR4 with CET",
    "SSP is the same after RSM",
    "S_CET, U_CET and PL0-3_SSP are the same after RSM",
    "CR4.CET still set after RSM",
    "after RSM: return-address overwrite -> #CP(1)",
    "after RSM: CALL* to a non-ENDBR target -> #CP(3)",
    "SMBASE relocation: the next SMI runs at the new SMBASE",
    "an IPI with ICR delivery mode SMI enters SMM and returns",
    "an SMI IPI wakes a halted AP (IF = 0): handler at its SMBASE, RSM resumes after the HLT",
};
#define NTESTS ((int)(sizeof(names) / sizeof(names[0])))

static void body(void)
{
    if (cmdline_has("corrupt=misalign"))
        corrupted_rsm(SMM_CMD_MISALIGN_SSP, "misaligned");
    if (cmdline_has("corrupt=noncanonical"))
        corrupted_rsm(SMM_CMD_NONCANONICAL_SSP, "non-canonical");
    tap_plan(NTESTS);
    if (!cpu_has_shstk() || !cpu_has_ibt())
        tap_skip_rest(names, 0, NTESTS, "CPUID lacks SHSTK or IBT");

    struct trap_record rec = {0};
    bool ud = expect_fault(VEC_UD, -1, do_rsm, NULL, &rec);
    tap_ok(ud && rec.rip == (u64)rsm_insn, names[0], "faulted %d vector %lu rip 0x%lx", ud, rec.vector, rec.rip);

    wrmsr(MSR_U_CET, CET_SH_STK_EN | CET_ENDBR_EN);
    wrmsr(MSR_PL0_SSP, 0x7f0000001000ul);
    wrmsr(MSR_PL1_SSP, 0x7f0000002ff8ul);
    wrmsr(MSR_PL2_SSP, 0x7f0000003ff0ul);
    wrmsr(MSR_PL3_SSP, 0x7f0000004fe8ul);
    install_handler(SMBASE_RESET);
    volatile struct smm_data *d = smm_data(SMBASE_RESET);
    struct cet_msrs before = read_cet_msrs();
    u64 ssp_at_smi, ssp_after;
    smi(&ssp_at_smi, &ssp_after);
    struct cet_msrs after = read_cet_msrs();

    tap_ok(d->ran == 1, names[1], "handler runs %u", d->ran);
    tap_ok(d->cr4 == 0 && !(d->cr0 & 1) && !(d->cr0 & (1u << 31)), names[2], "cr4 0x%x cr0 0x%x", d->cr4, d->cr0);
    tap_ok(d->saved_ssp == ssp_at_smi && ssp_at_smi && (d->saved_cr4 & CR4_CET), names[3],
           "saved ssp 0x%lx (SSP at the SMI 0x%lx) saved cr4 0x%x", d->saved_ssp, ssp_at_smi, d->saved_cr4);
    tap_ok(ssp_after == ssp_at_smi, names[4], "ssp 0x%lx -> 0x%lx", ssp_at_smi, ssp_after);
    tap_ok(same_cet_msrs(&before, &after), names[5],
           "S_CET 0x%lx->0x%lx U_CET 0x%lx->0x%lx PL0 0x%lx->0x%lx PL3 0x%lx->0x%lx", before.s_cet, after.s_cet,
           before.u_cet, after.u_cet, before.pl[0], after.pl[0], before.pl[3], after.pl[3]);
    tap_ok(read_cr4() & CR4_CET, names[6], "cr4 0x%lx", read_cr4());

    kern_gadget_ran = 0;
    bool cp = expect_fault(VEC_CP, CP_NEAR_RET, do_rop, NULL, &rec);
    tap_ok(cp && rec.rip == (u64)kern_rop_victim_ret && !kern_gadget_ran, names[7],
           "faulted %d vector %lu error %lu rip 0x%lx gadget %d", cp, rec.vector, rec.error, rec.rip, kern_gadget_ran);
    cp = expect_fault(VEC_CP, CP_ENDBRANCH, do_call, kern_no_endbr, &rec);
    tap_ok(cp && rec.rip == (u64)kern_no_endbr, names[8], "faulted %d vector %lu error %lu rip 0x%lx",
           cp, rec.vector, rec.error, rec.rip);

    install_handler(SMBASE_RELOCATED);
    d->command = SMM_CMD_RELOCATE;
    d->new_smbase = SMBASE_RELOCATED;
    smi(&ssp_at_smi, &ssp_after);       /* runs at 0x30000, relocates */
    d->command = 0;
    smi(&ssp_at_smi, &ssp_after);       /* runs at 0x50000 */
    volatile struct smm_data *moved = smm_data(SMBASE_RELOCATED);
    tap_ok(d->ran == 2 && moved->ran == 1 && moved->saved_ssp == ssp_at_smi && ssp_after == ssp_at_smi, names[9],
           "runs at 0x30000 %u, at 0x50000 %u; saved ssp 0x%lx ssp 0x%lx", d->ran, moved->ran, moved->saved_ssp,
           ssp_after);

    u64 ssp = rdssp();
    apic_send_ipi(apic_id(), ICR_SMI);
    /* the SMI is taken inside apic_send_ipi: the saved SSP is a few call frames below ours */
    tap_ok(moved->ran == 2 && moved->saved_ssp < ssp && ssp - moved->saved_ssp <= 64 && rdssp() == ssp, names[10],
           "runs at 0x50000 %u; saved ssp 0x%lx ssp 0x%lx", moved->ran, moved->saved_ssp, ssp);
    smi_to_halted_ap(names[11]);
    tap_done();
}

void kmain(void)
{
    kernel_init();
    smp_init();
    cet_kernel_start(body, 0);
}
