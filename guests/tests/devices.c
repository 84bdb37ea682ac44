/* devices: the PC devices as a guest sees them, end to end through the VMM - fw_cfg, the 8259
 * pair, the 16550, the xAPIC page, the x2APIC MSRs (KVM_EXIT_X86_RDMSR/WRMSR to the VMM), the
 * MSRs KVM handles itself, CPUID topology and hypervisor leaves, and (with "shutdown" on the
 * multiboot command line) the Bochs shutdown port 0x8900 instead of isa-debug-exit.
 * Facts: SDM Vol. 3 ch. 11 (APIC; Table 11-6 x2APIC MSRs), QEMU docs/specs/fw_cfg.rst,
 * Multiboot 0.6.96 §3.3, 8259A data sheet (ICW1-4, OCW1). */
#include "ktest.h"

#define PCD_PWT ((1ul << 4) | (1ul << 3))
#define APIC_PHYS 0xFEE00000ul
#define MSR_APIC_BASE 0x1Bu
#define APIC_BASE_EXTD (1ul << 10)
#define APIC_BASE_EN (1ul << 11)
#define X2APIC_ID 0x802u
#define X2APIC_VERSION 0x803u
#define X2APIC_RESERVED 0x804u   /* Table 11-6: 0x804-0x807 are reserved */
#define X2APIC_EOI 0x80Bu
#define X2APIC_ICR 0x830u
#define X2APIC_SELF_IPI 0x83Fu
#define FW_CFG_CTL 0x510
#define FW_CFG_DATA 0x511
#define COM1 0x3F8

extern u32 boot_mb_magic, boot_mb_info;

static inline void outw_port(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }

/* ---- fw_cfg (traditional I/O interface) ---- */
static void fw_cfg_read(u16 key, u8 *buf, int n)
{
    outw_port(FW_CFG_CTL, key);
    for (int i = 0; i < n; i++)
        buf[i] = inb(FW_CFG_DATA);
}
static u64 fw_cfg_u64(u16 key, int n)
{
    u8 b[8] = {0};
    fw_cfg_read(key, b, n);
    u64 v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

/* ---- multiboot ---- */
struct mb_mmap { u32 size; u64 addr, len; u32 type; } __attribute__((packed));

static const char *mb_cmdline(void)
{
    if (boot_mb_magic != 0x2BADB002u)
        return "";
    u32 *info = (u32 *)(u64)boot_mb_info;
    return (info[0] & (1u << 2)) ? (const char *)(u64)info[4] : "";
}

static bool has_word(const char *s, const char *w)
{
    for (; *s; s++) {
        const char *a = s, *b = w;
        while (*b && *a == *b) { a++; b++; }
        if (!*b && (*a == 0 || *a == ' ') && (s == mb_cmdline() || s[-1] == ' '))
            return true;
    }
    return false;
}

/* End of the highest RAM (type 1) range of the multiboot memory map, 0 without one. */
static u64 mb_ram_end(void)
{
    if (boot_mb_magic != 0x2BADB002u)
        return 0;
    u32 *info = (u32 *)(u64)boot_mb_info;
    if (!(info[0] & (1u << 6)))
        return 0;
    u64 end = 0, p = info[12], stop = info[12] + (u64)info[11];
    while (p < stop) {
        struct mb_mmap *e = (struct mb_mmap *)p;
        if (e->type == 1 && e->addr + e->len > end)
            end = e->addr + e->len;
        p += e->size + 4;
    }
    return end;
}

static u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

static void test_cpuid(void)
{
    struct cpuid_regs hv = cpuid(0x40000000, 0);
    char sig[13];
    memcpy(sig, &hv.ebx, 4);
    memcpy(sig + 4, &hv.ecx, 4);
    memcpy(sig + 8, &hv.edx, 4);
    sig[12] = 0;
    bool kvm = sig[0] == 'K' && sig[1] == 'V' && sig[2] == 'M' && sig[8] == 'M' && sig[9] == 0;
    tap_ok((cpuid(1, 0).ecx >> 31) && kvm && hv.eax >= 0x40000001,
           "CPUID.1 hypervisor bit and leaf 0x40000000 = KVMKVMKVM", "sig '%s' max 0x%x", sig, hv.eax);
    struct cpuid_regs l1 = cpuid(1, 0), t0 = cpuid(0xB, 0), t1 = cpuid(0xB, 1), t2 = cpuid(0xB, 2);
    tap_ok(t0.ebx == 1 && ((t0.ecx >> 8) & 0xFF) == 1 && ((t1.ecx >> 8) & 0xFF) == 2 && t1.ebx == 1 &&
               ((t2.ecx >> 8) & 0xFF) == 0 && t0.edx == (l1.ebx >> 24),
           "CPUID.0xB: one SMT and one core level, x2APIC ID = CPUID.1 EBX[31:24]",
           "0xB.0 ebx %u ecx 0x%x edx %u, 0xB.1 ecx 0x%x, 0xB.2 ecx 0x%x", t0.ebx, t0.ecx, t0.edx, t1.ecx,
           t2.ecx);
    struct cpuid_regs e8 = cpuid(0x80000008, 0);
    tap_ok((e8.eax & 0xFF) >= 36 && ((e8.eax >> 8) & 0xFF) >= 48, "CPUID.0x80000008 address sizes",
           "phys %u virt %u", e8.eax & 0xFF, (e8.eax >> 8) & 0xFF);
}

static void test_fw_cfg(void)
{
    char sig[5] = {0};
    fw_cfg_read(0x0000, (u8 *)sig, 4);
    tap_ok(sig[0] == 'Q' && sig[1] == 'E' && sig[2] == 'M' && sig[3] == 'U', "fw_cfg signature is QEMU",
           "'%s'", sig);
    u64 cpus = fw_cfg_u64(0x0005, 2);
    tap_ok(cpus == 1, "fw_cfg CPU count is 1", "%lu", cpus);
    u64 ram = fw_cfg_u64(0x0003, 8), end = mb_ram_end();
    tap_ok(ram && ram == end, "fw_cfg RAM size = end of the multiboot memory map",
           "fw_cfg 0x%lx, memory map 0x%lx", ram, end);
    kprintf("# fw_cfg: RAM %lu MiB, %lu CPU(s)\n", ram >> 20, cpus);
}

static void test_pic(void)
{
    /* ICW1 (edge, cascade, ICW4), ICW2 vector bases 0x20/0x28, ICW3 slave on IR2 / ID 2, ICW4 8086 */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFB); outb(0xA1, 0xA5);
    u8 m1 = inb(0x21), s1 = inb(0xA1);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
    u8 m2 = inb(0x21), s2 = inb(0xA1);
    tap_ok(m1 == 0xFB && s1 == 0xA5 && m2 == 0xFF && s2 == 0xFF, "8259: ICW1-4, then the IMR reads back",
           "master 0x%x/0x%x slave 0x%x/0x%x", m1, m2, s1, s2);
}

static void test_uart(void)
{
    u8 lsr = inb(COM1 + 5);
    outb(COM1 + 7, 0xA5);
    u8 scr = inb(COM1 + 7);
    outb(COM1 + 7, 0x5A);
    u8 scr2 = inb(COM1 + 7);
    tap_ok((lsr & 0x60) == 0x60 && scr == 0xA5 && scr2 == 0x5A,
           "16550: LSR THRE|TEMT set, scratch register holds a byte", "lsr 0x%x scr 0x%x/0x%x", lsr, scr, scr2);
}

static void test_msrs_kvm_handles(void)
{
    struct trap_record rec;
    u64 pat = 0, misc = 0, tsc1 = 0, tsc2 = 0, v = 0;
    bool ok = !rdmsr_faults(0x277, &pat, &rec) && !rdmsr_faults(0x1A0, &misc, &rec) &&
              !rdmsr_faults(0x10, &tsc1, &rec) && !rdmsr_faults(0x10, &tsc2, &rec);
    tap_ok(ok && pat == 0x0007040600070406ul, "RDMSR IA32_PAT, MISC_ENABLE, TSC (KVM's MSRs)",
           "pat 0x%lx misc 0x%lx tsc 0x%lx", pat, misc, tsc2);
    tap_ok(wrmsr_faults(0x277, 0x0007040600070402ul, &rec) && rec.vector == VEC_GP && !rdmsr_faults(0x277, &v, &rec) &&
               v == pat,
           "WRMSR IA32_PAT with memory type 2 -> #GP, PAT unchanged", "pat 0x%lx", v);
    tap_ok(rdmsr_faults(0x4B564D99, &v, &rec) && rec.vector == VEC_GP && rec.error == 0,
           "RDMSR of an MSR nobody knows -> #GP(0)", "vector %lu", rec.vector);
}

static void test_xapic(void)
{
    map_page(APIC_PHYS, APIC_PHYS, PTE_P | PTE_RW | PTE_NX | PCD_PWT);
    struct trap_record rec;
    u64 base = 0;
    bool readable = !rdmsr_faults(MSR_APIC_BASE, &base, &rec);
    tap_ok(readable && (base & ~0xFFFul) == APIC_PHYS && (base & APIC_BASE_EN) && (base & (1ul << 8)) &&
               !(base & APIC_BASE_EXTD),
           "IA32_APIC_BASE: 0xFEE00000, enabled, BSP, xAPIC mode", "0x%lx", base);
    u32 id = mmio_read32(APIC_PHYS + 0x20), ver = mmio_read32(APIC_PHYS + 0x30);
    tap_ok((id >> 24) == (cpuid(1, 0).ebx >> 24) && (ver & 0xFF) >= 0x10 && (ver & 0xFF) <= 0x15 &&
               ((ver >> 16) & 0xFF) >= 4,
           "xAPIC ID and version registers", "id 0x%x version 0x%x", id, ver);
    kprintf("# xAPIC: id 0x%x version 0x%x\n", id, ver);
    mmio_write32(APIC_PHYS + 0xF0, 0x1FF);
    u32 svr = mmio_read32(APIC_PHYS + 0xF0);
    mmio_write32(APIC_PHYS + 0x80, 0x20);
    u32 tpr = mmio_read32(APIC_PHYS + 0x80);
    mmio_write32(APIC_PHYS + 0x80, 0);
    tap_ok(svr == 0x1FF && tpr == 0x20, "xAPIC: SVR software enable and TPR read back", "svr 0x%x tpr 0x%x", svr,
           tpr);
}

static void test_x2apic(void)
{
    const int n = 7;
    if (!(cpuid(1, 0).ecx & (1u << 21))) {
        for (int i = 0; i < n; i++)
            tap_skip("x2APIC", "CPUID.1:ECX[21] is clear");
        return;
    }
    struct trap_record rec;
    u64 v = 0, base = rdmsr(MSR_APIC_BASE);
    tap_ok(rdmsr_faults(X2APIC_VERSION, &v, &rec) && rec.vector == VEC_GP,
           "x2APIC MSR before x2APIC mode -> #GP", "vector %lu", rec.vector);
    bool entered = !wrmsr_faults(MSR_APIC_BASE, base | APIC_BASE_EXTD, &rec);
    u64 now = rdmsr(MSR_APIC_BASE);
    tap_ok(entered && (now & APIC_BASE_EXTD), "IA32_APIC_BASE.EXTD enables x2APIC mode", "0x%lx", now);
    u64 ver = 0, id = ~0ul;
    bool ok = !rdmsr_faults(X2APIC_VERSION, &ver, &rec) && !rdmsr_faults(X2APIC_ID, &id, &rec);
    u32 xapic_ver = 0x14;
    tap_ok(ok && (ver & 0xFF) == xapic_ver && id == cpuid(0xB, 0).edx,
           "x2APIC version (0x803) and ID (0x802) by RDMSR", "version 0x%lx id 0x%lx", ver, id);
    kprintf("# x2APIC: id 0x%lx version 0x%lx\n", id, ver);
    bool harmless = !wrmsr_faults(X2APIC_EOI, 0, &rec) && !wrmsr_faults(X2APIC_SELF_IPI, 0x40, &rec) &&
                    !wrmsr_faults(X2APIC_ICR, (5ul << 32) | 0x40, &rec);
    tap_ok(harmless, "x2APIC: EOI, self-IPI and an IPI to an absent CPU are harmless", "vector %lu",
           rec.vector);
    tap_ok(rdmsr_faults(X2APIC_RESERVED, &v, &rec) && rec.vector == VEC_GP && rec.error == 0,
           "RDMSR of reserved x2APIC MSR 0x804 -> #GP(0)", "vector %lu", rec.vector);
    tap_ok(rdmsr_faults(X2APIC_EOI, &v, &rec) && rec.vector == VEC_GP &&
               wrmsr_faults(X2APIC_VERSION, 0, &rec) && rec.vector == VEC_GP,
           "RDMSR of write-only EOI and WRMSR of read-only version -> #GP", "vector %lu", rec.vector);
    tap_ok(wrmsr_faults(MSR_APIC_BASE, now & ~APIC_BASE_EXTD, &rec) && rec.vector == VEC_GP &&
               (rdmsr(MSR_APIC_BASE) & APIC_BASE_EXTD),
           "x2APIC -> xAPIC without disabling -> #GP, mode kept", "vector %lu", rec.vector);
}

static void body(void)
{
    test_cpuid();
    test_fw_cfg();
    test_pic();
    test_uart();
    test_msrs_kvm_handles();
    test_xapic();
    test_x2apic();
    if (has_word(mb_cmdline(), "shutdown")) {
        kprintf("# powering off through port 0x8900\n");
        for (const char *s = "Shutdown"; *s; s++)
            __asm__ volatile("outb %0, %1" ::"a"(*s), "d"((u16)0x8900));
        puts_serial("Bail out! still running after the shutdown port\n");
        exit_qemu(1);
    }
    tap_done();
}

void kmain(void)
{
    kernel_init();
    kprintf("# devices: cmdline '%s'\n", mb_cmdline());
    tap_plan(21);
    cet_kernel_start(body, 0);
}
