/* acpi_poweroff: what an OS reads from the ACPI tables and the power-off it performs with them.
 * Finds the RSDP in 0xE0000-0xFFFFF, checks every checksum, follows the XSDT (RSDT without one)
 * to the FADT and the MADT, checks the MADT describes every CPU, the I/O APIC and the interrupt
 * source overrides of a PC (ISA IRQ 0 -> GSI 2, the SCI level-triggered), reads \_S5 from the
 * DSDT and powers off by writing SLP_TYP | SLP_EN to PM1a_CNT (enabling ACPI through SMI_CMD
 * first if SCI_EN is clear, as Linux's acpi_enable does). The VMM sees the power-off: the TAP
 * lines come first; the machine must then stop (cetvm exits 0).
 * Facts: ACPI 6.4 §5.2.5 (RSDP), §5.2.6/§5.2.8 (headers, XSDT), §5.2.9 (FADT offsets),
 * §5.2.12 (MADT structures), §7.4.2 (\_S5), §4.8.3.2 (PM1_CNT SLP_TYP 12:10, SLP_EN 13),
 * §4.8.2.1 (SCI_EN, SMI_CMD/ACPI_ENABLE). */
#include "ktest.h"
#include "platform.h"

#define SLP_EN (1u << 13)
#define SCI_EN 1u

static int fails;
#define CHECK(cond, name, ...)                                                                     \
    do {                                                                                           \
        bool c_ = (cond);                                                                          \
        fails += !c_;                                                                              \
        tap_ok(c_, name, __VA_ARGS__);                                                             \
    } while (0)

static u8 sum8(const u8 *p, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s += p[i];
    return s;
}
static u32 rd32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u16 rd16(const u8 *p) { return p[0] | p[1] << 8; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }
static bool sig(const u8 *p, const char *s) { return p[0] == s[0] && p[1] == s[1] && p[2] == s[2] && p[3] == s[3]; }
static bool table_ok(const u8 *t) { return t && rd32(t + 4) >= 36 && sum8(t, rd32(t + 4)) == 0; }

static const u8 *find_rsdp(void)
{
    for (u64 a = 0xE0000; a < 0x100000; a += 16) {
        const u8 *p = (const u8 *)a;
        if (sig(p, "RSD ") && sig(p + 4, "PTR ") && sum8(p, 20) == 0)
            return p;
    }
    return NULL;
}

/* The table with signature `s` listed in the XSDT (or, without one, the RSDT). */
static const u8 *find_table(const u8 *root, bool xsdt, const char *s)
{
    u32 width = xsdt ? 8 : 4, n = (rd32(root + 4) - 36) / width;
    for (u32 i = 0; i < n; i++) {
        const u8 *t = (const u8 *)(xsdt ? rd64(root + 36 + 8 * i) : rd32(root + 36 + 4 * i));
        if (sig(t, s))
            return t;
    }
    return NULL;
}

static u32 cpu_count(void)
{
    struct cpuid_regs r = cpuid(1, 0);
    return (r.edx & (1u << 28)) ? (r.ebx >> 16) & 0xFF : 1;
}

static void check_madt(const u8 *madt)
{
    u32 cpus = 0, len = rd32(madt + 4);
    bool ioapic = false, timer_override = false, sci_override = false;
    for (u32 off = 44; off + 2 <= len && madt[off + 1] >= 2; off += madt[off + 1]) {
        const u8 *e = madt + off;
        if (e[0] == 0 && (rd32(e + 4) & 1))
            cpus++;
        else if (e[0] == 9 && (rd32(e + 8) & 1))
            cpus++;
        else if (e[0] == 1)
            ioapic = rd32(e + 4) == IOAPIC_PHYS && rd32(e + 8) == 0;
        else if (e[0] == 2 && e[3] == 0)
            timer_override = rd32(e + 4) == 2;
        else if (e[0] == 2 && e[3] == 9)
            sci_override = rd32(e + 4) == 9 && (rd16(e + 8) & 0xF) == 0xD;
    }
    CHECK(rd32(madt + 36) == LAPIC_PHYS && (rd32(madt + 40) & 1), "MADT: local APICs at 0xFEE00000, PCAT_COMPAT",
          "0x%x flags 0x%x", rd32(madt + 36), rd32(madt + 40));
    CHECK(cpus == cpu_count(), "MADT: one enabled local APIC per CPU", "%u entries, %u CPUs", cpus, cpu_count());
    CHECK(ioapic, "MADT: I/O APIC at 0xFEC00000, GSI base 0", "%s", ioapic ? "found" : "missing");
    CHECK(timer_override && sci_override, "MADT: overrides IRQ 0 -> GSI 2 and IRQ 9 level, active high",
          "IRQ0 %d SCI %d", timer_override, sci_override);
}

/* SLP_TYP of \_S5: Name(_S5_, Package(n) { SLP_TYPa, ... }) with ZeroOp, OneOp or BytePrefix. */
static int s5_slp_typ(const u8 *dsdt)
{
    u32 len = rd32(dsdt + 4);
    for (u32 i = 36; i + 8 < len; i++) {
        if (!sig(dsdt + i, "_S5_") || dsdt[i + 4] != 0x12)
            continue;
        const u8 *p = dsdt + i + 5;
        p += (p[0] >> 6) + 1 + 1;  /* PkgLength, NumElements */
        return p[0] == 0x0A ? p[1] : p[0] <= 1 ? p[0] : -1;
    }
    return -1;
}

static void body(void)
{
    const u8 *rsdp = find_rsdp();
    CHECK(rsdp != NULL, "RSDP found in 0xE0000-0xFFFFF (ACPI 1.0 checksum)", "at %p", rsdp);
    if (!rsdp)
        tap_done();
    bool v2 = rsdp[15] >= 2;
    CHECK(v2 && rd32(rsdp + 20) == 36 && sum8(rsdp, 36) == 0 && table_ok((const u8 *)rd64(rsdp + 24)),
          "RSDP revision 2: extended checksum, XSDT valid", "revision %u", rsdp[15]);
    const u8 *rsdt = (const u8 *)(u64)rd32(rsdp + 16);
    const u8 *xsdt = v2 ? (const u8 *)rd64(rsdp + 24) : NULL;
    const u8 *root = xsdt ? xsdt : rsdt;
    CHECK(table_ok(rsdt) && sig(rsdt, "RSDT"), "RSDT checksum and length", "at %p", rsdt);

    const u8 *fadt = find_table(root, xsdt != NULL, "FACP");
    const u8 *madt = find_table(root, xsdt != NULL, "APIC");
    CHECK(table_ok(fadt) && table_ok(madt), "FADT and MADT listed, checksums valid", "FADT %p MADT %p", fadt, madt);
    if (!fadt || !madt)
        tap_done();
    check_madt(madt);

    u32 pm1a_cnt = rd32(fadt + 64), pm_tmr = rd32(fadt + 76), smi_cmd = rd32(fadt + 48);
    const u8 *dsdt = (const u8 *)(u64)rd32(fadt + 40);
    if (rd32(fadt + 4) >= 148 && rd64(fadt + 140))
        dsdt = (const u8 *)rd64(fadt + 140);
    CHECK(rd16(fadt + 46) == 9 && pm1a_cnt && fadt[89] == 2 && pm_tmr && fadt[91] == 4,
          "FADT: SCI_INT 9, PM1a_CNT_BLK (2 bytes), PM_TMR_BLK (4 bytes)", "SCI %u PM1a_CNT 0x%x PM_TMR 0x%x",
          rd16(fadt + 46), pm1a_cnt, pm_tmr);
    u32 t0 = pm_timer_ticks(pm_tmr);
    spin(100000);
    u32 t1 = pm_timer_ticks(pm_tmr);
    CHECK(pm_timer_delta(t0, t1) > 0 && pm_timer_delta(t0, t1) < PM_TIMER_HZ, "the FADT's PM timer counts",
          "%u -> %u", t0, t1);
    int slp_typ = table_ok(dsdt) && sig(dsdt, "DSDT") ? s5_slp_typ(dsdt) : -1;
    CHECK(slp_typ >= 0 && slp_typ < 8, "DSDT checksum valid, \\_S5 gives SLP_TYP", "SLP_TYP %d", slp_typ);

    if (!(inw(pm1a_cnt) & SCI_EN) && smi_cmd) {
        outb(smi_cmd, fadt[52]);  /* ACPI_ENABLE */
        for (int i = 0; i < 1000000 && !(inw(pm1a_cnt) & SCI_EN); i++)
            ;
    }
    CHECK(inw(pm1a_cnt) & SCI_EN, "ACPI mode: PM1a_CNT.SCI_EN is set", "PM1a_CNT 0x%x", inw(pm1a_cnt));
    if (fails || slp_typ < 0)
        tap_done();
    kprintf("# powering off: PM1a_CNT 0x%x <- SLP_TYP %d | SLP_EN\n", pm1a_cnt, slp_typ);
    outw(pm1a_cnt, (u16)(slp_typ << 10) | SLP_EN);
    spin(1000000);
    puts_serial("Bail out! still running after the ACPI power-off\n");
    exit_qemu(1);
}

void kmain(void)
{
    kernel_init();
    tap_plan(12);
    cet_kernel_start(body, 0);
}
