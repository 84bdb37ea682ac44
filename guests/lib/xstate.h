/* xstate.h - XCR0/XSS helpers and the compacted-format size rule [SDM Vol. 1 ch. 13]. */
#ifndef KTEST_XSTATE_H
#define KTEST_XSTATE_H
#include "ktest.h"

static inline void xsetbv(u32 index, u64 v)
{
    __asm__ volatile("xsetbv" ::"c"(index), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

/* Compacted size of `mask`: legacy 512 + header 64, then each component i >= 2 in ascending
 * order, 64-byte aligned first when CPUID.(0xD,i).ECX[1] is set [SDM Vol. 1 ch. 13]. */
static inline u64 xstate_compacted_size(u64 mask)
{
    u64 off = 576;
    for (u32 i = 2; i < 63; i++) {
        if (!(mask & (1ul << i)))
            continue;
        struct cpuid_regs r = cpuid(0xD, i);
        if (r.ecx & 2)
            off = (off + 63) & ~63ul;
        off += r.eax;
    }
    return off;
}

/* Offset of component `n` in a compacted area whose XCOMP_BV is `mask` [SDM Vol. 1 ch. 13]. */
static inline u64 xstate_compacted_offset(u64 mask, u32 n)
{
    u64 off = xstate_compacted_size(mask & ((1ul << n) - 1));
    if (cpuid(0xD, n).ecx & 2)
        off = (off + 63) & ~63ul;
    return off;
}

/* Enable XSAVE (CR4.OSXSAVE) with XCR0 = x87 | SSE. */
static inline void xsave_enable_basic(void)
{
    write_cr4(read_cr4() | CR4_OSXSAVE);
    xsetbv(0, 3);
}
#endif
