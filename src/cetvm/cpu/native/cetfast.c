/*
 * cetfast — CET enforcement at engine speed: a UC_HOOK_BLOCK callback for Unicorn 2.1.4, and
 * (section "Native events" at the end) SYSCALL, SYSRETQ, IRETQ and #PF delivered in the engine.
 *
 * This is a 1:1 re-implementation of the *common* cases of the pure Python block state machine
 * cetvm.cpu.cet.transfer (on_block_start / apply_terminator / check_block_target), which stays
 * the single place where semantics are decided.  Everything rare "hands over" to Python:
 *
 *   - a shadow-stack access whose translation fails or is not a valid shadow-stack page
 *     (Python's walker raises the precise #PF with PfErr.SS), crosses a page, or needs a paging
 *     mode we do not walk natively;
 *   - a RET whose shadow-stack entry differs from the return address (#CP(NEAR_RET));
 *   - an IBT target without the mode's ENDBR while the tracker is WAIT (legacy bitmap or
 *     #CP(ENDBRANCH)).
 *
 * A hand-over commits nothing: SSP and the U_CET/S_CET tracker bits are computed in locals and
 * written only when the whole block start succeeded; the terminator and the block address are
 * recorded in the shared state, RIP is set to the block's offset in CS (the linear address the
 * hook sees minus CS.base), so the block is left before its first instruction, and emulation
 * stops.  Python then runs on_block_start() for exactly that
 * terminator and block, which redoes the push/pop/arm/check from scratch.
 *
 * The shadow stack lives IN GUEST MEMORY only (no private copy): pushes store and pops load the
 * guest's shadow-stack page through a small translation cache (linear page -> host pointer or
 * guest-physical page) that is filled by a native 4-level walk applying the shadow-stack page
 * rule [SDM Vol. 3 §4.6.1; cetvm.cpu.paging.translate] and flushed when Python says so.
 *
 * No global mutable state: everything lives in one cetfast_t per vCPU, passed as user data.
 *
 * Speed (Unicorn 2.1.4, the call-heavy loops of `cetvm bench` and benchmarks/bench_native_cet.py,
 * one block every 2-3 instructions): what bounds the native path is the hook CALL itself, not
 * the CET work. An empty UC_HOOK_BLOCK callback already runs at about 0.70-0.75 x the speed
 * without a hook (Unicorn calls it directly from the translated code: 6 host instructions per
 * block, plus the call and return); the short path below executes about 20 host instructions
 * for a block after a fall-through and 35-40 after a CALL or RET (valgrind --tool=callgrind: 36
 * per block on average on the loop, about 80 before the pending terminator became a pointer
 * and the mode checks per-kind masks). Host instruction counts are identical at ring 0 and
 * ring 3. What the CET work still costs is mostly the kind-dependent branches.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <unicorn/unicorn.h>

#define CETFAST_ABI 20

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Terminator kinds: the values of cetvm.cpu.cet.transfer.Terminator. */
enum {
    T_NONE = 0,
    T_CALL_DIRECT = 1,
    T_CALL_DIRECT_DISP0 = 2,
    T_CALL_INDIRECT = 3,
    T_CALL_INDIRECT_NOTRACK = 4,
    T_JMP_INDIRECT = 5,
    T_JMP_INDIRECT_NOTRACK = 6,
    T_RET = 7,
    T_RET_IMM = 8,
    T_OTHER_EMULATED = 9,
};

/* Hand-over reasons (cetvm.cpu.native.Handover). */
enum {
    H_NONE = 0,
    H_SHADOW_STACK_ACCESS = 1, /* translation failed / not a shadow-stack page / unsupported */
    H_RET_MISMATCH = 2,        /* #CP(NEAR_RET) candidate */
    H_ENDBRANCH = 3,           /* missing ENDBR while WAIT_FOR_ENDBRANCH (bitmap or #CP(3)) */
};

/* IA32_U_CET / IA32_S_CET bits [SDM Vol. 1 §18; cetvm.arch.CetCtl]. */
#define CET_SH_STK_EN (1ull << 0)
#define CET_ENDBR_EN (1ull << 2)
#define CET_NO_TRACK_EN (1ull << 4)
#define CET_SUPPRESS (1ull << 10)
#define CET_TRACKER (1ull << 11)

/* Page-table entry bits [SDM Vol. 3 §4.5]. */
#define PTE_P (1ull << 0)
#define PTE_RW (1ull << 1)
#define PTE_US (1ull << 2)
#define PTE_D (1ull << 6)
#define PTE_PS (1ull << 7)
#define PTE_G (1ull << 8)
#define PTE_ADDR_MASK 0x000FFFFFFFFFF000ull

#define SS_TAG_INVALID 1ull /* bit 0 set: never equals a key of an 8-aligned address */
#define PAGE_SIZE 0x1000ull
#define PAGE_MASK (~(PAGE_SIZE - 1))

/* Paging modes as Python reports them. */
enum { PAGING_OFF = 0, PAGING_4LEVEL = 1, PAGING_OTHER = 2 };

/* ------------------------------------------------------------------ shared with Python */

/* A terminator: the instruction's address and one 32-bit word (kind | insn_len << 8 | imm16 << 16),
 * always stored and loaded with the same widths (no store-forwarding stalls in the hot path). */
typedef struct {
    uint64_t insn_addr;
    uint32_t word;
    uint32_t pad;
} cet_term_t; /* 16 bytes */

#define TERM_KIND(w) ((w) & 0xFFu)
#define TERM_LEN(w) (((w) >> 8) & 0xFFu)
#define TERM_IMM16(w) ((w) >> 16)

/* A classified block. The pending terminator is a pointer to the entry of the block that ran
 * last, so the hook's bookkeeping is one pointer store; ``kbit`` and ``ret`` are what the short
 * path needs of that terminator, precomputed. */
typedef struct __attribute__((aligned(32))) {
    uint64_t addr;
    uint64_t ret;        /* insn_addr + insn_len of the terminator: what a CALL pushes */
    uint16_t size;       /* BLOCK_EMPTY: a free slot */
    uint16_t icount;     /* instructions in the block (what it retires when it runs to its end) */
    uint16_t kbit;       /* 1 << kind of the terminator */
    uint16_t no_endbr64; /* all ones if the block does not start with ENDBR64, else 0 */
    uint16_t imm16;
    uint8_t insn_len;
    uint8_t first_len;   /* bits 3:0 the number of bytes in ``first``; BLOCK_GLOBAL */
    uint8_t first[4];    /* the block's first bytes (ENDBR64 / ENDBR32 checks) */
} cet_block_t; /* 32 bytes: two per cache line */

/* In ``first_len``: the block's code is on global pages (CR4.PGE and PTE.G), so its
 * classification survives a MOV to CR3 as the TLB entries do [SDM Vol. 3 §4.10.4.1]. Global
 * blocks live in the shared table, the others in the local table, cleared on every CR3 load. */
#define BLOCK_GLOBAL 0x80u
#define BLOCK_FIRST_LEN(b) ((b)->first_len & 0x0Fu)

#define BLOCK_EMPTY UINT16_MAX /* a TB is never that large (at most 512 instructions of at most 15 bytes):
                                 never equals a block's size */
#define BLOCK_DEAD (UINT16_MAX - 1) /* an entry moved to the other table (a tombstone: never matches) */
_Static_assert(sizeof(cet_block_t) == 32, "cet_block_t layout");

static inline cet_term_t block_term(const cet_block_t *b)
{
    uint32_t kind = (uint32_t)__builtin_ctz(b->kbit);
    return (cet_term_t){b->ret - b->insn_len, kind | (uint32_t)b->insn_len << 8 | (uint32_t)b->imm16 << 16, 0};
}

/* The Python-visible part; mirrored field by field by cetvm.cpu.native.loader.SharedState.
 * The first cache line holds everything the short path touches (64-byte aligned). Python writes
 * ssp freely; after writing u_cet, s_cet or the mode (cpl, long_mode, cr4_cet, enabled,
 * handover) it calls cetfast_refresh(), which recomputes the per-kind masks from them. */
typedef struct __attribute__((aligned(64))) {
    /* line 0: everything the short path reads or writes (see cetfast_block_hook) */
    uint64_t ssp;
    const cet_block_t *pend; /* native-private: the block whose terminator is pending */
    uint32_t act_kinds;      /* native-private: kinds (bits) with anything to do: slow|arm|push|pop */
    uint32_t arm_kinds;      /* native-private: kinds that arm the IBT tracker now */
    uint32_t push_kinds;     /* native-private: kinds that push on the shadow stack now */
    uint32_t pop_kinds;      /* native-private: kinds that pop and compare now */
    uint64_t ss_tag;         /* native-private: linear page of the cached shadow-stack page */
    uint64_t ss_delta;       /* native-private: its host address minus ss_tag */
    int64_t budget_left;     /* instructions the run may still retire (see "Exact instruction budget") */
    uint64_t budget_stop;    /* size of the block the budget stopped in front of, 0 if none */
    /* line 1: the CET controls and the mode, then what the general path and Python use */
    uint64_t u_cet;
    uint64_t s_cet;
    uint8_t cpl;
    uint8_t long_mode;
    uint8_t cr4_cet;
    uint8_t enabled;
    uint32_t handover;
    cet_block_t *table;  /* native-private: the global blocks (BLOCK_GLOBAL) */
    uint64_t table_mask; /* native-private */
    uint64_t cr3;
    uint32_t paging;
    uint32_t cs_base; /* CS.base: RIP = a block's linear address - cs_base (real mode: not 0) */
    uint64_t abi;
    cet_term_t handover_term;
    uint64_t handover_addr;
    /* statistics */
    uint64_t misses;
    uint64_t handovers;
    uint64_t tlb_fills;
    uint64_t slow_mem;
    uint64_t callback_errors;
} cet_shared_t; /* sizeof = 3 cache lines exactly */
_Static_assert(sizeof(cet_shared_t) == 192, "cet_shared_t layout");
_Static_assert(offsetof(cet_shared_t, budget_stop) + 8 == 64, "the short path's state fits one cache line");

/* ------------------------------------------------------------------ private */

typedef uc_err (*reg_rw_fn)(uc_engine *, int, void *);
typedef uc_err (*mem_read_fn)(uc_engine *, uint64_t, void *, uint64_t);
typedef uc_err (*mem_write_fn)(uc_engine *, uint64_t, const void *, uint64_t);
typedef uc_err (*emu_stop_fn)(uc_engine *);
typedef int (*classify_fn)(uint64_t addr, uint32_t size);
typedef uc_err (*vmem_read_fn)(uc_engine *, uint64_t, uc_prot, void *, size_t);

/* A filter of the linear pages holding stored blocks (bits set, never cleared but all at once):
 * INVLPG of a page without blocks — most of them — skips the table rebuild. */
#define PAGE_FILTER_BITS (1u << 16)
#define TLB_ENTRIES 64
#define FRONT_ENTRIES 2048
#define MAX_RAM 32

/* The linear pages holding a table's blocks: a bit per hashed page and the bounds of every
 * block stored since the last clear (see page_filter_add). */
typedef struct {
    uint64_t bits[PAGE_FILTER_BITS / 64];
    uint64_t lo, hi; /* every block lies in [lo, hi); lo >= hi: none */
} page_filter_t;

typedef struct {
    uint64_t tag;   /* linear page | user bit (bit 0) */
    uint64_t gen;   /* valid iff == tlb_gen */
    uint64_t cr3;
    uint8_t *host;  /* host address of the page, or NULL: use uc_mem_read/write on phys */
    uint64_t phys;  /* guest-physical page */
} tlb_entry_t;

typedef struct {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
} ram_range_t;

typedef struct {
    cet_shared_t s; /* must stay first: Python maps SharedState at the object's address */
    reg_rw_fn reg_write;
    mem_read_fn mem_read;
    mem_write_fn mem_write;
    emu_stop_fn emu_stop;
    classify_fn classify;
    uint64_t table_count;
    reg_rw_fn reg_read;
    vmem_read_fn vmem_read;
    uint64_t serialized;         /* SERIALIZEs retired by the hook */
    cet_block_t *local;  /* the blocks on non-global pages (forgotten at every CR3 load) */
    uint64_t local_mask;
    uint64_t local_count;
    uint64_t tlb_gen;
    uint8_t ss_user;    /* the user-ness ss_tag was filled for */
    cet_block_t held;   /* the pending block's entry when its front-cache slot was reused */
    cet_block_t set_by_python; /* the pending terminator written by Python (cetfast_set_pending) */
    cet_block_t front[FRONT_ENTRIES];
    page_filter_t global_pages; /* pages with global blocks (see page_filter_add) */
    page_filter_t local_pages;  /* pages with local blocks */
    uint64_t *fetched; /* TLB-fill mode: bitmap of pages fetched from (NULL: not in use) */
    uint64_t code_pages; /* split TLB: physical pages that became code (each flushed the TLB once) */
    tlb_entry_t tlb[TLB_ENTRIES];
    ram_range_t ram[MAX_RAM];
    uint32_t ram_count;
    /* interrupt-window watch (see "Interrupt window"): the engine's CPUX86State while an
     * interrupt waits for RFLAGS.IF / the end of an interrupt shadow, else NULL */
    const uint8_t *irq_env;
    uint32_t irq_window_stopped; /* the watch stopped the engine in front of a block */
    uint32_t stop_at_block; /* a single step: stop in front of this block start from now (1 = the next) */
    /* plain blocks (see "plain blocks"): the engine's CPUX86State, on/off, statistics */
    const uint8_t *env;
    uint32_t plain_classify;
    uint64_t plain;
    uint64_t not_plain;
} cetfast_t;

/* ------------------------------------------------------------------ lifecycle / API */

/* budget_left of a run without a budget: never reached (2^62 instructions). */
#define BUDGET_UNLIMITED (INT64_C(1) << 62)

static void front_clear(cetfast_t *f);
static void page_filter_clear(page_filter_t *filter);
static void cetfast_unsplit_tlb(cetfast_t *f);
static void refresh_fast(cetfast_t *f);
static void table_clear(cet_block_t *table, uint64_t entries);

/* The entry a pending "no terminator" points at (kind T_NONE; ``addr`` is the block start). */
static void pending_none(cetfast_t *f, uint64_t block_addr)
{
    cet_block_t *n = &f->set_by_python;
    memset(n, 0, sizeof(*n));
    n->addr = block_addr;
    n->kbit = 1u << T_NONE;
    n->size = BLOCK_EMPTY;
    f->s.pend = n;
}

uint64_t cetfast_abi(void) { return CETFAST_ABI; }
uint64_t cetfast_shared_size(void) { return sizeof(cet_shared_t); }
uint64_t cetfast_block_size(void) { return sizeof(cet_block_t); }

void *cetfast_new(void *reg_read, void *reg_write, void *mem_read, void *mem_write, void *emu_stop, void *classify)
{
    cetfast_t *f = aligned_alloc(64, sizeof(*f));
    if (!f)
        return NULL;
    memset(f, 0, sizeof(*f));
    f->s.table = aligned_alloc(64, 1024 * sizeof(cet_block_t));
    if (!f->s.table) {
        free(f);
        return NULL;
    }
    table_clear(f->s.table, 1024);
    f->s.table_mask = 1023;
    f->local = aligned_alloc(64, 1024 * sizeof(cet_block_t));
    if (!f->local) {
        free(f->s.table);
        free(f);
        return NULL;
    }
    table_clear(f->local, 1024);
    f->local_mask = 1023;
    front_clear(f);
    page_filter_clear(&f->global_pages);
    page_filter_clear(&f->local_pages);
    pending_none(f, 0);
    f->s.abi = CETFAST_ABI;
    f->s.budget_left = BUDGET_UNLIMITED;
    f->s.enabled = 1;
    f->tlb_gen = 1;
    f->s.ss_tag = SS_TAG_INVALID;
    f->reg_read = (reg_rw_fn)reg_read;
    f->reg_write = (reg_rw_fn)reg_write;
    f->mem_read = (mem_read_fn)mem_read;
    f->mem_write = (mem_write_fn)mem_write;
    f->emu_stop = (emu_stop_fn)emu_stop;
    f->classify = (classify_fn)classify;
    refresh_fast(f);
    return f;
}

void cetfast_free(void *p)
{
    cetfast_t *f = p;
    if (!f)
        return;
    cetfast_unsplit_tlb(f);
    free(f->s.table);
    free(f->local);
    free(f->fetched);
    free(f);
}

/* Forget every cached translation (CR3 write, INVLPG, page-table-affecting emulation, mode). */
void cetfast_flush_tlb(void *p)
{
    cetfast_t *f = p;
    f->tlb_gen++;
    f->s.ss_tag = SS_TAG_INVALID;
}

/* Register guest-physical RAM [gpa, gpa+size) backed by host memory (uc_mem_map_ptr). */
int cetfast_add_ram(void *p, uint64_t gpa, uint64_t size, void *host)
{
    cetfast_t *f = p;
    if (f->ram_count >= MAX_RAM)
        return -1;
    f->ram[f->ram_count++] = (ram_range_t){gpa, size, host};
    cetfast_flush_tlb(f);
    return 0;
}

void cetfast_clear_ram(void *p)
{
    cetfast_t *f = p;
    f->ram_count = 0;
    cetfast_flush_tlb(f);
}

/* ------------------------------------------------------------------ the short path's masks */

#define ALL_KINDS 0xFFFFu
#define PUSH_KINDS ((1u << T_CALL_DIRECT) | (1u << T_CALL_INDIRECT) | (1u << T_CALL_INDIRECT_NOTRACK))
#define POP_KINDS ((1u << T_RET) | (1u << T_RET_IMM))
#define PUSH_OR_POP_KINDS (PUSH_KINDS | POP_KINDS)
#define ARM_KINDS ((1u << T_CALL_INDIRECT) | (1u << T_JMP_INDIRECT))
#define ARM_NOTRACK_KINDS ((1u << T_CALL_INDIRECT_NOTRACK) | (1u << T_JMP_INDIRECT_NOTRACK))

/*
 * Precompute, from the mode and the current CPL's CET control, which terminator kinds the short
 * path may apply and how [cetvm.cpu.cet.transfer.apply_terminator / check_block_target]:
 *
 *   - hook disabled or a hand-over pending: every kind takes the general path (which returns);
 *   - CET off for this CPL (CR4.CET clear, or neither SH_STK_EN nor ENDBR_EN): nothing to apply;
 *   - not 64-bit mode, or the tracker WAIT_FOR_ENDBRANCH, or SUPPRESS set: every kind takes the
 *     general path (4-byte shadow-stack entries; the ENDBR check may change the CET control);
 *   - otherwise, with the tracker IDLE and SUPPRESS clear, ibt_check_target cannot change the
 *     CET control, so only the shadow stack moves: SH_STK_EN gives push (near CALL except
 *     displacement 0) and pop (RET) kinds; ENDBR_EN gives the kinds that arm the tracker
 *     [ibt_arm_on_indirect: indirect CALL/JMP, NOTRACK ones unless NO_TRACK_EN], which the short
 *     path accepts only into a block starting with ENDBR64 (arm then clear: no net change).
 *
 * Called whenever an input changes: by the general path after every block start it handled and
 * on a hand-over, and by Python (cetfast_refresh) after it wrote the mode or U_CET/S_CET.
 * A change of CPL privilege (user vs supervisor) also drops the cached shadow-stack page, whose
 * translation was checked for the other privilege.
 */
static void refresh_fast(cetfast_t *f)
{
    cet_shared_t *s = &f->s;
    uint8_t user = s->cpl == 3;
    uint64_t ctl = user ? s->u_cet : s->s_cet;
    uint32_t slow = 0, arm = 0, push = 0, pop = 0;
    if (user != f->ss_user) {
        f->ss_user = user;
        s->ss_tag = SS_TAG_INVALID;
    }
    if (!s->enabled || s->handover || f->irq_env) {
        slow = ALL_KINDS;
    } else if (!s->cr4_cet || !(ctl & (CET_SH_STK_EN | CET_ENDBR_EN))) {
        /* CET off for this CPL: the hook only records the terminator */
    } else if (!s->long_mode || (ctl & (CET_TRACKER | CET_SUPPRESS))) {
        slow = ALL_KINDS;
    } else {
        if (ctl & CET_SH_STK_EN) {
            push = PUSH_KINDS;
            pop = POP_KINDS;
        }
        if (ctl & CET_ENDBR_EN)
            arm = ARM_KINDS | ((ctl & CET_NO_TRACK_EN) ? 0 : ARM_NOTRACK_KINDS);
    }
    s->act_kinds = slow | arm | push | pop;
    s->arm_kinds = arm;
    s->push_kinds = push;
    s->pop_kinds = pop;
}

/* Python changed the mode (cpl, long_mode, cr4_cet, enabled), U_CET/S_CET or the hand-over. */
void cetfast_refresh(void *p) { refresh_fast(p); }

/* ------------------------------------------------------------------ block table */

static inline uint64_t block_hash(uint64_t addr) { return (addr * 0x9E3779B97F4A7C15ull) >> 20; }

static void table_clear(cet_block_t *table, uint64_t entries)
{
    memset(table, 0, entries * sizeof(cet_block_t));
    for (uint64_t i = 0; i < entries; i++)
        table[i].size = BLOCK_EMPTY;
}

static inline cet_block_t *table_find(cet_block_t *table, uint64_t mask, uint64_t addr, uint32_t size)
{
    uint64_t i = block_hash(addr) & mask;
    for (;;) {
        cet_block_t *b = &table[i];
        if (b->size == BLOCK_EMPTY)
            return NULL;
        if (b->addr == addr)
            return b->size == size ? b : NULL;
        i = (i + 1) & mask;
    }
}

/* The entry for ``addr`` whatever its size, or NULL. */
static cet_block_t *table_find_addr(cet_block_t *table, uint64_t mask, uint64_t addr)
{
    for (uint64_t i = block_hash(addr) & mask; table[i].size != BLOCK_EMPTY; i = (i + 1) & mask)
        if (table[i].addr == addr)
            return &table[i];
    return NULL;
}

static inline cet_block_t *block_find_table(cetfast_t *f, uint64_t addr, uint32_t size)
{
    cet_block_t *b = table_find(f->s.table, f->s.table_mask, addr, size);
    return b ? b : table_find(f->local, f->local_mask, addr, size);
}

static cet_block_t *block_slot(cet_block_t *table, uint64_t mask, uint64_t addr)
{
    uint64_t i = block_hash(addr) & mask;
    while (table[i].size != BLOCK_EMPTY && table[i].addr != addr)
        i = (i + 1) & mask;
    return &table[i];
}

/* Rebuild *table with the entries ``keep`` accepts, at mask ``new_mask`` (open addressing has
 * no deletion); the number kept in *count. -1: out of memory (nothing changed). */
typedef int (*keep_fn)(const cet_block_t *b, uint64_t lo, uint64_t hi);

static int table_rebuild(cet_block_t **table, uint64_t *mask, uint64_t *count, uint64_t new_mask, keep_fn keep,
                         uint64_t lo, uint64_t hi)
{
    cet_block_t *t = aligned_alloc(64, (new_mask + 1) * sizeof(cet_block_t));
    if (!t)
        return -1;
    table_clear(t, new_mask + 1);
    uint64_t kept = 0;
    for (uint64_t i = 0; i <= *mask; i++) {
        const cet_block_t *b = &(*table)[i];
        if (b->size < BLOCK_DEAD && (!keep || keep(b, lo, hi))) {
            *block_slot(t, new_mask, b->addr) = *b;
            kept++;
        }
    }
    free(*table);
    *table = t;
    *mask = new_mask;
    *count = kept;
    return 0;
}

/* Turn the entries ``keep`` rejects into tombstones, in place (they keep their slots, and so
 * their share of *count, until the table next grows). */
static void table_bury(cet_block_t *table, uint64_t mask, keep_fn keep, uint64_t lo, uint64_t hi)
{
    for (uint64_t i = 0; i <= mask; i++)
        if (table[i].size < BLOCK_DEAD && !keep(&table[i], lo, hi))
            table[i].size = BLOCK_DEAD;
}

static int keep_global(const cet_block_t *b, uint64_t lo, uint64_t hi)
{
    (void)lo, (void)hi;
    return (b->first_len & BLOCK_GLOBAL) != 0;
}

static int keep_outside(const cet_block_t *b, uint64_t lo, uint64_t hi)
{
    return b->addr + b->size <= lo || b->addr >= hi;
}

/* The front cache: direct-mapped, inside the state (no pointer to chase), backed by the table.
 * An empty entry has size BLOCK_EMPTY, which never equals a block's size. */
static inline uint64_t front_index(uint64_t addr) { return (addr ^ (addr >> 8)) & (FRONT_ENTRIES - 1); }

/* Before a front-cache slot is overwritten: if the pending terminator points at it, move the
 * pending entry to ``held`` (the pending terminator is the block that ran last, not a cache). */
static inline void front_release(cetfast_t *f, const cet_block_t *slot)
{
    if (UNLIKELY(f->s.pend == slot)) {
        f->held = *slot;
        f->s.pend = &f->held;
    }
}

static void front_clear(cetfast_t *f)
{
    for (unsigned i = 0; i < FRONT_ENTRIES; i++) {
        front_release(f, &f->front[i]);
        memset(&f->front[i], 0, sizeof(f->front[i]));
        f->front[i].size = BLOCK_EMPTY;
    }
}

static inline void front_put(cetfast_t *f, const cet_block_t *b)
{
    cet_block_t *slot = &f->front[front_index(b->addr)];
    front_release(f, slot);
    *slot = *b;
}

/* The front-cache entry for (addr, size), filled from the table on a front miss; NULL if the
 * block is not classified. */
static inline cet_block_t *block_find(cetfast_t *f, uint64_t addr, uint32_t size)
{
    cet_block_t *e = &f->front[front_index(addr)];
    if (LIKELY(e->addr == addr && e->size == size))
        return e;
    cet_block_t *b = block_find_table(f, addr, size);
    if (!b)
        return NULL;
    front_put(f, b);
    return e;
}

static const uint8_t ENDBR64_BYTES[4] = {0xF3, 0x0F, 0x1E, 0xFA};
static const uint8_t ENDBR32_BYTES[4] = {0xF3, 0x0F, 0x1E, 0xFB};

static inline int block_starts_with(const cet_block_t *b, const uint8_t bytes[4])
{
    return BLOCK_FIRST_LEN(b) >= 4 && memcmp(b->first, bytes, 4) == 0;
}

static void block_set_term(cet_block_t *b, uint32_t kind, uint64_t insn_addr, uint32_t insn_len, uint32_t imm16)
{
    b->kbit = (uint16_t)(1u << (kind & 15));
    b->insn_len = (uint8_t)insn_len;
    b->imm16 = (uint16_t)imm16;
    b->ret = insn_addr + (insn_len & 0xFFu);
}

static inline uint64_t page_filter_bit(uint64_t page) { return (page ^ (page >> 16)) & (PAGE_FILTER_BITS - 1); }

static void page_filter_clear(page_filter_t *filter)
{
    memset(filter->bits, 0, sizeof(filter->bits));
    filter->lo = UINT64_MAX;
    filter->hi = 0;
}

static void page_filter_add(page_filter_t *filter, uint64_t addr, uint64_t size)
{
    uint64_t end = addr + (size ? size : 1);
    for (uint64_t page = addr >> 12; page <= (end - 1) >> 12; page++)
        filter->bits[page_filter_bit(page) >> 6] |= 1ull << (page_filter_bit(page) & 63);
    filter->lo = addr < filter->lo ? addr : filter->lo;
    filter->hi = end > filter->hi ? end : filter->hi;
}

/* May a block overlap linear [lo, hi)? Outside the stored blocks' bounds: no (an INVLPG of an
 * unmapped user address forgets a 1 GiB region, and the kernel's blocks lie elsewhere); a wide
 * range inside them: assume so. */
static int page_filter_may_hold(const page_filter_t *filter, uint64_t lo, uint64_t hi)
{
    if (hi <= lo || hi <= filter->lo || lo >= filter->hi)
        return 0;
    if (((hi - 1) >> 12) - (lo >> 12) >= 64)
        return 1;
    for (uint64_t page = lo >> 12; page <= (hi - 1) >> 12; page++)
        if (filter->bits[page_filter_bit(page) >> 6] & (1ull << (page_filter_bit(page) & 63)))
            return 1;
    return 0;
}

/* Store a classified block (replaces an older entry for the same address); ``global``: its code
 * is on global pages (BLOCK_GLOBAL). */
int cetfast_store(void *p, uint64_t addr, uint32_t size, uint32_t icount, uint32_t kind, uint64_t insn_addr,
                  uint32_t insn_len, uint32_t imm16, const uint8_t *first, uint32_t first_len, uint32_t global)
{
    cetfast_t *f = p;
    if (size >= BLOCK_EMPTY || icount > 0xFFFF || kind > T_OTHER_EMULATED || insn_len > 0xFF || imm16 > 0xFFFF)
        return -2;
    cet_block_t **table = global ? &f->s.table : &f->local;
    uint64_t *mask = global ? &f->s.table_mask : &f->local_mask;
    uint64_t *count = global ? &f->table_count : &f->local_count;
    if ((*count + 1) * 2 > *mask + 1 && table_rebuild(table, mask, count, *mask * 2 + 1, NULL, 0, 0) < 0)
        return -1;
    /* the other table must not keep an entry for the address (lookups try the global one first) */
    cet_block_t *other = global ? table_find_addr(f->local, f->local_mask, addr)
                                : table_find_addr(f->s.table, f->s.table_mask, addr);
    if (other)
        other->size = BLOCK_DEAD;
    page_filter_add(global ? &f->global_pages : &f->local_pages, addr, size);
    cet_block_t *b = block_slot(*table, *mask, addr);
    if (b->size == BLOCK_EMPTY)
        (*count)++;
    memset(b, 0, sizeof(*b));
    b->addr = addr;
    b->size = (uint16_t)size;
    b->icount = (uint16_t)icount;
    uint8_t n = first_len > sizeof(b->first) ? sizeof(b->first) : (uint8_t)first_len;
    memcpy(b->first, first, n);
    b->first_len = n | (global ? BLOCK_GLOBAL : 0);
    b->no_endbr64 = block_starts_with(b, ENDBR64_BYTES) ? 0 : 0xFFFFu;
    block_set_term(b, kind, insn_addr, insn_len, imm16);
    front_put(f, b);
    return 0;
}

/* Copy the entry for (addr, size) to *out; 1 if found. */
int cetfast_lookup(void *p, uint64_t addr, uint32_t size, cet_block_t *out)
{
    cet_block_t *b = block_find(p, addr, size);
    if (!b)
        return 0;
    *out = *b;
    return 1;
}

uint64_t cetfast_block_count(void *p)
{
    cetfast_t *f = p;
    return f->table_count + f->local_count;
}

void cetfast_invalidate_blocks(void *p)
{
    cetfast_t *f = p;
    table_clear(f->s.table, f->s.table_mask + 1);
    table_clear(f->local, f->local_mask + 1);
    front_clear(f);
    f->table_count = f->local_count = 0;
    page_filter_clear(&f->global_pages);
    page_filter_clear(&f->local_pages);
}

/* Forget the front-cache entries ``keep`` rejects. */
static void front_retain(cetfast_t *f, keep_fn keep, uint64_t lo, uint64_t hi)
{
    for (unsigned i = 0; i < FRONT_ENTRIES; i++) {
        cet_block_t *e = &f->front[i];
        if (e->size == BLOCK_EMPTY || keep(e, lo, hi))
            continue;
        front_release(f, e);
        memset(e, 0, sizeof(*e));
        e->size = BLOCK_EMPTY;
    }
}

#define LOCAL_TABLE_MIN 1024

/* MOV to CR3: forget the blocks on non-global pages (cetvm.cpu.blocks.BlockTracker.invalidate_local). */
void cetfast_invalidate_local_blocks(void *p)
{
    cetfast_t *f = p;
    int fresh = 0;
    if (f->local_mask > LOCAL_TABLE_MIN - 1) {
        /* back to the small table: a CR3 load clears it, and user space has few hot blocks */
        cet_block_t *t = aligned_alloc(64, LOCAL_TABLE_MIN * sizeof(cet_block_t));
        if (t) {
            free(f->local);
            f->local = t;
            f->local_mask = LOCAL_TABLE_MIN - 1;
            fresh = 1;
        }
    }
    if (f->local_count || fresh)
        table_clear(f->local, f->local_mask + 1);
    f->local_count = 0;
    page_filter_clear(&f->local_pages);
    front_retain(f, keep_global, 0, 0);
}

/* INVLPG / INVPCID of an address: forget the blocks overlapping linear [lo, hi) (0). */
int cetfast_invalidate_block_range(void *p, uint64_t lo, uint64_t hi)
{
    cetfast_t *f = p;
    if (page_filter_may_hold(&f->global_pages, lo, hi))
        table_bury(f->s.table, f->s.table_mask, keep_outside, lo, hi);
    if (page_filter_may_hold(&f->local_pages, lo, hi))
        table_bury(f->local, f->local_mask, keep_outside, lo, hi);
    front_retain(f, keep_outside, lo, hi);
    return 0;
}

/* The pending terminator (the block that ran last): *out and the start address of its block. */
uint64_t cetfast_get_pending(void *p, cet_term_t *out)
{
    cetfast_t *f = p;
    *out = block_term(f->s.pend);
    return f->s.pend->addr;
}

/* Python sets the pending terminator (kind T_NONE: none) and the start address of its block. */
void cetfast_set_pending(void *p, uint32_t kind, uint64_t insn_addr, uint32_t insn_len, uint32_t imm16,
                         uint64_t block_addr)
{
    cetfast_t *f = p;
    if (kind > T_OTHER_EMULATED)
        kind = T_NONE;
    pending_none(f, block_addr);
    if (kind != T_NONE)
        block_set_term(&f->set_by_python, kind, insn_addr, insn_len, imm16);
}

/* ------------------------------------------------------------------ guest memory */

static inline uint8_t *phys_host(cetfast_t *f, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < f->ram_count; i++) {
        ram_range_t *r = &f->ram[i];
        if (gpa >= r->gpa && gpa - r->gpa + len <= r->size)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static inline int is_canonical48(uint64_t lin)
{
    int64_t s = (int64_t)(lin << 16) >> 16;
    return (uint64_t)s == lin;
}

/*
 * Shadow-stack translation of ``lin`` [SDM Vol. 3 §4.6.1; cetvm.cpu.paging.translate with
 * Access.SHADOW_STACK]: every level present; the leaf R/W=0 and D=1 with R/W=1 at every upper
 * level; a user access needs U/S=1 at every level, a supervisor access needs U/S=0 somewhere.
 * Returns 0 and fills the TLB entry, or -1 (hand over: Python raises the precise fault).
 */
/* What the 4-level walk of a linear address found (walk4). */
typedef struct {
    uint64_t leaf;      /* the leaf entry (PTE, or a PDE / PDPTE with PS) */
    uint64_t phys_page; /* the guest-physical 4 KiB page of the address */
    int user_all;       /* U/S = 1 at every level, the leaf's included */
    int writable_upper; /* R/W = 1 at every level above the leaf */
} walk4_t;

/* The 4-level walk of ``lin`` (CR3 of the shared state) without permission checks [SDM Vol. 3
 * §4.5]: 0 and *w, or -1 (not canonical, a level not present, an entry that does not read). */
static int walk4(cetfast_t *f, uc_engine *uc, uint64_t lin, walk4_t *w)
{
    static const int shifts[4] = {39, 30, 21, 12};
    uint64_t table = f->s.cr3 & PTE_ADDR_MASK, entry = 0;
    int writable_upper = 1, user_all = 1, page_shift = 12;
    if (!is_canonical48(lin))
        return -1;
    for (int level = 0; level < 4; level++) {
        uint64_t gpa = table + ((lin >> shifts[level]) & 0x1FF) * 8;
        uint8_t *h = phys_host(f, gpa, 8);
        if (h) {
            memcpy(&entry, h, 8);
        } else {
            f->s.slow_mem++;
            if (f->mem_read(uc, gpa, &entry, 8) != UC_ERR_OK)
                return -1;
        }
        if (!(entry & PTE_P))
            return -1;
        user_all = user_all && (entry & PTE_US);
        if (shifts[level] == 12 || ((level == 1 || level == 2) && (entry & PTE_PS))) {
            page_shift = shifts[level];
            break;
        }
        writable_upper = writable_upper && (entry & PTE_RW);
        table = entry & PTE_ADDR_MASK;
    }
    uint64_t frame_mask = ((1ull << 52) - 1) & ~((1ull << page_shift) - 1);
    w->leaf = entry;
    w->phys_page = ((entry & frame_mask) | (lin & ((1ull << page_shift) - 1))) & PAGE_MASK;
    w->user_all = user_all;
    w->writable_upper = writable_upper;
    return 0;
}

__attribute__((noinline)) static int ss_walk(cetfast_t *f, uc_engine *uc, uint64_t lin, int user, tlb_entry_t *e)
{
    uint64_t phys_page;
    if (f->s.paging == PAGING_OFF) {
        phys_page = lin & PAGE_MASK;
    } else if (f->s.paging == PAGING_4LEVEL) {
        walk4_t w;
        if (walk4(f, uc, lin, &w) < 0)
            return -1;
        if (user && !w.user_all)
            return -1;
        if (!w.writable_upper || (w.leaf & PTE_RW) || !(w.leaf & PTE_D))
            return -1;
        if (w.user_all && !user)
            return -1;
        phys_page = w.phys_page;
    } else {
        return -1;
    }
    e->tag = (lin & PAGE_MASK) | (uint64_t)user;
    e->gen = f->tlb_gen;
    e->cr3 = f->s.cr3;
    e->phys = phys_page;
    e->host = phys_host(f, phys_page, PAGE_SIZE);
    f->s.tlb_fills++;
    return 0;
}

static inline tlb_entry_t *ss_translate(cetfast_t *f, uc_engine *uc, uint64_t lin, int user)
{
    tlb_entry_t *e = &f->tlb[(lin >> 12) & (TLB_ENTRIES - 1)];
    uint64_t tag = (lin & PAGE_MASK) | (uint64_t)user;
    if (e->tag == tag && e->gen == f->tlb_gen && e->cr3 == f->s.cr3)
        return e;
    return ss_walk(f, uc, lin, user, e) == 0 ? e : NULL;
}

/* Shadow-stack store of ``width`` bytes; 0 or -1 (hand over). Never crosses a page. */
static inline int ss_store(cetfast_t *f, uc_engine *uc, uint64_t lin, uint64_t value, unsigned width, int user)
{
    if ((lin & (PAGE_SIZE - 1)) > PAGE_SIZE - width)
        return -1;
    tlb_entry_t *e = ss_translate(f, uc, lin, user);
    if (!e)
        return -1;
    if (e->host) {
        memcpy(e->host + (lin & (PAGE_SIZE - 1)), &value, width);
        return 0;
    }
    f->s.slow_mem++;
    return f->mem_write(uc, e->phys | (lin & (PAGE_SIZE - 1)), &value, width) == UC_ERR_OK ? 0 : -1;
}

static inline int ss_load(cetfast_t *f, uc_engine *uc, uint64_t lin, uint64_t *value, unsigned width, int user)
{
    if ((lin & (PAGE_SIZE - 1)) > PAGE_SIZE - width)
        return -1;
    tlb_entry_t *e = ss_translate(f, uc, lin, user);
    if (!e)
        return -1;
    *value = 0;
    if (e->host) {
        memcpy(value, e->host + (lin & (PAGE_SIZE - 1)), width);
        return 0;
    }
    f->s.slow_mem++;
    return f->mem_read(uc, e->phys | (lin & (PAGE_SIZE - 1)), value, width) == UC_ERR_OK ? 0 : -1;
}

/* ------------------------------------------------------------------ the block hook */

__attribute__((noinline, cold)) static void hand_over(cetfast_t *f, uc_engine *uc, const cet_term_t *prev, uint64_t addr, uint32_t reason)
{
    f->s.handover = reason;
    f->s.handover_term = *prev;
    f->s.handover_addr = addr;
    pending_none(f, addr);
    refresh_fast(f); /* every block start takes the general path until Python took the hand-over */
    f->s.handovers++;
    uint64_t rip = addr - f->s.cs_base;
    f->reg_write(uc, UC_X86_REG_RIP, &rip); /* leave the block before its first instruction */
    f->emu_stop(uc);
}

/* Host address of the 8 bytes at shadow-stack address ``lin`` if directly accessible (fast path). */
static inline uint64_t *ss_slot(cetfast_t *f, uc_engine *uc, uint64_t lin, int user)
{
    uint64_t key = lin & (PAGE_MASK | 7);
    if (LIKELY(key == f->s.ss_tag && user == f->ss_user))
        return (uint64_t *)(uintptr_t)(lin + f->s.ss_delta);
    if (lin & 7)
        return NULL; /* unaligned 8-byte entry: slow path (may cross a page) */
    tlb_entry_t *e = ss_translate(f, uc, lin, user);
    if (!e || !e->host)
        return NULL;
    f->s.ss_tag = key;
    f->ss_user = (uint8_t)user;
    f->s.ss_delta = (uint64_t)(uintptr_t)e->host - key;
    return (uint64_t *)(e->host + (lin & (PAGE_SIZE - 8)));
}

/* Near CALL/RET outside 64-bit mode: 4-byte entries (compatibility / protected mode). */
static int ss_near_compat(cetfast_t *f, uc_engine *uc, const cet_term_t *prev, uint64_t addr, uint64_t *ssp,
                          int user)
{
    if ((1u << TERM_KIND(prev->word)) & PUSH_KINDS) {
        if (ss_store(f, uc, *ssp - 4, (prev->insn_addr + TERM_LEN(prev->word)) & 0xFFFFFFFFull, 4, user) < 0) {
            hand_over(f, uc, prev, addr, H_SHADOW_STACK_ACCESS);
            return -1;
        }
        *ssp -= 4;
        return 0;
    }
    uint64_t shadow_ret;
    if (ss_load(f, uc, *ssp, &shadow_ret, 4, user) < 0) {
        hand_over(f, uc, prev, addr, H_SHADOW_STACK_ACCESS);
        return -1;
    }
    if (shadow_ret != (addr & 0xFFFFFFFFull)) {
        hand_over(f, uc, prev, addr, H_RET_MISMATCH);
        return -1;
    }
    *ssp += 4;
    return 0;
}

/*
 * The general (branchy) block start: apply_terminator then check_block_target for ``prev`` and
 * block ``b`` at ``addr``; hands over to Python whenever it cannot decide. Commits SSP and the
 * CET control only when the whole block start succeeded.
 */
__attribute__((noinline)) static void block_start_general(cetfast_t *f, uc_engine *uc, const cet_block_t *b,
                                                          cet_term_t prev, uint64_t addr)
{
    cet_shared_t *s = &f->s;
    int user = s->cpl == 3;
    uint64_t ctl = user ? s->u_cet : s->s_cet;
    if (!s->cr4_cet || !(ctl & (CET_SH_STK_EN | CET_ENDBR_EN)))
        return;

    /* apply_terminator: shadow stack (kinds 1..8 touch it; DISP0 and JMPs do not) */
    uint64_t ssp = s->ssp;
    unsigned kind = TERM_KIND(prev.word);
    if ((ctl & CET_SH_STK_EN) && ((1u << kind) & PUSH_OR_POP_KINDS)) {
        if (s->long_mode) {
            if ((1u << kind) & PUSH_KINDS) {
                uint64_t *slot = ss_slot(f, uc, ssp - 8, user);
                if (UNLIKELY(!slot)) {
                    if (ss_store(f, uc, ssp - 8, prev.insn_addr + TERM_LEN(prev.word), 8, user) < 0) {
                        hand_over(f, uc, &prev, addr, H_SHADOW_STACK_ACCESS);
                        return;
                    }
                } else {
                    *slot = prev.insn_addr + TERM_LEN(prev.word);
                }
                ssp -= 8;
            } else {
                uint64_t shadow_ret;
                uint64_t *slot = ss_slot(f, uc, ssp, user);
                if (LIKELY(slot != NULL)) {
                    shadow_ret = *slot;
                } else if (ss_load(f, uc, ssp, &shadow_ret, 8, user) < 0) {
                    hand_over(f, uc, &prev, addr, H_SHADOW_STACK_ACCESS);
                    return;
                }
                if (UNLIKELY(shadow_ret != addr)) {
                    hand_over(f, uc, &prev, addr, H_RET_MISMATCH);
                    return;
                }
                ssp += 8;
            }
        } else if (ss_near_compat(f, uc, &prev, addr, &ssp, user) < 0) {
            return;
        }
    }

    /* apply_terminator: IBT arming [ibt_arm_on_indirect] */
    if ((ctl & (CET_ENDBR_EN | CET_SUPPRESS)) == CET_ENDBR_EN) {
        if ((1u << kind) & ARM_KINDS)
            ctl |= CET_TRACKER;
        else if (((1u << kind) & ARM_NOTRACK_KINDS) && !(ctl & CET_NO_TRACK_EN))
            ctl |= CET_TRACKER;
    }

    /* check_block_target [ibt_check_target] */
    if (ctl & CET_ENDBR_EN) {
        if (block_starts_with(b, s->long_mode ? ENDBR64_BYTES : ENDBR32_BYTES)) {
            ctl &= ~(CET_TRACKER | CET_SUPPRESS);
        } else if (UNLIKELY(ctl & CET_TRACKER)) {
            hand_over(f, uc, &prev, addr, H_ENDBRANCH);
            return;
        }
    }

    /* commit */
    s->ssp = ssp;
    if (user)
        s->u_cet = ctl;
    else
        s->s_cet = ctl;
}

/*
 * Exact instruction budget at block granularity [cetvm.cpu.budget]. The hook retires a block's
 * instructions (``icount``, known from its classification) when the block starts, from
 * ``budget_left``; a block with more instructions than the budget has left does not run: the
 * hook completes its block start (the previous terminator is applied and the block's target
 * checked, so the CET state is whole wherever the run ends, as at any instruction boundary),
 * records no pending terminator and stops the engine in front of it (``budget_stop`` = its
 * size, RIP = its address); Python runs exactly the instructions left (a temporary exit inside
 * the block). An engine stop inside the block that ran last (a fault, an MMIO access) retires
 * only the instructions before the stop: Python takes back the rest (cetfast_last_block gives
 * the block that ran last, if it was counted).
 */

/* The block that ran last no longer runs (the engine stops in front of the next one): an engine
 * stop from now on is not inside it. Keeps the pending terminator, drops its instruction count. */
static void close_last(cetfast_t *f)
{
    if (f->s.pend->icount == 0)
        return;
    cet_block_t closed = *f->s.pend;
    closed.icount = 0;
    f->set_by_python = closed;
    f->s.pend = &f->set_by_python;
}

__attribute__((noinline, cold)) static void budget_stop(cetfast_t *f, uc_engine *uc, uint64_t addr, uint32_t size)
{
    pending_none(f, addr); /* its block start is done; its terminator has not run */
    f->s.budget_stop = size ? size : 1;
    uint64_t rip = addr - f->s.cs_base;
    f->reg_write(uc, UC_X86_REG_RIP, &rip); /* leave the block before its first instruction */
    f->emu_stop(uc);
}

/*
 * Interrupt window [SDM Vol. 3 §6.8.1, §6.8.3; cetvm.cpu.block_hook.BlockHook.on_block]. While an
 * external interrupt waits (injected, or an interrupt-window exit requested) and RFLAGS.IF = 0 or
 * an STI / MOV SS shadow blocks it, Python gives the engine's CPUX86State (cetfast_set_irq_watch):
 * every block start then takes the general path, which stops the engine in front of the first
 * block that starts with the window open (IF = 1, HF_INHIBIT_IRQ clear) — after the STI and the
 * instruction it shields, QEMU ends a block (an STI ends one, the instruction in its shadow is a
 * block of its own), after POPF too — so the interrupt is taken at that boundary, as a CPU takes
 * it, instead of at the next exit. Offsets: Unicorn 2.1.4's CPUX86State (cetvm.cpu.uc_context).
 */
#define ENV_EFLAGS 136
#define ENV_HFLAGS 176
#define ENV_EFLAGS_IF (1ull << 9)
#define ENV_HF_INHIBIT_IRQ (1u << 3)

static int irq_window_open(const cetfast_t *f)
{
    uint64_t eflags;
    uint32_t hflags;
    memcpy(&eflags, f->irq_env + ENV_EFLAGS, 8);
    memcpy(&hflags, f->irq_env + ENV_HFLAGS, 4);
    return (eflags & ENV_EFLAGS_IF) && !(hflags & ENV_HF_INHIBIT_IRQ);
}

__attribute__((noinline, cold)) static void irq_window_stop(cetfast_t *f, uc_engine *uc, uint64_t addr)
{
    pending_none(f, addr); /* its block start is done; its terminator has not run */
    f->irq_window_stopped = 1;
    uint64_t rip = addr - f->s.cs_base;
    f->reg_write(uc, UC_X86_REG_RIP, &rip); /* leave the block before its first instruction */
    f->emu_stop(uc);
}

/* Python: watch for the interrupt window (``env``: the engine's CPUX86State) or stop (NULL). */
void cetfast_set_irq_watch(void *p, const void *env)
{
    cetfast_t *f = p;
    f->irq_env = env;
    refresh_fast(f);
}

/* 1 if the watch stopped the engine in front of a block since the last call, then cleared. */
int cetfast_take_irq_window_stop(void *p)
{
    cetfast_t *f = p;
    int stopped = (int)f->irq_window_stopped;
    f->irq_window_stopped = 0;
    return stopped;
}

/* The block that ran last if it was counted and may have stopped inside: 1 and its address,
 * size and instruction count; else 0. */
int cetfast_last_block(void *p, uint64_t *addr, uint32_t *size, uint32_t *icount)
{
    cetfast_t *f = p;
    const cet_block_t *b = f->s.pend;
    if (b->icount == 0 || b->size == BLOCK_EMPTY)
        return 0;
    *addr = b->addr;
    *size = b->size;
    *icount = b->icount;
    return 1;
}

/* A single step with the hook disabled (cetvm.cpu.exit_emulation.ExitEmulation.step_in_engine):
 * the engine stops in front of the ``blocks``-th block that starts from now (0: no stop). Only
 * with the hook disabled, when every block start takes the general path. */
void cetfast_stop_at_block(void *p, uint32_t blocks) { ((cetfast_t *)p)->stop_at_block = blocks; }

/* The engine is about to start (or stopped in front of a block): no block is under way. */
void cetfast_close_last(void *p) { close_last(p); }

/* ------------------------------------------------------------------ plain blocks
 *
 * Block classification without Python for the common case (cetvm.cpu.block_hook.BlockHook.
 * classify_block stays the one place that decides): a 64-bit block whose every instruction is
 * *plain* — decoded here to its length, not one cetvm emulates (cetvm.cpu.decode.needs_emulation),
 * not one the native events claim (SYSCALL, SYSRETQ, IRETQ) nor one with a flag hook
 * (CMPXCHG8B/16B, cetvm.cpu.flag_sync) — is classified and stored here: its instruction count,
 * the terminator of its last instruction (cetvm.cpu.cet.transfer.classify_terminator), its first
 * bytes and whether its code is on global pages (cetvm.cpu.vcpu.Vcpu.code_is_global). Anything
 * else — an instruction outside the decoder's list, a prefix combination it does not accept, a
 * block not in directly accessed RAM, a paging mode other than 4-level, legacy or compatibility
 * mode — goes to the Python classifier as before, so "not plain" only ever costs time.
 *
 * The decoder is a length decoder for the 64-bit opcode maps [SDM Vol. 2 §2.1-2.2, Appendix A]
 * that accepts a list of opcodes and prefix combinations and rejects the rest; every acceptance
 * is checked against iced-x86 (tests/cpu/test_native_classify.py: random encodings and real
 * code, length, "plain" and terminator must agree). Linux boot: 175,000 classifications, of
 * which ~95 % are plain.
 */

/* One-byte opcode map, 64-bit mode. */
enum {
    OP_MODRM = 1 << 0, /* a ModRM byte (and SIB / displacement) */
    OP_IMM8 = 1 << 1,  /* ib */
    OP_IMMZ = 1 << 2,  /* iz: 2 bytes with 66 (no REX.W), else 4 */
    OP_IMM16 = 1 << 3, /* iw */
    OP_IMMV = 1 << 4,  /* MOV r, imm: 8 bytes with REX.W, 2 with 66, else 4 */
    OP_MOFFS = 1 << 5, /* MOV AL/rAX <-> moffs: 8 bytes, 4 with 67 */
    OP_BRANCH = 1 << 6, /* a near branch: no operand-size, address-size, LOCK, REP/BND prefix */
    OP_SLOW = 1 << 7,  /* not plain (emulated, invalid in 64-bit mode, or not in the list) */
    OP_PREFIX = 1 << 8,
    OP_REX = 1 << 9,
    OP_ESCAPE = 1 << 10, /* 0F */
    OP_LOCKABLE = 1 << 11, /* LOCK allowed with a memory operand (the group checks the reg field) */
    /* two-byte map only: which mandatory prefixes (none / 66 / F3 / F2) make a valid instruction */
    OP_P_NONE = 1 << 12,
    OP_P_66 = 1 << 13,
    OP_P_F3 = 1 << 14,
    OP_P_F2 = 1 << 15,
};
#define OP_P_ANY (OP_P_NONE | OP_P_66 | OP_P_F3 | OP_P_F2)
#define M_ OP_MODRM
#define ML (OP_MODRM | OP_LOCKABLE)

static const uint16_t ONE_BYTE_MAP[256] = {
    [0x00 ... 0x01] = ML, [0x02 ... 0x03] = M_, [0x04] = OP_IMM8, [0x05] = OP_IMMZ, [0x06 ... 0x07] = OP_SLOW,
    [0x08 ... 0x09] = ML, [0x0A ... 0x0B] = M_, [0x0C] = OP_IMM8, [0x0D] = OP_IMMZ, [0x0E] = OP_SLOW,
    [0x0F] = OP_ESCAPE,
    [0x10 ... 0x11] = ML, [0x12 ... 0x13] = M_, [0x14] = OP_IMM8, [0x15] = OP_IMMZ, [0x16 ... 0x17] = OP_SLOW,
    [0x18 ... 0x19] = ML, [0x1A ... 0x1B] = M_, [0x1C] = OP_IMM8, [0x1D] = OP_IMMZ, [0x1E ... 0x1F] = OP_SLOW,
    [0x20 ... 0x21] = ML, [0x22 ... 0x23] = M_, [0x24] = OP_IMM8, [0x25] = OP_IMMZ, [0x26] = OP_PREFIX,
    [0x27] = OP_SLOW,
    [0x28 ... 0x29] = ML, [0x2A ... 0x2B] = M_, [0x2C] = OP_IMM8, [0x2D] = OP_IMMZ, [0x2E] = OP_PREFIX,
    [0x2F] = OP_SLOW,
    [0x30 ... 0x31] = ML, [0x32 ... 0x33] = M_, [0x34] = OP_IMM8, [0x35] = OP_IMMZ, [0x36] = OP_PREFIX,
    [0x37] = OP_SLOW,
    [0x38 ... 0x3B] = M_, [0x3C] = OP_IMM8, [0x3D] = OP_IMMZ, [0x3E] = OP_PREFIX, [0x3F] = OP_SLOW,
    [0x40 ... 0x4F] = OP_REX,
    [0x50 ... 0x5F] = 0,
    [0x60 ... 0x62] = OP_SLOW, /* 62: EVEX */
    [0x63] = M_, [0x64 ... 0x67] = OP_PREFIX,
    [0x68] = OP_IMMZ, [0x69] = OP_MODRM | OP_IMMZ, [0x6A] = OP_IMM8, [0x6B] = OP_MODRM | OP_IMM8,
    [0x6C ... 0x6F] = OP_SLOW, /* INS / OUTS */
    [0x70 ... 0x7F] = OP_IMM8 | OP_BRANCH,
    [0x80] = ML | OP_IMM8, [0x81] = ML | OP_IMMZ, [0x82] = OP_SLOW, [0x83] = ML | OP_IMM8,
    [0x84 ... 0x85] = M_, [0x86 ... 0x87] = ML, [0x88 ... 0x8D] = M_, /* 8C, 8D: see the groups */
    [0x8E] = OP_SLOW, /* MOV Sreg (MOV SS is emulated) */
    [0x8F] = M_,
    [0x90 ... 0x99] = 0, [0x9A] = OP_SLOW, [0x9B ... 0x9F] = 0,
    [0xA0 ... 0xA3] = OP_MOFFS, [0xA4 ... 0xA7] = 0, [0xA8] = OP_IMM8, [0xA9] = OP_IMMZ, [0xAA ... 0xAF] = 0,
    [0xB0 ... 0xB7] = OP_IMM8, [0xB8 ... 0xBF] = OP_IMMV,
    [0xC0 ... 0xC1] = OP_MODRM | OP_IMM8, [0xC2] = OP_IMM16 | OP_BRANCH, [0xC3] = OP_BRANCH,
    [0xC4 ... 0xC5] = OP_SLOW, /* VEX */
    [0xC6] = OP_MODRM | OP_IMM8, [0xC7] = OP_MODRM | OP_IMMZ, [0xC8] = OP_IMM16 | OP_IMM8, [0xC9] = 0,
    [0xCA ... 0xCF] = OP_SLOW, /* RETF, INT3, INT n, INTO, IRET */
    [0xD0 ... 0xD3] = M_, [0xD4 ... 0xD6] = OP_SLOW, [0xD7] = 0, [0xD8 ... 0xDF] = OP_SLOW, /* x87 */
    [0xE0 ... 0xE3] = OP_IMM8 | OP_BRANCH, [0xE4 ... 0xE7] = OP_SLOW,
    [0xE8 ... 0xE9] = OP_IMMZ | OP_BRANCH, [0xEA] = OP_SLOW, [0xEB] = OP_IMM8 | OP_BRANCH,
    [0xEC ... 0xEF] = OP_SLOW,
    [0xF0] = OP_PREFIX, [0xF1] = OP_SLOW, [0xF2 ... 0xF3] = OP_PREFIX, [0xF4] = OP_SLOW, [0xF5] = 0,
    [0xF6 ... 0xF7] = ML, [0xF8 ... 0xFD] = 0, [0xFE ... 0xFF] = ML,
};

#define SSE_N6 (OP_MODRM | OP_P_NONE | OP_P_66)
/* Two-byte opcode map (0F xx), 64-bit mode: the opcodes accepted, each with its prefixes. */
static const uint16_t TWO_BYTE_MAP[256] = {
    [0x00 ... 0xFF] = OP_SLOW,
    [0x01] = OP_MODRM | OP_P_NONE,                /* CLAC, STAC, SWAPGS, RDTSCP, XGETBV only */
    [0x0D] = OP_MODRM | OP_P_ANY,                 /* PREFETCHW (memory only) */
    [0x10 ... 0x11] = OP_MODRM | OP_P_ANY,        /* MOVUPS/MOVUPD/MOVSS/MOVSD */
    [0x14 ... 0x15] = SSE_N6,                     /* UNPCKLPS/UNPCKHPS */
    [0x18] = OP_MODRM | OP_P_ANY,                 /* PREFETCHh (memory, /0-/3 only) */
    [0x19] = OP_MODRM | OP_P_ANY, [0x1D] = OP_MODRM | OP_P_ANY, [0x1F] = OP_MODRM | OP_P_ANY, /* NOP r/m */
    [0x28 ... 0x29] = SSE_N6,                     /* MOVAPS/MOVAPD */
    [0x2E ... 0x2F] = SSE_N6,                     /* UCOMISS/COMISS */
    [0x31] = OP_P_ANY,                            /* RDTSC (the TSC hook) */
    [0x40 ... 0x4F] = OP_MODRM | OP_P_ANY,        /* CMOVcc */
    [0x51] = OP_MODRM | OP_P_ANY, [0x54 ... 0x57] = SSE_N6, [0x58 ... 0x59] = OP_MODRM | OP_P_ANY,
    [0x5C ... 0x5F] = OP_MODRM | OP_P_ANY,
    [0x60 ... 0x6B] = SSE_N6, [0x6E] = SSE_N6, [0x6F] = SSE_N6 | OP_P_F3,
    [0x70] = OP_MODRM | OP_IMM8 | OP_P_ANY,       /* PSHUFW/PSHUFD/PSHUFHW/PSHUFLW */
    [0x74 ... 0x76] = SSE_N6, [0x77] = OP_P_NONE, /* PCMPEQx, EMMS */
    [0x7E] = SSE_N6 | OP_P_F3, [0x7F] = SSE_N6 | OP_P_F3,
    [0x80 ... 0x8F] = OP_IMMZ | OP_BRANCH | OP_P_ANY, /* Jcc rel32 (the branch rule rejects 66/F2/F3) */
    [0x90 ... 0x9F] = OP_MODRM | OP_P_ANY,        /* SETcc */
    [0xA0 ... 0xA1] = OP_P_ANY, [0xA8 ... 0xA9] = OP_P_ANY, /* PUSH/POP FS/GS */
    [0xA3] = OP_MODRM | OP_P_ANY, [0xAB] = ML | OP_P_ANY, [0xB3] = ML | OP_P_ANY, [0xBB] = ML | OP_P_ANY,
    [0xA4] = OP_MODRM | OP_IMM8 | OP_P_ANY, [0xAC] = OP_MODRM | OP_IMM8 | OP_P_ANY, /* SHLD/SHRD imm8 */
    [0xA5] = OP_MODRM | OP_P_ANY, [0xAD] = OP_MODRM | OP_P_ANY, [0xAF] = OP_MODRM | OP_P_ANY,
    [0xAE] = OP_MODRM | OP_P_NONE,                /* FXSAVE..XRSTOR (memory), LFENCE, MFENCE, SFENCE */
    [0xB0 ... 0xB1] = ML | OP_P_ANY,              /* CMPXCHG */
    [0xB6 ... 0xB7] = OP_MODRM | OP_P_ANY, [0xBE ... 0xBF] = OP_MODRM | OP_P_ANY, /* MOVZX/MOVSX */
    [0xB8] = OP_MODRM | OP_P_F3,                  /* POPCNT */
    [0xBA] = ML | OP_IMM8 | OP_P_ANY,             /* BT/BTS/BTR/BTC imm8 (/4-/7) */
    [0xBC ... 0xBD] = OP_MODRM | OP_P_ANY,        /* BSF/BSR/TZCNT/LZCNT */
    [0xC0 ... 0xC1] = ML | OP_P_ANY,              /* XADD */
    [0xC2] = OP_MODRM | OP_IMM8 | OP_P_ANY, [0xC6] = SSE_N6 | OP_IMM8, /* CMPccPS..., SHUFPS/PD */
    [0xC8 ... 0xCF] = OP_P_ANY,                   /* BSWAP */
    [0xD1 ... 0xD5] = SSE_N6, [0xD6] = OP_MODRM | OP_P_66, [0xD8 ... 0xDF] = SSE_N6,
    [0xE0 ... 0xE5] = SSE_N6, [0xE8 ... 0xEF] = SSE_N6, [0xF1 ... 0xF6] = SSE_N6, [0xF8 ... 0xFE] = SSE_N6,
};
#undef M_
#undef ML
#undef SSE_N6

typedef struct {
    uint8_t len;
    uint8_t kind;   /* T_*: the terminator this instruction makes when it ends a block */
    uint16_t imm16; /* RET imm16 */
} plain_insn_t;

/* Length of ModRM + SIB + displacement at ``p`` (64-bit addressing; 32-bit with 67 has the same
 * format), or 0 if more than ``avail`` bytes would be needed. */
static unsigned modrm_length(const uint8_t *p, size_t avail)
{
    if (avail < 1)
        return 0;
    unsigned mod = p[0] >> 6, rm = p[0] & 7, n = 1;
    if (mod != 3 && rm == 4) {
        if (avail < 2)
            return 0;
        if (mod == 0 && (p[1] & 7) == 5)
            n += 4; /* SIB without base: disp32 */
        n++;
    }
    if (mod == 0 && rm == 5)
        n += 4; /* RIP-relative */
    else if (mod == 1)
        n += 1;
    else if (mod == 2)
        n += 4;
    return n <= avail ? n : 0;
}

/* The reg field's rules of the one-byte groups and the LEA/MOV Sreg forms: 1 if plain. */
static int one_byte_group_plain(uint8_t op, uint8_t modrm)
{
    unsigned mod = modrm >> 6, reg = (modrm >> 3) & 7;
    switch (op) {
    case 0x8C: return reg <= 5;               /* MOV r/m, Sreg */
    case 0x8D: return mod != 3;               /* LEA with a register operand is no instruction */
    case 0x8F: return reg == 0;               /* POP r/m (others: XOP) */
    case 0xC6: case 0xC7: return reg == 0;    /* MOV r/m, imm (C6/C7 F8: XABORT/XBEGIN) */
    case 0xF6: case 0xF7: return reg != 1;    /* TEST/NOT/NEG/MUL/IMUL/DIV/IDIV */
    case 0xFE: return reg <= 1;               /* INC/DEC r/m8 */
    case 0xFF: return reg != 3 && reg != 5 && reg != 7; /* far CALL/JMP: emulated */
    default: return 1;
    }
}

/* The reg/mod rules of the accepted two-byte opcodes: 1 if plain. */
static int two_byte_group_plain(uint8_t op, uint8_t modrm)
{
    unsigned mod = modrm >> 6, reg = (modrm >> 3) & 7;
    switch (op) {
    case 0x01: return modrm == 0xCA || modrm == 0xCB || modrm == 0xF8 || modrm == 0xF9 || modrm == 0xD0;
    case 0xAE: return mod != 3 ? reg <= 5 : (modrm == 0xE8 || modrm == 0xF0 || modrm == 0xF8);
    case 0x0D: return mod != 3;
    case 0x18: return mod != 3 && reg <= 3;
    case 0xBA: return reg >= 4;
    default: return 1;
    }
}

/* 1 if LOCK may prefix this instruction (a memory destination of a lockable operation). */
static int lock_allowed(int two_byte, uint8_t op, uint16_t map, uint8_t modrm)
{
    unsigned mod = modrm >> 6, reg = (modrm >> 3) & 7;
    if (!(map & OP_LOCKABLE) || mod == 3)
        return 0;
    if (two_byte)
        return op != 0xBA || reg >= 5;
    switch (op) {
    case 0x80: case 0x81: case 0x83: return reg != 7;   /* not CMP */
    case 0xF6: case 0xF7: return reg == 2 || reg == 3; /* NOT, NEG */
    case 0xFE: case 0xFF: return reg <= 1;              /* INC, DEC */
    default: return 1;
    }
}

/*
 * Decode one 64-bit instruction at ``p`` (``avail`` bytes up to the end of the block): 1 and
 * *out if it is plain, else 0 (including an instruction that would run past ``avail``).
 */
static int decode_plain64(const uint8_t *p, size_t avail, plain_insn_t *out)
{
    size_t i = 0;
    int opsize = 0, adsize = 0, lock = 0, rep = 0 /* last of F2/F3 */, segs = 0, seg = 0, rex = 0;
    size_t limit = avail < 15 ? avail : 15;
    for (;; i++) {
        if (i >= limit)
            return 0;
        uint16_t m = ONE_BYTE_MAP[p[i]];
        if (m & OP_REX) {
            if (i + 1 >= limit || (ONE_BYTE_MAP[p[i + 1]] & (OP_REX | OP_PREFIX)))
                return 0; /* a REX not right in front of the opcode is ignored: not accepted */
            rex = p[i];
            i++;
            break;
        }
        if (!(m & OP_PREFIX))
            break;
        switch (p[i]) {
        case 0x66: opsize = 1; break;
        case 0x67: adsize = 1; break;
        case 0xF0: lock = 1; break;
        case 0xF2: case 0xF3: rep = p[i]; break;
        default: segs++; seg = p[i]; break;
        }
    }
    int rex_w = (rex & 0x08) != 0;
    uint8_t op = p[i++];
    int two_byte = 0;
    uint16_t map = ONE_BYTE_MAP[op];
    if (map & OP_ESCAPE) {
        if (i >= limit)
            return 0;
        op = p[i++];
        two_byte = 1;
        map = TWO_BYTE_MAP[op];
        if (op == 0x1E) {
            /* ENDBR64 / ENDBR32: F3 0F 1E FA / FB, no other prefix */
            if (rep != 0xF3 || opsize || adsize || lock || segs || rex || i >= limit || (p[i] != 0xFA && p[i] != 0xFB))
                return 0;
            out->len = (uint8_t)(i + 1);
            out->kind = T_NONE;
            out->imm16 = 0;
            return 1;
        }
        if (map & OP_SLOW)
            return 0;
        unsigned mandatory = rep == 0xF3 ? OP_P_F3 : rep == 0xF2 ? OP_P_F2 : opsize ? OP_P_66 : OP_P_NONE;
        if (!(map & mandatory))
            return 0;
    } else if (map & (OP_SLOW | OP_PREFIX | OP_REX)) {
        return 0;
    }
    if ((map & OP_BRANCH) && (opsize || adsize || lock || rep))
        return 0;
    uint8_t modrm = 0;
    if (map & OP_MODRM) {
        unsigned n = modrm_length(p + i, limit - i);
        if (!n)
            return 0;
        modrm = p[i];
        if (two_byte ? !two_byte_group_plain(op, modrm) : !one_byte_group_plain(op, modrm))
            return 0;
        i += n;
    }
    if (lock && !lock_allowed(two_byte, op, map, modrm))
        return 0;
    unsigned imm = 0;
    if (map & OP_IMM8)
        imm += 1;
    if (map & OP_IMM16)
        imm += 2;
    if (map & OP_IMMZ)
        imm += (opsize && !rex_w) ? 2 : 4;
    if (map & OP_IMMV)
        imm += rex_w ? 8 : opsize ? 2 : 4;
    if (map & OP_MOFFS)
        imm += adsize ? 4 : 8;
    if (!two_byte && (op == 0xF6 || op == 0xF7) && ((modrm >> 3) & 7) == 0)
        imm += op == 0xF6 ? 1 : (opsize && !rex_w) ? 2 : 4; /* TEST r/m, imm */
    if (i + imm > limit)
        return 0;
    const uint8_t *operand = p + i;
    i += imm;
    out->len = (uint8_t)i;
    out->kind = T_NONE;
    out->imm16 = 0;
    if (two_byte)
        return 1;
    if (op == 0xE8) {
        int32_t rel;
        memcpy(&rel, operand, 4);
        out->kind = rel == 0 ? T_CALL_DIRECT_DISP0 : T_CALL_DIRECT;
    } else if (op == 0xC3) {
        out->kind = T_RET;
    } else if (op == 0xC2) {
        out->kind = T_RET_IMM;
        out->imm16 = (uint16_t)(operand[0] | operand[1] << 8);
    } else if (op == 0xFF && (((modrm >> 3) & 7) == 2 || ((modrm >> 3) & 7) == 4)) {
        /* NOTRACK: a 3E prefix, the only segment prefix (more than one: not accepted) */
        if (opsize || adsize || lock || rep || segs > 1)
            return 0;
        int notrack = segs == 1 && seg == 0x3E;
        out->kind = ((modrm >> 3) & 7) == 2 ? (notrack ? T_CALL_INDIRECT_NOTRACK : T_CALL_INDIRECT)
                                            : (notrack ? T_JMP_INDIRECT_NOTRACK : T_JMP_INDIRECT);
    }
    return 1;
}

/* For the agreement tests: decode_plain64 of ``code``; out[0..2] = length, kind, imm16. */
int cetfast_decode_plain64(const uint8_t *code, uint32_t avail, uint32_t *out)
{
    plain_insn_t insn;
    if (!decode_plain64(code, avail, &insn))
        return 0;
    out[0] = insn.len;
    out[1] = insn.kind;
    out[2] = insn.imm16;
    return 1;
}

#define ENV_HF_CS64 (1u << 15) /* HF_CS64_MASK: 64-bit code (cetvm.cpu.uc_context.HFlags.CS64) */
#define CR4_PGE (1ull << 7)

/* The guest-physical page of code at ``lin`` and its PTE.G (*global_page, CR4.PGE not applied):
 * the 4-level walk without permission checks (the engine has just fetched the block) or the
 * identity with paging off; -1 if not mapped or another paging mode. */
static int code_walk(cetfast_t *f, uc_engine *uc, uint64_t lin, uint64_t *phys_page, int *global_page)
{
    walk4_t w;
    if (f->s.paging == PAGING_OFF) {
        *phys_page = lin & PAGE_MASK;
        *global_page = 0;
        return 0;
    }
    if (f->s.paging != PAGING_4LEVEL || walk4(f, uc, lin, &w) < 0)
        return -1;
    *phys_page = w.phys_page;
    *global_page = (w.leaf & PTE_G) != 0;
    return 0;
}

/* Copy the block's ``size`` bytes (at most two pages) to ``buf``; *global_page as
 * cetvm.cpu.vcpu.Vcpu.code_is_global: every page it touches is global and CR4.PGE is set.
 * -1: not mapped, another paging mode, or not in directly accessed RAM. */
static int read_block_code(cetfast_t *f, uc_engine *uc, uint64_t addr, uint32_t size, uint8_t *buf, int *global_page)
{
    int all_global = 1;
    uint32_t done = 0;
    while (done < size) {
        uint64_t lin = addr + done, phys;
        int g;
        if (code_walk(f, uc, lin, &phys, &g) < 0)
            return -1;
        uint32_t in_page = (uint32_t)(PAGE_SIZE - (lin & (PAGE_SIZE - 1)));
        uint32_t n = size - done < in_page ? size - done : in_page;
        const uint8_t *h = phys_host(f, phys | (lin & (PAGE_SIZE - 1)), n);
        if (!h)
            return -1;
        memcpy(buf + done, h, n);
        all_global = all_global && g;
        done += n;
    }
    uint64_t cr4 = 0;
    if (all_global && f->s.paging != PAGING_OFF && f->reg_read(uc, UC_X86_REG_CR4, &cr4) != UC_ERR_OK)
        return -1;
    *global_page = all_global && f->s.paging != PAGING_OFF && (cr4 & CR4_PGE);
    return 0;
}

/* Classify and store the block at ``addr`` if it is plain (see "plain blocks"); 0: Python's turn. */
__attribute__((noinline)) static int classify_plain(cetfast_t *f, uc_engine *uc, uint64_t addr, uint32_t size)
{
    uint32_t hflags;
    uint8_t buf[PAGE_SIZE];
    int global_page;
    if (!f->plain_classify || !f->env || size == 0 || size > PAGE_SIZE)
        return 0;
    memcpy(&hflags, f->env + ENV_HFLAGS, 4);
    if (!(hflags & ENV_HF_CS64) || read_block_code(f, uc, addr, size, buf, &global_page) < 0)
        return 0;
    plain_insn_t insn = {0};
    uint32_t off = 0, last = 0, icount = 0;
    while (off < size) {
        if (!decode_plain64(buf + off, size - off, &insn)) {
            f->not_plain++;
            return 0;
        }
        last = off;
        off += insn.len;
        icount++;
    }
    int term = insn.kind != T_NONE;
    if (cetfast_store(f, addr, size, icount, insn.kind, term ? addr + last : 0, term ? insn.len : 0, insn.imm16, buf,
                      size < 4 ? size : 4, (uint32_t)global_page) != 0)
        return 0; /* Python stores it, or reports why it cannot */
    f->plain++;
    return 1;
}

/* Python: the engine's CPUX86State (the mode of the code, for classify_plain). */
void cetfast_set_env(void *p, const void *env) { ((cetfast_t *)p)->env = env; }

/* Python: classify plain blocks natively (1, the default once the env is set) or not (0). */
void cetfast_set_plain_classify(void *p, uint32_t on) { ((cetfast_t *)p)->plain_classify = on ? 1 : 0; }

/* Statistics: out[0] blocks classified natively, out[1] blocks not plain (Python classified). */
void cetfast_classify_stats(void *p, uint64_t out[2])
{
    cetfast_t *f = p;
    out[0] = f->plain;
    out[1] = f->not_plain;
}

/*
 * The complete block start (cetvm.cpu.cet.transfer.on_block_start for the terminator of the block
 * that ran last, *f->s.pend, and the block starting at ``addr``): block-table miss and
 * classification, every mode, the shadow-stack translation cache fill, hand-overs. Reached from
 * cetfast_block_hook() whenever its short path does not apply; starts from the same inputs
 * (the short path commits nothing before it gives up). Ends by recomputing the short path's
 * masks (the CET control may have changed).
 */
__attribute__((noinline)) static void block_hook_slow(uc_engine *uc, uint64_t addr, uint32_t size, void *user_data)
{
    cetfast_t *f = user_data;
    cet_shared_t *s = &f->s;
    if (UNLIKELY(f->stop_at_block) && --f->stop_at_block == 0) {
        uint64_t rip = addr - s->cs_base; /* the stepped instruction ran: stop in front of the next block */
        f->reg_write(uc, UC_X86_REG_RIP, &rip);
        f->emu_stop(uc);
        return;
    }
    if (UNLIKELY(!s->enabled || s->handover))
        return;
    cet_block_t *b = block_find(f, addr, size);
    if (UNLIKELY(!b)) {
        s->misses++;
        if (!classify_plain(f, uc, addr, size) && !f->classify(addr, size)) { /* Python made exits / stopped emulation: not consumed */
            close_last(f);
            return;
        }
        b = block_find(f, addr, size);
        if (!b) {
            close_last(f);
            return;
        }
    }
    cet_term_t prev = block_term(s->pend);
    s->pend = b;
    block_start_general(f, uc, b, prev, addr);
    if (LIKELY(!s->handover)) {
        if (UNLIKELY(f->irq_env != NULL) && irq_window_open(f))
            irq_window_stop(f, uc, addr);
        else if (UNLIKELY(s->budget_left < (int64_t)b->icount))
            budget_stop(f, uc, addr, size);
        else
            s->budget_left -= b->icount; /* the block runs: it retires its instructions */
    }
    refresh_fast(f);
}

/*
 * UC_HOOK_BLOCK callback: cetvm.cpu.cet.transfer.on_block_start for the terminator of the block
 * that ran last (*f->s.pend) and the block starting at ``addr``.
 *
 * This is the short path for the case that matters for speed: the block is in the front cache
 * and the pending terminator's kind needs no general path — 64-bit mode with CR4.CET, no
 * hand-over pending, the tracker IDLE and SUPPRESS clear (so the ENDBR check can only fail,
 * never change the CET control: ibt_check_target with TRACKER = IDLE and SUPPRESS = 0 leaves it
 * as it is) — nor an arming kind [ibt_arm_on_indirect] going to a block without ENDBR64. Then
 * only the shadow stack moves: CALL pushes the return address into the cached shadow-stack page,
 * RET loads and compares [shstk_push_near / shstk_pop_near_and_check]. The mode and CET-control
 * tests are folded into the per-kind masks by refresh_fast(), so the decision is a test of the
 * pending block's kind bit against them, and the bookkeeping is one pointer store. Everything
 * else — a miss, another mode, the tracker armed, a shadow-stack page not cached, a RET
 * mismatch — tail-calls block_hook_slow() before anything is stored.
 *
 * Variants measured and rejected (no gain or slower,
 * thread CPU time, interleaved runs): a "next block" hint pointer in each entry instead of the
 * front-cache index; pending kind and return address stored as values instead of a pointer; a
 * branch-free body (always load and store the slot, masks for push/pop: slower, the per-block
 * store-to-load chain through the shadow-stack slot); the index ``addr & 255``.
 */
void cetfast_block_hook(uc_engine *uc, uint64_t addr, uint32_t size, void *user_data)
{
    cetfast_t *f = user_data;
    cet_shared_t *s = &f->s;
    const cet_block_t *p = s->pend;
    const cet_block_t *b = &f->front[front_index(addr)];
    if (UNLIKELY(b->addr != addr || b->size != size))
        goto slow;
    int64_t left = s->budget_left - b->icount;
    if (UNLIKELY(left < 0))
        goto slow;
    uint32_t act = p->kbit & s->act_kinds;
    if (LIKELY(act == 0)) {
        s->budget_left = left;
        s->pend = b;
        return;
    }
    if (act & s->pop_kinds) {
        uint64_t ssp = s->ssp, shadow_ret;
        if (UNLIKELY((ssp & (PAGE_MASK | 7)) != s->ss_tag))
            goto slow;
        memcpy(&shadow_ret, (const void *)(uintptr_t)(ssp + s->ss_delta), 8);
        if (UNLIKELY(shadow_ret != addr))
            goto slow;
        s->ssp = ssp + 8;
    } else if (act & s->push_kinds) {
        /* an arming kind (indirect CALL) into a block without ENDBR64: the general path */
        if (UNLIKELY(act & s->arm_kinds & b->no_endbr64))
            goto slow;
        uint64_t lin = s->ssp - 8;
        if (UNLIKELY((lin & (PAGE_MASK | 7)) != s->ss_tag))
            goto slow;
        memcpy((void *)(uintptr_t)(lin + s->ss_delta), &p->ret, 8);
        s->ssp = lin;
    } else if (UNLIKELY((act & ~s->arm_kinds) | (act & b->no_endbr64))) {
        goto slow; /* a slow kind (mode, tracker armed, hand-over...) or an arming one (indirect
                      JMP) into a block without ENDBR64 */
    }
    s->budget_left = left;
    s->pend = b;
    return;
slow:
    block_hook_slow(uc, addr, size, user_data);
}

/* ------------------------------------------------------------------ TLB fill (paging off) */

/*
 * UC_HOOK_TLB_FILL callback for guests running without paging (UC_TLB_VIRTUAL mode): identity
 * mapping, with data pages kept non-executable to the engine so stores to them stay on QEMU's
 * fast path (an executable page makes every store take the self-modifying-code path; measured on Unicorn 2.1.4). A page becomes RWX once it has been fetched from (stores to code pages
 * take the self-modifying-code path: correct, slower); every other page is RW.
 * Pages above 4 GiB are always RWX.
 */
#define FETCHED_PAGES (1ull << 20) /* 4 GiB of 4 KiB pages */

/* The split fill in progress (see "split ITLB/DTLB" below; one thread runs the engines; cs ==
 * NULL: none). A walk that raises #PF leaves by longjmp and never reaches set_page_split: the
 * next split fill overwrites the record, and this paging-off fill clears it. */
static struct { void *cs; uint64_t page; int access; } filling;

bool cetfast_tlb_fill(uc_engine *uc, uint64_t vaddr, uc_mem_type type, uc_tlb_entry *result, void *user_data)
{
    (void)uc;
    cetfast_t *f = user_data;
    uint64_t page = vaddr >> 12;
    filling.cs = NULL; /* not a split fill (see "split ITLB/DTLB") */
    result->paddr = vaddr & PAGE_MASK;
    if (page >= FETCHED_PAGES || !f->fetched) {
        result->perms = UC_PROT_ALL;
        return true;
    }
    uint64_t bit = 1ull << (page & 63);
    if (type == UC_MEM_FETCH || type == UC_MEM_FETCH_UNMAPPED || type == UC_MEM_FETCH_PROT)
        f->fetched[page >> 6] |= bit;
    result->perms = (f->fetched[page >> 6] & bit) ? UC_PROT_ALL : (UC_PROT_READ | UC_PROT_WRITE);
    return true;
}

/* Allocate the fetched-page bitmap (0 on success). */
int cetfast_enable_tlb_fill(void *p)
{
    cetfast_t *f = p;
    if (!f->fetched)
        f->fetched = calloc(FETCHED_PAGES / 64, sizeof(uint64_t));
    return f->fetched ? 0 : -1;
}

/* Forget which pages were fetched from (new guest image). */
void cetfast_reset_fetched(void *p)
{
    cetfast_t *f = p;
    if (f->fetched)
        memset(f->fetched, 0, FETCHED_PAGES / 64 * sizeof(uint64_t));
}

/* ------------------------------------------------------------------ split ITLB/DTLB (paging on)
 *
 * The same job as the paging-off fill above, for guests with paging on and pages that are both
 * writable and executable (test kernels' 2 MiB RWX identity maps, kvm-unit-tests). QEMU's TLB
 * entry for a page serves loads, stores and fetches; Unicorn 2.1.4 marks every writable RAM
 * entry "not dirty" and clears the mark after the first store only if the entry is not
 * executable (notdirty_write: addr_code == -1) — so on an RWX page every store takes the
 * self-modifying-code path for good. Real processors keep separate instruction and data TLBs
 * [SDM Vol. 3A 4.10.2]; cetvm splits the engine's entries the same way:
 *
 *   - a fill for a data access (load/store) of a guest-physical page that has never been fetched
 *     from installs the entry without execute permission, so stores to it stay on the fast path;
 *   - a fill for an instruction fetch marks the physical page as code, for good ("fetched"
 *     bitmap, shared with the paging-off fill); the first time, every engine TLB entry is flushed
 *     so that no data entry of that page (through any alias) stays without execute permission
 *     and marked dirty — data entries of code pages keep the self-modifying-code checks.
 *
 * The guest's own permissions are untouched: the CPU's page walk (x86_cpu_tlb_fill: A/D bits,
 * #PF) runs unchanged, the split only drops PAGE_EXEC from what it installs for data accesses,
 * and a later fetch from the page misses and fills again. The mechanism: the CPU class's
 * tlb_fill_cpu (and tlb_fill while in UC_TLB_CPU mode) points at tlb_fill_split, which records
 * the access type around the CPU's walk; libunicorn's PLT slot of tlb_set_page_with_attrs points
 * at set_page_split, which edits ``prot`` of the fill in progress. Both places are found and
 * checked at run time (cetfast_split_tlb); on any mismatch nothing is changed. */
enum { QEMU_MMU_DATA_LOAD, QEMU_MMU_DATA_STORE, QEMU_MMU_INST_FETCH };
#define QEMU_PAGE_EXEC 0x0004

typedef bool (*cpu_tlb_fill_fn)(void *cs, uint64_t addr, int size, int access, int mmu_idx, bool probe,
                                uintptr_t retaddr);
typedef void (*tlb_set_page_fn)(void *cs, uint64_t vaddr, uint64_t paddr, uint32_t attrs, int prot, int mmu_idx,
                                uint64_t size);
typedef void (*tlb_flush_fn)(void *cs);

#define SPLIT_CPUS 64
static cpu_tlb_fill_fn x86_tlb_fill;    /* x86_cpu_tlb_fill: the CPU's page walk */
static tlb_set_page_fn unicorn_set_page; /* tlb_set_page_with_attrs */
static tlb_flush_fn unicorn_tlb_flush;   /* tlb_flush */
static struct { void *cs; cetfast_t *f; } split_cpus[SPLIT_CPUS];

static cetfast_t *split_owner(void *cs)
{
    for (int i = 0; i < SPLIT_CPUS; i++)
        if (split_cpus[i].cs == cs)
            return split_cpus[i].f;
    return NULL;
}

static bool tlb_fill_split(void *cs, uint64_t addr, int size, int access, int mmu_idx, bool probe, uintptr_t retaddr)
{
    filling.cs = cs;
    filling.page = addr & PAGE_MASK;
    filling.access = access;
    bool ok = x86_tlb_fill(cs, addr, size, access, mmu_idx, probe, retaddr);
    filling.cs = NULL;
    return ok;
}

/* The permissions a fill installs under the split (see above); marks code pages. */
static int split_prot(cetfast_t *f, void *cs, uint64_t paddr, int access, int prot)
{
    uint64_t page = paddr >> 12;
    if (!f->fetched || page >= FETCHED_PAGES || !(prot & QEMU_PAGE_EXEC))
        return prot;
    uint64_t bit = 1ull << (page & 63), *word = &f->fetched[page >> 6];
    if (access == QEMU_MMU_INST_FETCH) {
        if (!(*word & bit)) {
            *word |= bit;
            unicorn_tlb_flush(cs);
            f->code_pages++;
        }
        return prot;
    }
    return (*word & bit) ? prot : prot & ~QEMU_PAGE_EXEC;
}

static void set_page_split(void *cs, uint64_t vaddr, uint64_t paddr, uint32_t attrs, int prot, int mmu_idx,
                           uint64_t size)
{
    if (cs && cs == filling.cs && (vaddr & PAGE_MASK) == filling.page) {
        cetfast_t *f = split_owner(cs);
        filling.cs = NULL;
        if (f)
            prot = split_prot(f, cs, paddr, filling.access, prot);
    }
    unicorn_set_page(cs, vaddr, paddr, attrs, prot, mmu_idx, size);
}

/* dl_iterate_phdr callback: the PLT slot (R_X86_64_JUMP_SLOT) of ``name`` in the object loaded
 * at ``base``. */
struct plt_search { uintptr_t base; const char *name; void **slot; };

static int find_plt_slot(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct plt_search *q = data;
    if (info->dlpi_addr != q->base)
        return 0;
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
    if (!dyn)
        return 1;
    uintptr_t jmprel = 0, symtab = 0, strtab = 0;
    size_t relsz = 0;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        if (dyn->d_tag == DT_JMPREL) jmprel = dyn->d_un.d_ptr;
        else if (dyn->d_tag == DT_PLTRELSZ) relsz = dyn->d_un.d_val;
        else if (dyn->d_tag == DT_SYMTAB) symtab = dyn->d_un.d_ptr;
        else if (dyn->d_tag == DT_STRTAB) strtab = dyn->d_un.d_ptr;
    }
    /* ld.so relocates these in place on x86-64; add the base if it did not */
    if (jmprel && jmprel < info->dlpi_addr) jmprel += info->dlpi_addr;
    if (symtab && symtab < info->dlpi_addr) symtab += info->dlpi_addr;
    if (strtab && strtab < info->dlpi_addr) strtab += info->dlpi_addr;
    if (!jmprel || !symtab || !strtab)
        return 1;
    const ElfW(Rela) *rel = (const ElfW(Rela) *)jmprel;
    const ElfW(Sym) *sym = (const ElfW(Sym) *)symtab;
    for (size_t i = 0; i < relsz / sizeof(*rel); i++)
        if (ELF64_R_TYPE(rel[i].r_info) == R_X86_64_JUMP_SLOT
            && strcmp((const char *)strtab + sym[ELF64_R_SYM(rel[i].r_info)].st_name, q->name) == 0) {
            q->slot = (void **)(info->dlpi_addr + rel[i].r_offset);
            break;
        }
    return 1;
}

/* The CPU class of the engine: CPUState.cc follows CPUState.uc; the class's tlb_fill and
 * tlb_fill_cpu are adjacent and tlb_fill_cpu is x86_cpu_tlb_fill. Returns the tlb_fill slot. */
static cpu_tlb_fill_fn *find_tlb_fill_slots(void *uc, void *cs, void *virtual_fill)
{
    void **words = cs;
    for (size_t i = 0; i + 1 < 48 * 1024 / sizeof(void *); i++) {
        if (words[i] != uc)
            continue;
        void **cc = words[i + 1];
        if (!cc)
            continue;
        for (size_t j = 0; j + 1 < 128; j++)
            if ((cc[j + 1] == (void *)x86_tlb_fill || cc[j + 1] == (void *)tlb_fill_split)
                && (cc[j] == cc[j + 1] || cc[j] == virtual_fill || cc[j] == (void *)tlb_fill_split))
                return (cpu_tlb_fill_fn *)&cc[j];
        return NULL;
    }
    return NULL;
}

/* Split this engine's TLB entries (see above). ``cs``: uc->cpu; the function addresses come
 * from libunicorn's symbol table (x86_cpu_tlb_fill, unicorn_fill_tlb, tlb_set_page_with_attrs,
 * tlb_flush). 0 on success; -1 if the engine's layout is not the expected one (nothing
 * changed); -2 if too many engines. */
int cetfast_split_tlb(void *p, void *uc, void *cs, void *cpu_fill, void *virtual_fill, void *set_page, void *flush)
{
    cetfast_t *f = p;
    if (!f->fetched || !cs)
        return -1;
    if ((x86_tlb_fill && x86_tlb_fill != cpu_fill) || (unicorn_set_page && unicorn_set_page != set_page))
        return -1;
    x86_tlb_fill = cpu_fill;
    cpu_tlb_fill_fn *fill = find_tlb_fill_slots(uc, cs, virtual_fill);
    if (!fill)
        return -1;
    if (!unicorn_set_page) {
        Dl_info info;
        struct plt_search q = {0, "tlb_set_page_with_attrs_x86_64", NULL};
        if (!dladdr(set_page, &info))
            return -1;
        q.base = (uintptr_t)info.dli_fbase;
        dl_iterate_phdr(find_plt_slot, &q);
        Dl_info target; /* resolved, or still the lazy-binding stub inside libunicorn */
        if (!q.slot || (*q.slot != set_page && *q.slot != (void *)set_page_split
                        && !(dladdr(*q.slot, &target) && target.dli_fbase == info.dli_fbase)))
            return -1;
        unicorn_set_page = set_page;
        unicorn_tlb_flush = flush;
        *q.slot = (void *)set_page_split;
    }
    int free_slot = -1;
    for (int i = 0; i < SPLIT_CPUS; i++) {
        if (split_cpus[i].cs == cs) {
            free_slot = i;
            break;
        }
        if (free_slot < 0 && !split_cpus[i].cs)
            free_slot = i;
    }
    if (free_slot < 0)
        return -2;
    split_cpus[free_slot].cs = cs;
    split_cpus[free_slot].f = f;
    if (fill[0] == (cpu_tlb_fill_fn)cpu_fill)
        fill[0] = tlb_fill_split;
    fill[1] = tlb_fill_split;
    return 0;
}

uint64_t cetfast_code_pages(void *p) { return ((cetfast_t *)p)->code_pages; }

/* Forget the engines of ``f`` (freed with it: their CPUs' addresses may be reused). */
static void cetfast_unsplit_tlb(cetfast_t *f)
{
    for (int i = 0; i < SPLIT_CPUS; i++)
        if (split_cpus[i].f == f)
            split_cpus[i].cs = NULL, split_cpus[i].f = NULL;
}

/* ---------------------------------------------------------------------------------------
 * Exact instruction budget at instruction granularity (the reference the block count above is
 * tested against, and untraced vCPUs): a UC_HOOK_CODE callback that counts instructions as they
 * start and stops the engine before the first one past the budget (Unicorn checks the stop
 * request right after a code hook, before the instruction runs). The Python side un-counts an
 * instruction that faults instead of retiring. Same contract as the Python counter
 * (cetvm.cpu.budget). A code hook costs every translated instruction a call and an EFLAGS
 * computation: the bench loop with CET on ran 88-106 MIPS under it (about 1.2 MIPS under the
 * Python one).
 * ------------------------------------------------------------------------------------- */
typedef struct {
    int64_t budget_left; /* instructions that may still start in this run */
    uint64_t retired;    /* instructions counted since the vCPU was created */
    int32_t hit;         /* set when the budget stopped the engine */
    int32_t pad;
    emu_stop_fn emu_stop;
} cet_insn_counter_t;

uint64_t cetfast_insn_counter_size(void) { return sizeof(cet_insn_counter_t); }

void cetfast_count_insn(uc_engine *uc, uint64_t address, uint32_t size, void *user)
{
    cet_insn_counter_t *c = (cet_insn_counter_t *)user;
    (void)address;
    (void)size;
    if (c->budget_left <= 0) {
        c->hit = 1;
        c->emu_stop(uc);
        return;
    }
    c->budget_left--;
    c->retired++;
}

/* ---------------------------------------------------------------------------------------
 * RDTSC / RDTSCP (UC_HOOK_INSN; cetvm.cpu.tsc). Unicorn has checked CR4.TSD already and calls
 * the hook with RIP at the instruction; returning 1 replaces the instruction's result. While a
 * run lasts, the TSC advances ticks_per_insn per instruction the vCPU retires (the clock KVM
 * gave the CPU counts retired instructions, and no other vCPU runs meanwhile), so it is
 * base_tsc + (base_left - budget_left) * ticks_per_insn: budget_left is the run's instruction
 * budget, which the budget counting (per block in the block hook, or per instruction in the
 * count hook) decrements by every instruction it retires, and base_* are sampled by Python at
 * each run's start. With ticks_per_insn = 0 the Python callback (slow) answers instead.
 * ------------------------------------------------------------------------------------- */
typedef struct {
    uint64_t base_tsc;
    int64_t base_left;
    uint64_t ticks_per_insn;
    const int64_t *budget_left;  /* the run's budget counter (cet_shared_t or cet_insn_counter_t) */
    uint64_t last;               /* the last value a guest read (reads strictly increase) */
    reg_rw_fn reg_write;
    reg_rw_fn reg_read;
    int (*slow_rdtsc)(uc_engine *, void *);
    int (*slow_rdtscp)(uc_engine *, void *);
} cet_tsc_t;

uint64_t cetfast_tsc_size(void) { return sizeof(cet_tsc_t); }

static void tsc_result(uc_engine *uc, cet_tsc_t *t)
{
    uint64_t tsc = t->base_tsc + (uint64_t)(t->base_left - *t->budget_left) * t->ticks_per_insn;
    if ((int64_t)(tsc - t->last) <= 0)
        tsc = t->last + 1;  /* a read in the same block as the last one (see cetvm.cpu.tsc) */
    t->last = tsc;
    uint64_t lo = (uint32_t)tsc, hi = tsc >> 32;
    t->reg_write(uc, UC_X86_REG_RAX, &lo);
    t->reg_write(uc, UC_X86_REG_RDX, &hi);
}

int cetfast_rdtsc(uc_engine *uc, void *user)
{
    cet_tsc_t *t = (cet_tsc_t *)user;
    if (!t->ticks_per_insn)
        return t->slow_rdtsc(uc, NULL);
    tsc_result(uc, t);
    return 1;
}

int cetfast_rdtscp(uc_engine *uc, void *user)
{
    cet_tsc_t *t = (cet_tsc_t *)user;
    if (!t->ticks_per_insn)
        return t->slow_rdtscp(uc, NULL);
    uc_x86_msr msr = {.rid = 0xC0000103u, .value = 0}; /* IA32_TSC_AUX */
    t->reg_read(uc, UC_X86_REG_MSR, &msr);
    uint64_t aux = (uint32_t)msr.value;
    t->reg_write(uc, UC_X86_REG_RCX, &aux);
    tsc_result(uc, t);
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * Native events: SYSCALL and SYSRETQ without leaving the engine [issue 13].
 *
 * A 1:1 re-implementation of the common case of cetvm.cpu.emulate.syscall / sysret with the
 * CET effects of cetvm.cpu.cet.far_transfers.ssp_on_syscall / ssp_on_sysret, which stay the
 * place that decides. SYSCALL: Unicorn calls the UC_HOOK_INSN hook with RIP at the instruction
 * and adds its length to RIP afterwards; the TB ends after it, so the new CPL (QEMU's hflags,
 * patched in a saved context and restored) takes effect at the next block. SYSRETQ cannot be
 * hooked by type: each SYSRETQ address the classifier sees gets a one-address UC_HOOK_CODE
 * hook (the block is translated again with it), called before the instruction runs; writing
 * RIP there leaves the block before the SYSRETQ executes and the engine goes on at the new RIP.
 *
 * Anything else is handed over to Python, which emulates the instruction (and raises its #UD
 * or #GP): SCE clear, not 64-bit mode, CPL != 0 for SYSRET, a non-canonical RCX, the 32-bit
 * SYSRET form, a block whose classification does not end with this instruction, the hook
 * disabled (single steps) or a block-start hand-over pending. A hand-over records the
 * instruction's RIP and stops the engine; nothing has been changed (SYSCALL: Unicorn still adds
 * the length to RIP, Python puts RIP back).
 *
 * The pending terminator of the block is the SYSCALL/SYSRET itself (kind OTHER_EMULATED): the
 * next block start only checks ENDBR while the tracker waits (armed here by SYSCALL), on the
 * short/general paths above. Instructions are counted with their block (block granularity
 * only: the vCPU enables these hooks only then).
 * ------------------------------------------------------------------------------------- */

/* Unicorn 2.1.4's x86-64 CPUX86State as saved in a uc_context (data at +40; cetvm.cpu.uc_context,
 * self-checked by the loader): hflags, segs[] (24 bytes each), EFER, STAR, LSTAR, FMASK. */
#define UCX_DATA 40
#define UCX_HFLAGS 176
#define UCX_SEGS 184
#define UCX_SEG_SIZE 24
#define UCX_EFER 592
#define UCX_STAR 4824
#define UCX_LSTAR 4840
#define UCX_FMASK 4856
#define UCX_ERROR_CODE 5384
#define UCX_OLD_EXCEPTION 5496
#define SEG_CS 1
#define SEG_SS 2

/* QEMU hflags [cetvm.cpu.uc_context.HFlags]. */
#define HF_CPL_MASK 3u
#define HF_CS32 (1u << 4)
#define HF_SS32 (1u << 5)
#define HF_ADDSEG (1u << 6)
#define HF_LMA (1u << 14)
#define HF_CS64 (1u << 15)

/* Segment attributes as QEMU caches them (descriptor high dword) [cetvm.cpu.state.SegAttr]. */
#define SA_ACCESSED (1u << 8)
#define SA_RW (1u << 9)
#define SA_CODE (1u << 11)
#define SA_S (1u << 12)
#define SA_P (1u << 15)
#define SA_L (1u << 21)
#define SA_DB (1u << 22)
#define SA_G (1u << 23)
#define SA_DPL_SHIFT 13
#define SA_CODE64 (SA_P | SA_S | SA_CODE | SA_RW | SA_ACCESSED | SA_L | SA_G) /* Segment.code64 */
#define SA_DATA (SA_P | SA_S | SA_RW | SA_ACCESSED | SA_DB | SA_G)             /* Segment.data */

#define EFER_SCE 1ull
#define RFLAGS_RF (1ull << 16)
#define RFLAGS_IF (1ull << 9)
#define RFLAGS_AC (1ull << 18) /* alignment check [SDM Vol. 1 §3.4.3.3] */
#define RFLAGS_TF (1ull << 8)  /* trap flag: single-step [SDM Vol. 3 §18.3.1.4] */
#define RFLAGS_IRET_MASK 0x257FD5ull /* cetvm.cpu.emulate.RFLAGS_IRET_MASK */
#define RFLAGS_SYSRET_MASK 0x3C7FD7ull /* cetvm.cpu.emulate.RFLAGS_SYSRET_MASK */

typedef uc_err (*ctx_alloc_fn)(uc_engine *, uc_context **);
typedef uc_err (*ctx_fn)(uc_engine *, uc_context *);
typedef uc_err (*ctx_free_fn)(uc_context *);

/* Mirrored by cetvm.cpu.native.loader.EventsState. */
typedef struct {
    uint64_t pl_ssp[4];      /* IA32_PL0_SSP .. IA32_PL3_SSP: the vCPU's only copy */
    uint64_t handover_rip;   /* RIP of the instruction left to Python (valid while handover) */
    uint32_t handover;       /* 1: Python must emulate the instruction at handover_rip */
    uint32_t enabled;        /* Python turns the native events on (block-granular budgets) */
    uint64_t mode_changes;   /* CPL changes made here: Python re-reads the mode when it moved */
    uint64_t syscalls;       /* statistics: native SYSCALLs, SYSRETs, IRETs, hand-overs */
    uint64_t sysrets;
    uint64_t irets;
    uint64_t handovers;
    uint32_t irq_pending;    /* Python: an external interrupt waits (SYSRET/IRET may open its window) */
    uint32_t exception_bitmap; /* Python: the VMCS exception bitmap (those exceptions exit: Python) */
    uint64_t faults;         /* statistics: #PFs delivered here */
    uint64_t pf_cr2;         /* CR2 of the last #PF delivered here (Python keeps it after the run) */
    uint64_t pf_delivered;   /* #PFs delivered during the current run (Python clears it) */
    uint32_t nmi_blocked;    /* Python: blocking by NMI is set (the IRETQ that ends it is Python's) */
    uint32_t reserved;
    /* private */
    void (*slow_intr)(uc_engine *, uint32_t, void *); /* Python's UC_HOOK_INTR handler */
    uint8_t *bounds_pool;    /* instruction lengths of classified blocks (see "#PF" below) */
    uint32_t bounds_used;
    uint32_t bounds_count;
    void *bounds;
    cetfast_t *f;
    reg_rw_fn reg_read;
    reg_rw_fn reg_write;
    ctx_fn ctx_save;
    ctx_fn ctx_restore;
    ctx_free_fn ctx_free;
    uc_context *ctx;
    uint64_t slow_calls;     /* interrupts handed to Python's handler (cetfast_run stops after one) */
    void *exit_insns;        /* cet_exit_insns_t (cetfast_events_set_exit_insns), or NULL */
} cet_events_t;

uint64_t cetfast_events_size(void) { return sizeof(cet_events_t); }

void *cetfast_events_new(void *cetfast, uc_engine *uc, void *reg_read, void *reg_write, void *ctx_alloc,
                         void *ctx_save, void *ctx_restore, void *ctx_free)
{
    cet_events_t *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    if (((ctx_alloc_fn)ctx_alloc)(uc, &e->ctx) != UC_ERR_OK) {
        free(e);
        return NULL;
    }
    e->f = cetfast;
    e->reg_read = (reg_rw_fn)reg_read;
    e->reg_write = (reg_rw_fn)reg_write;
    e->ctx_save = (ctx_fn)ctx_save;
    e->ctx_restore = (ctx_fn)ctx_restore;
    e->ctx_free = (ctx_free_fn)ctx_free;
    return e;
}

void cetfast_events_free(void *p)
{
    cet_events_t *e = p;
    if (!e)
        return;
    e->ctx_free(e->ctx);
    free(e->bounds_pool);
    free(e->bounds);
    free(e);
}

/* The saved CPUX86State fields this section reads (the loader's layout self-check). */
int cetfast_events_read_msrs(void *p, uc_engine *uc, uint64_t out[4])
{
    cet_events_t *e = p;
    if (e->ctx_save(uc, e->ctx) != UC_ERR_OK)
        return -1;
    const uint8_t *d = (const uint8_t *)e->ctx + UCX_DATA;
    memcpy(&out[0], d + UCX_EFER, 8);
    memcpy(&out[1], d + UCX_STAR, 8);
    memcpy(&out[2], d + UCX_LSTAR, 8);
    memcpy(&out[3], d + UCX_FMASK, 8);
    return 0;
}

static inline uint64_t ctx_u64(const uint8_t *d, unsigned off)
{
    uint64_t v;
    memcpy(&v, d + off, 8);
    return v;
}

/* Load a segment cache in the saved context as Registers.load_segment_caches does. */
static void ctx_segment(uint8_t *d, unsigned seg, uint32_t selector, uint64_t base, uint32_t limit,
                        uint32_t attributes)
{
    uint8_t *c = d + UCX_SEGS + seg * UCX_SEG_SIZE;
    uint32_t pad = 0;
    memcpy(c, &selector, 4);
    memcpy(c + 4, &pad, 4);
    memcpy(c + 8, &base, 8);
    memcpy(c + 16, &limit, 4);
    memcpy(c + 20, &attributes, 4);
}

/* A flat segment (base 0, limit 4 GiB - 1): Segment.code64 / Segment.data. */
static void ctx_flat_segment(uint8_t *d, unsigned seg, uint32_t selector, uint32_t attributes)
{
    ctx_segment(d, seg, selector, 0, 0xFFFFFFFFu, attributes);
}

/* hflags after loading a 64-bit CS (L=1) at ``cpl`` in IA-32e mode (uc_context.segment_hflags). */
static inline uint32_t hflags_long_mode(uint32_t hflags, unsigned cpl)
{
    hflags &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG);
    return hflags | HF_CS32 | HF_SS32 | HF_CS64 | cpl;
}

/* LA_adjust with 48-bit linear addresses [cetvm.cpu.cet.policy.la_adjust]. */
static inline uint64_t la_adjust48(uint64_t v)
{
    return (v & (1ull << 47)) ? (v | 0xFFFF000000000000ull) : (v & 0x0000FFFFFFFFFFFFull);
}

__attribute__((noinline, cold)) static void event_hand_over(cet_events_t *e, uc_engine *uc, uint64_t rip)
{
    e->handover = 1;
    e->handover_rip = rip;
    e->handovers++;
    e->f->emu_stop(uc);
}

static inline int events_usable(const cet_events_t *e)
{
    const cet_shared_t *s = &e->f->s;
    return e->enabled && s->enabled && !s->handover && !e->handover && s->long_mode;
}

/* The length of the instruction at linear ``lin`` if it ends the block under way as an
 * OTHER_EMULATED terminator (what the classifier makes of SYSCALL/SYSRET), else 0. */
static inline unsigned pending_event_length(const cetfast_t *f, uint64_t lin)
{
    const cet_block_t *b = f->s.pend;
    if (b->size == BLOCK_EMPTY || b->kbit != (1u << T_OTHER_EMULATED) || b->ret - b->insn_len != lin)
        return 0;
    return b->insn_len;
}

/* The CPL changed here: the short path's masks and Python's cached mode follow. */
static void events_new_cpl(cet_events_t *e, unsigned cpl)
{
    cetfast_t *f = e->f;
    f->s.cpl = (uint8_t)cpl;
    refresh_fast(f);
    e->mode_changes++;
}

/* UC_HOOK_INSN (UC_X86_INS_SYSCALL) [SDM Vol. 2 SYSCALL; cetvm.cpu.emulate.syscall]. */
void cetfast_syscall_hook(uc_engine *uc, void *user_data)
{
    cet_events_t *e = user_data;
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    uint64_t rip;
    e->reg_read(uc, UC_X86_REG_RIP, &rip);
    unsigned len = events_usable(e) ? pending_event_length(f, rip + s->cs_base) : 0;
    if (UNLIKELY(len == 0 || e->ctx_save(uc, e->ctx) != UC_ERR_OK)) {
        event_hand_over(e, uc, rip);
        return;
    }
    uint8_t *d = (uint8_t *)e->ctx + UCX_DATA;
    uint32_t hflags;
    memcpy(&hflags, d + UCX_HFLAGS, 4);
    uint64_t star = ctx_u64(d, UCX_STAR), lstar = ctx_u64(d, UCX_LSTAR), fmask = ctx_u64(d, UCX_FMASK);
    uint64_t rflags;
    e->reg_read(uc, UC_X86_REG_RFLAGS, &rflags);
    if (UNLIKELY(!(ctx_u64(d, UCX_EFER) & EFER_SCE) || !(hflags & HF_CS64) || (rflags & ~fmask & RFLAGS_TF))) {
        event_hand_over(e, uc, rip); /* #UD: Python raises it; TF kept by FMASK: Python's single-step trap */
        return;
    }
    unsigned old_cpl = hflags & HF_CPL_MASK;
    uint32_t selector = (uint32_t)(star >> 32) & 0xFFFCu;
    ctx_flat_segment(d, SEG_CS, selector, SA_CODE64);
    ctx_flat_segment(d, SEG_SS, selector + 8, SA_DATA);
    hflags = hflags_long_mode(hflags, 0);
    memcpy(d + UCX_HFLAGS, &hflags, 4);
    e->ctx_restore(uc, e->ctx);

    uint64_t next = rip + len;
    uint64_t new_rflags = (rflags & ~fmask & ~RFLAGS_RF) | 2;
    e->reg_write(uc, UC_X86_REG_RCX, &next);
    e->reg_write(uc, UC_X86_REG_R11, &rflags);
    e->reg_write(uc, UC_X86_REG_RFLAGS, &new_rflags);
    uint64_t target = lstar - len; /* Unicorn adds the length after the hook */
    e->reg_write(uc, UC_X86_REG_RIP, &target);

    /* ssp_on_syscall */
    if (s->cr4_cet) {
        uint64_t old_ctl = old_cpl == 3 ? s->u_cet : s->s_cet;
        if (old_ctl & CET_SH_STK_EN)
            e->pl_ssp[3] = la_adjust48(s->ssp);
        if (s->s_cet & CET_SH_STK_EN)
            s->ssp = 0;
        if (s->s_cet & CET_ENDBR_EN) /* ibt_arm_on_transfer(m, 0) */
            s->s_cet = (s->s_cet | CET_TRACKER) & ~CET_SUPPRESS;
    }
    events_new_cpl(e, 0);
    e->syscalls++;
}

/* UC_HOOK_CODE on one SYSRETQ address [SDM Vol. 2 SYSRET; cetvm.cpu.emulate.sysret]. */
void cetfast_sysret_hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
{
    cet_events_t *e = user_data;
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    uint64_t rip = address - s->cs_base;
    if (UNLIKELY(!events_usable(e) || size != 3 || pending_event_length(f, address) != 3
                 || e->ctx_save(uc, e->ctx) != UC_ERR_OK)) {
        event_hand_over(e, uc, rip);
        return;
    }
    uint8_t *d = (uint8_t *)e->ctx + UCX_DATA;
    uint32_t hflags;
    memcpy(&hflags, d + UCX_HFLAGS, 4);
    uint64_t rcx, r11;
    e->reg_read(uc, UC_X86_REG_RCX, &rcx);
    e->reg_read(uc, UC_X86_REG_R11, &r11);
    if (UNLIKELY(!(ctx_u64(d, UCX_EFER) & EFER_SCE) || (hflags & HF_CPL_MASK) != 0 || !(hflags & HF_CS64)
                 || !is_canonical48(rcx) || (e->irq_pending && (r11 & RFLAGS_IF)) || (r11 & (RFLAGS_AC | RFLAGS_TF)))) {
        /* #UD / #GP(0): Python raises it; an interrupt window opens; RFLAGS.AC at CPL 3: the
         * run loop takes up alignment checking (cetvm.cpu.alignment); RFLAGS.TF: the single-step
         * trap right after SYSRET (Python's) */
        event_hand_over(e, uc, rip);
        return;
    }
    uint32_t base = (uint32_t)(ctx_u64(d, UCX_STAR) >> 48) & 0xFFFCu;
    ctx_flat_segment(d, SEG_CS, (base + 16) | 3, SA_CODE64 | 3u << SA_DPL_SHIFT);
    ctx_flat_segment(d, SEG_SS, (base + 8) | 3, SA_DATA | 3u << SA_DPL_SHIFT);
    hflags = hflags_long_mode(hflags, 3);
    memcpy(d + UCX_HFLAGS, &hflags, 4);
    e->ctx_restore(uc, e->ctx);

    uint64_t rflags = (r11 & RFLAGS_SYSRET_MASK) | 2;
    e->reg_write(uc, UC_X86_REG_RFLAGS, &rflags);
    /* ssp_on_sysret */
    if (s->cr4_cet && (s->u_cet & CET_SH_STK_EN))
        s->ssp = e->pl_ssp[3];
    events_new_cpl(e, 3);
    e->sysrets++;
    e->reg_write(uc, UC_X86_REG_RIP, &rcx); /* leaves the block before the SYSRETQ runs */
}

/* ------------------------------------------------------------------ IRETQ
 *
 * IRETQ at CPL 0 to a 64-bit code segment at CPL 0 or 3 [SDM Vol. 2 IRET "IA-32e mode";
 * cetvm.cpu.emulate.iret with cetvm.cpu.cet.far_transfers.ssp_on_iret], on a UC_HOOK_CODE at its
 * address as SYSRETQ. Reads (the frame, the GDT) are supervisor data reads through a native
 * 4-level walk with cetvm.cpu.paging.translate's rules (every level present; a supervisor read
 * has no other condition). Handed over to Python: another CPL, a frame or descriptor that does
 * not read (Python raises the #PF), any failing check (#GP/#NP/#SS/#CP), a target that is not a
 * flat 64-bit code segment, a supervisor token to free (an IST frame, a return to CPL 3 with
 * supervisor shadow stacks), an interrupt window opening while an interrupt waits, and any IRETQ
 * while blocking by NMI is set (cetvm.cpu.interrupts: Python's IRETQ ends it and opens the NMI
 * window the hypervisor may wait for).
 */

/* Supervisor data translation of the 8 bytes at ``lin`` (never across a page) for a read or a
 * write (CR0.WP: read-only pages fault) to a host pointer into RAM; NULL: Python decides. */
static uint8_t *sup_host(cetfast_t *f, uc_engine *uc, uint64_t lin, int write, int wp)
{
    uint64_t phys;
    if ((lin & (PAGE_SIZE - 1)) > PAGE_SIZE - 8)
        return NULL;
    if (f->s.paging == PAGING_OFF) {
        phys = lin;
    } else if (f->s.paging == PAGING_4LEVEL) {
        static const int shifts[4] = {39, 30, 21, 12};
        uint64_t table = f->s.cr3 & PTE_ADDR_MASK, entry = 0;
        int page_shift = 12, writable = 1;
        if (!is_canonical48(lin))
            return NULL;
        for (int level = 0; level < 4; level++) {
            uint64_t gpa = table + ((lin >> shifts[level]) & 0x1FF) * 8;
            uint8_t *h = phys_host(f, gpa, 8);
            if (h)
                memcpy(&entry, h, 8);
            else if (f->mem_read(uc, gpa, &entry, 8) != UC_ERR_OK)
                return NULL;
            if (!(entry & PTE_P))
                return NULL;
            writable = writable && (entry & PTE_RW);
            if (shifts[level] == 12 || ((level == 1 || level == 2) && (entry & PTE_PS))) {
                page_shift = shifts[level];
                break;
            }
            table = entry & PTE_ADDR_MASK;
        }
        if (write && wp && !writable)
            return NULL;
        uint64_t frame_mask = ((1ull << 52) - 1) & ~((1ull << page_shift) - 1);
        phys = (entry & frame_mask) | (lin & ((1ull << page_shift) - 1));
    } else {
        return NULL;
    }
    return phys_host(f, phys, 8);
}

/* Supervisor data read of 8 bytes at ``lin`` (never across a page, RAM only); 0 or -1 (hand over). */
static int sup_read_u64(cetfast_t *f, uc_engine *uc, uint64_t lin, uint64_t *value)
{
    uint8_t *h = sup_host(f, uc, lin, 0, 0);
    if (!h)
        return -1;
    memcpy(value, h, 8);
    return 0;
}

/* A GDT code/data descriptor for ``selector`` (cetvm.cpu.events.read_descriptor): its high dword
 * as QEMU caches it (attributes), base and limit; -1 when Python must decide (LDT, limit, null,
 * unreadable). */
static int gdt_descriptor(cet_events_t *e, uc_engine *uc, uint32_t selector, uint32_t *attributes,
                          uint64_t *base, uint32_t *limit)
{
    uc_x86_mmr gdtr = {0};
    uint32_t index = selector & ~7u;
    uint64_t raw;
    if (e->reg_read(uc, UC_X86_REG_GDTR, &gdtr) != UC_ERR_OK || (selector & 4) || index == 0
        || index + 7 > gdtr.limit || sup_read_u64(e->f, uc, gdtr.base + index, &raw) < 0)
        return -1;
    uint32_t low = (uint32_t)raw, high = (uint32_t)(raw >> 32);
    *attributes = high & 0x00F0FF00u;
    *base = ((low >> 16) & 0xFFFFu) | ((uint64_t)(high & 0xFFu) << 16) | (high & 0xFF000000u);
    *limit = (low & 0xFFFFu) | (high & 0x000F0000u);
    if (*attributes & SA_G)
        *limit = (*limit << 12) | 0xFFFu;
    return 0;
}

/* ssp_on_iret for IRETQ from CPL 0 (see above); 0 with *ssp the new SSP, or -1 (hand over). */
static int iret_ssp(cet_events_t *e, uc_engine *uc, unsigned new_cpl, uint32_t cs, uint64_t lip, uint64_t *ssp)
{
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    int old_on = s->cr4_cet && (s->s_cet & CET_SH_STK_EN);
    *ssp = s->ssp;
    if (new_cpl == 3) { /* _return_to_outer */
        if (old_on)
            return -1; /* the supervisor token at the old SSP is freed: Python */
        if (s->cr4_cet && (s->u_cet & CET_SH_STK_EN)) {
            if (!is_canonical48(e->pl_ssp[3]))
                return -1;
            *ssp = e->pl_ssp[3];
        }
        return 0;
    }
    if (!old_on)
        return 0;
    uint64_t at = *ssp, saved_cs, saved_lip, prev;
    if ((at & 7) || ss_load(f, uc, at + 16, &saved_cs, 8, 0) < 0 || ss_load(f, uc, at + 8, &saved_lip, 8, 0) < 0
        || ss_load(f, uc, at, &prev, 8, 0) < 0)
        return -1;
    if (saved_cs != (cs & 0xFFFFu) || saved_lip != lip || (prev & 3) || !is_canonical48(prev) || prev != at + 24)
        return -1; /* #CP(FAR_RET_IRET) / #GP(0) / a token to free after an IST switch: Python */
    *ssp = prev;
    return 0;
}

/* UC_HOOK_CODE on one IRETQ address (see above). */
void cetfast_iret_hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
{
    cet_events_t *e = user_data;
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    uint64_t rip = address - s->cs_base;
    uint64_t rsp, frame[5];
    if (UNLIKELY(!events_usable(e) || size != 2 || pending_event_length(f, address) != 2 || s->cpl != 0
                 || e->nmi_blocked))
        goto hand_over;
    e->reg_read(uc, UC_X86_REG_RSP, &rsp);
    for (int i = 0; i < 5; i++)
        if (sup_read_u64(f, uc, rsp + 8 * (uint64_t)i, &frame[i]) < 0)
            goto hand_over;
    uint64_t new_rip = frame[0], new_rflags = frame[2], new_rsp = frame[3];
    uint32_t new_cs = frame[1] & 0xFFFFu, new_ss = frame[4] & 0xFFFFu;
    unsigned new_cpl = new_cs & 3;
    if (new_cpl != 0 && new_cpl != 3)
        goto hand_over;
    /* _code_descriptor: a flat 64-bit code segment, DPL = RPL */
    uint32_t cs_attr, cs_limit, ss_attr = (uint32_t)new_cpl << SA_DPL_SHIFT, ss_limit = 0;
    uint64_t cs_base, ss_base = 0;
    if ((new_cs & ~3u) == 0 || gdt_descriptor(e, uc, new_cs, &cs_attr, &cs_base, &cs_limit) < 0
        || (cs_attr & (SA_CODE | SA_S | SA_P | SA_L)) != (SA_CODE | SA_S | SA_P | SA_L)
        || ((cs_attr >> SA_DPL_SHIFT) & 3) != new_cpl || cs_base != 0 || !is_canonical48(new_rip))
        goto hand_over;
    /* _stack_descriptor: a null SS for a 64-bit return to CPL 0, else a present writable data
     * segment with RPL = DPL = CPL */
    if ((new_ss & ~3u) == 0) {
        if (new_cpl == 3 || (new_ss & 3) != new_cpl)
            goto hand_over;
    } else if ((new_ss & 3) != new_cpl || gdt_descriptor(e, uc, new_ss, &ss_attr, &ss_base, &ss_limit) < 0
               || (ss_attr & (SA_CODE | SA_RW | SA_S | SA_P)) != (SA_RW | SA_S | SA_P)
               || ((ss_attr >> SA_DPL_SHIFT) & 3) != new_cpl) {
        goto hand_over;
    }
    uint64_t rflags;
    e->reg_read(uc, UC_X86_REG_RFLAGS, &rflags);
    /* old CPL 0: IOPL and IF are writable */
    uint64_t out_rflags = (rflags & ~RFLAGS_IRET_MASK) | (new_rflags & RFLAGS_IRET_MASK) | 2;
    if (e->irq_pending && (out_rflags & RFLAGS_IF))
        goto hand_over;
    if (new_cpl == 3 && (out_rflags & RFLAGS_AC))
        goto hand_over; /* alignment checking at CPL 3 is the run loop's (cetvm.cpu.alignment) */
    uint64_t ssp = s->ssp;
    int cet_active = s->cr4_cet && ((s->u_cet | s->s_cet) & (CET_SH_STK_EN | CET_ENDBR_EN));
    if (cet_active && iret_ssp(e, uc, new_cpl, new_cs, new_rip, &ssp) < 0)
        goto hand_over;
    if (e->ctx_save(uc, e->ctx) != UC_ERR_OK)
        goto hand_over;
    uint8_t *d = (uint8_t *)e->ctx + UCX_DATA;
    uint32_t hflags;
    memcpy(&hflags, d + UCX_HFLAGS, 4);
    if (!(hflags & HF_LMA))
        goto hand_over;
    ctx_segment(d, SEG_CS, new_cs, cs_base, cs_limit, cs_attr);
    ctx_segment(d, SEG_SS, new_ss, ss_base, ss_limit, ss_attr);
    hflags = hflags_long_mode(hflags, (ss_attr >> SA_DPL_SHIFT) & 3);
    memcpy(d + UCX_HFLAGS, &hflags, 4);
    e->ctx_restore(uc, e->ctx);
    e->reg_write(uc, UC_X86_REG_RFLAGS, &out_rflags);
    e->reg_write(uc, UC_X86_REG_RSP, &new_rsp);
    s->ssp = ssp;
    if (new_cpl != 0)
        events_new_cpl(e, new_cpl);
    e->irets++;
    e->reg_write(uc, UC_X86_REG_RIP, &new_rip); /* leaves the block before the IRETQ runs */
    return;
hand_over:
    event_hand_over(e, uc, rip);
}

/* ------------------------------------------------------------------ page faults
 *
 * #PF delivery through a 64-bit interrupt/trap gate without IST to CPL 0, from CPL 0 or CPL 3
 * [SDM Vol. 3 §6.14; cetvm.cpu.events.deliver_64 with cetvm.cpu.cet.far_transfers.ssp_on_event],
 * as UC_HOOK_INTR (Unicorn stops at the faulting instruction with CR2 and its error code set).
 * It replaces Python's UC_HOOK_INTR handler (cetvm.cpu.engine_stops.EngineStops.on_interrupt), which it
 * calls for everything else, before changing anything: other vectors, a possible fetch fault
 * (CR2 within 15 bytes of RIP), an error code with bits other than P/W/U, a fault outside the
 * block that ran last or at an instruction boundary the classifier did not record, an exception
 * the VMCS exception bitmap makes exit, IST gates, 32-bit/task gates, a non-flat or not 64-bit
 * handler CS, a frame or shadow-stack frame that does not translate to RAM, supervisor shadow
 * stacks on a CPL 3 -> 0 switch (the supervisor token), an IDT/GDT/TSS read that fails.
 *
 * Budget: the block that ran last was counted when it started; the instructions from the faulting
 * one on did not retire and are taken back (cetvm.cpu.block_hook.BlockHook.retire_before), which needs the
 * instruction boundaries of the block: Python stores its instruction lengths here
 * (cetfast_events_store_bounds) at the first #PF in it that it delivers itself. The error code is the engine's (CPUX86State.error_code), where
 * Python re-derives it with a page walk; both give P/W/U for the accesses the walker knows.
 */
#define BOUNDS_SLOTS 16384u
#define BOUNDS_POOL (1u << 20)
#define GATE_INTERRUPT 0xE
#define GATE_TRAP 0xF
#define RFLAGS_NT (1ull << 14)
#define RFLAGS_VM (1ull << 17)
#define VECTOR_PF 14
#define CR0_WP (1ull << 16)

typedef struct {
    uint64_t addr;
    uint16_t size;
    uint16_t icount;
    uint32_t offset; /* into bounds_pool: icount instruction lengths */
} bounds_t;

static void bounds_clear(cet_events_t *e)
{
    memset(e->bounds, 0, BOUNDS_SLOTS * sizeof(bounds_t));
    e->bounds_used = 0;
    e->bounds_count = 0;
}

/* Record the instruction lengths of a classified block (0, or -1 out of memory). */
int cetfast_events_store_bounds(void *p, uint64_t addr, uint32_t size, const uint8_t *lengths, uint32_t icount)
{
    cet_events_t *e = p;
    if (!e->bounds) {
        e->bounds = calloc(BOUNDS_SLOTS, sizeof(bounds_t));
        e->bounds_pool = malloc(BOUNDS_POOL);
        if (!e->bounds || !e->bounds_pool)
            return -1;
    }
    if (icount == 0 || icount > 0xFFFF || size > 0xFFFF)
        return 0;
    if (e->bounds_used + icount > BOUNDS_POOL || e->bounds_count >= BOUNDS_SLOTS / 2)
        bounds_clear(e);
    bounds_t *t = e->bounds;
    uint64_t i = block_hash(addr) & (BOUNDS_SLOTS - 1);
    while (t[i].size && t[i].addr != addr)
        i = (i + 1) & (BOUNDS_SLOTS - 1);
    if (!t[i].size)
        e->bounds_count++;
    t[i] = (bounds_t){addr, (uint16_t)size, (uint16_t)icount, e->bounds_used};
    memcpy(e->bounds_pool + e->bounds_used, lengths, icount);
    e->bounds_used += icount;
    return 0;
}

/* Instructions of block ``b`` before linear ``lin`` (an instruction boundary in it), or -1. */
static int instructions_before(const cet_events_t *e, const cet_block_t *b, uint64_t lin)
{
    const bounds_t *t = e->bounds;
    if (!t)
        return -1;
    uint64_t i = block_hash(b->addr) & (BOUNDS_SLOTS - 1);
    while (t[i].size && t[i].addr != b->addr)
        i = (i + 1) & (BOUNDS_SLOTS - 1);
    if (!t[i].size || t[i].size != b->size || t[i].icount != b->icount)
        return -1;
    uint64_t at = b->addr;
    const uint8_t *len = e->bounds_pool + t[i].offset;
    for (int n = 0; n < t[i].icount; n++) {
        if (at == lin)
            return n;
        at += len[n];
    }
    return -1;
}

/* Deliver the #PF natively; 1 if done, 0 if nothing was changed (Python decides). */
static int deliver_pf(cet_events_t *e, uc_engine *uc)
{
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    const cet_block_t *b = s->pend;
    uint64_t rip, cr2, rsp, rflags, cr0;
    e->reg_read(uc, UC_X86_REG_RIP, &rip);
    e->reg_read(uc, UC_X86_REG_CR2, &cr2);
    uint64_t lin = rip + s->cs_base;
    if (cr2 - lin < 15 || b->size == BLOCK_EMPTY || b->icount == 0 || lin < b->addr || lin >= b->addr + b->size)
        return 0;
    int ran = instructions_before(e, b, lin);
    if (ran < 0 || e->ctx_save(uc, e->ctx) != UC_ERR_OK)
        return 0;
    uint8_t *d = (uint8_t *)e->ctx + UCX_DATA;
    uint32_t error, hflags;
    memcpy(&error, d + UCX_ERROR_CODE, 4);
    memcpy(&hflags, d + UCX_HFLAGS, 4);
    unsigned old_cpl = hflags & HF_CPL_MASK;
    if ((error & ~7u) || !(hflags & HF_LMA) || (old_cpl != 0 && old_cpl != 3) || old_cpl != s->cpl)
        return 0;
    /* the gate [deliver_64] */
    uc_x86_mmr idtr = {0}, tr = {0};
    uint64_t lo, hi;
    if (e->reg_read(uc, UC_X86_REG_IDTR, &idtr) != UC_ERR_OK || VECTOR_PF * 16 + 15 > idtr.limit
        || sup_read_u64(f, uc, idtr.base + VECTOR_PF * 16, &lo) < 0
        || sup_read_u64(f, uc, idtr.base + VECTOR_PF * 16 + 8, &hi) < 0)
        return 0;
    uint64_t offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000ull) | ((hi & 0xFFFFFFFFull) << 32);
    uint32_t selector = (lo >> 16) & 0xFFFF, ist = (lo >> 32) & 7, type = (lo >> 40) & 0xF;
    if ((type != GATE_INTERRUPT && type != GATE_TRAP) || !((lo >> 47) & 1) || ist)
        return 0;
    uint32_t cs_attr, cs_limit;
    uint64_t cs_base;
    if (gdt_descriptor(e, uc, selector, &cs_attr, &cs_base, &cs_limit) < 0
        || (cs_attr & (SA_CODE | SA_L | SA_P)) != (SA_CODE | SA_L | SA_P) || ((cs_attr >> SA_DPL_SHIFT) & 3) != 0
        || cs_base != 0)
        return 0;
    /* the stack and the frame */
    e->reg_read(uc, UC_X86_REG_RSP, &rsp);
    uint64_t stack = rsp;
    if (old_cpl != 0) {
        if (e->reg_read(uc, UC_X86_REG_TR, &tr) != UC_ERR_OK || sup_read_u64(f, uc, tr.base + 4, &stack) < 0)
            return 0;
    }
    stack &= ~0xFull;
    uint64_t new_rsp = stack - 48;
    e->reg_read(uc, UC_X86_REG_RFLAGS, &rflags);
    e->reg_read(uc, UC_X86_REG_CR0, &cr0);
    uint32_t old_cs, old_ss;
    uint64_t old_cs_base;
    memcpy(&old_cs, d + UCX_SEGS + SEG_CS * UCX_SEG_SIZE, 4);
    memcpy(&old_ss, d + UCX_SEGS + SEG_SS * UCX_SEG_SIZE, 4);
    memcpy(&old_cs_base, d + UCX_SEGS + SEG_CS * UCX_SEG_SIZE + 8, 8);
    uint64_t frame[6] = {error, rip, old_cs & 0xFFFF, rflags | RFLAGS_RF, rsp, old_ss & 0xFFFF};
    uint8_t *slot[6];
    for (int i = 0; i < 6; i++)
        if (!(slot[i] = sup_host(f, uc, new_rsp + 8 * (uint64_t)i, 1, (cr0 & CR0_WP) != 0)))
            return 0;
    /* ssp_on_event (no IST, to CPL 0) */
    uint64_t ssp = s->ssp, new_ssp = ssp, s_cet = s->s_cet;
    uint64_t *ss_slots[3] = {NULL, NULL, NULL};
    int sup_shstk = s->cr4_cet && (s->s_cet & CET_SH_STK_EN);
    if (sup_shstk) {
        if (old_cpl != 0 || (ssp & 7))
            return 0; /* the supervisor token of PL0_SSP / a 4-byte alignment pad: Python */
        for (int i = 0; i < 3; i++)
            if (!(ss_slots[i] = ss_slot(f, uc, ssp - 8 * (uint64_t)(i + 1), 0)))
                return 0;
        new_ssp = ssp - 24;
    }
    /* commit: nothing below fails */
    for (int i = 0; i < 6; i++)
        memcpy(slot[i], &frame[i], 8);
    if (sup_shstk) {
        uint64_t lip = old_cs_base + rip;
        *ss_slots[0] = old_cs & 0xFFFF;
        *ss_slots[1] = lip;
        *ss_slots[2] = ssp;
    }
    if (old_cpl == 3 && s->cr4_cet && (s->u_cet & CET_SH_STK_EN))
        e->pl_ssp[3] = la_adjust48(ssp);
    if (s->cr4_cet && (s_cet & CET_ENDBR_EN))
        s_cet = (s_cet | CET_TRACKER) & ~CET_SUPPRESS;
    ctx_segment(d, SEG_CS, selector & ~3u, cs_base, cs_limit, cs_attr);
    if (old_cpl != 0)
        ctx_segment(d, SEG_SS, 0, 0, 0, 0);
    hflags = hflags_long_mode(hflags, 0);
    memcpy(d + UCX_HFLAGS, &hflags, 4);
    int32_t none = -1;
    memcpy(d + UCX_OLD_EXCEPTION, &none, 4);
    e->ctx_restore(uc, e->ctx);
    uint64_t clear = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM | (type == GATE_INTERRUPT ? RFLAGS_IF : 0);
    uint64_t new_rflags = rflags & ~clear;
    e->reg_write(uc, UC_X86_REG_RSP, &new_rsp);
    e->reg_write(uc, UC_X86_REG_RFLAGS, &new_rflags);
    /* the faulting instruction and the rest of its block did not retire; no terminator pending */
    s->budget_left += b->icount - ran;
    pending_none(f, b->addr);
    s->ssp = new_ssp;
    s->s_cet = s_cet;
    if (old_cpl != 0)
        events_new_cpl(e, 0);
    else
        refresh_fast(f);
    e->pf_cr2 = cr2;
    e->pf_delivered++;
    e->faults++;
    e->reg_write(uc, UC_X86_REG_RIP, &offset);
    return 1;
}

/* UC_HOOK_INTR: #PF natively when it can, else Python's handler. */
void cetfast_intr_hook(uc_engine *uc, uint32_t intno, void *user_data)
{
    cet_events_t *e = user_data;
    if (intno == VECTOR_PF && events_usable(e) && !(e->exception_bitmap & (1u << VECTOR_PF)) && deliver_pf(e, uc))
        return;
    e->slow_calls++;
    e->slow_intr(uc, intno, NULL);
}

void cetfast_events_set_slow_intr(void *p, void *fn) { ((cet_events_t *)p)->slow_intr = fn; }

/* ------------------------------------------------------------------ Unicorn's exit translations
 *
 * Unicorn 2.1.4 ends every uc_emu_start by invalidating, for every address in its exit set, the
 * translation block covering the byte before it (resume_all_vcpus → uc_exit_invalidate_iter →
 * uc->uc_invalidate_tb(uc, exit - 1, 1)), so that a later run may *execute* the instruction at
 * an exit. cetvm never does: an exit address holds an instruction cetvm emulates, and whenever
 * cetvm removes an address from the exit set it drops the affected translations itself
 * (cetvm.cpu.vcpu: ranges of at least two bytes). With thousands of exits (a Linux guest) that
 * invalidation — a page walk and a retranslation per exit per run — was the largest cost of an
 * exit. cetvm installs a filter in front of uc->uc_invalidate_tb that drops exactly those
 * one-byte requests; every other caller (memory map/unmap, UC_CTL_TB_REMOVE_CACHE of two bytes
 * or more) reaches Unicorn's function unchanged. The field's offset is Unicorn 2.1.4's
 * struct uc_struct layout; cetvm.cpu.native.loader checks it by a probe before relying on it. */
typedef void (*uc_invalidate_tb_fn)(void *uc, uint64_t start, size_t len);

static uc_invalidate_tb_fn unicorn_invalidate_tb; /* the same static function for every instance */
static uint64_t probe_start, probe_len;            /* the last request that reached the filter */

static void invalidate_tb_filtered(void *uc, uint64_t start, size_t len)
{
    probe_start = start;
    probe_len = len;
    if (len == 1)
        return; /* resume_all_vcpus' post-run invalidation of an exit's block */
    unicorn_invalidate_tb(uc, start, len);
}

/* Put the filter into the uc_struct field at ``offset``. 0 on success (or already there),
 * -1 if the field holds a function other than the one an earlier instance held. */
int cetfast_filter_exit_invalidation(void *uc, uint64_t offset)
{
    uc_invalidate_tb_fn *slot = (uc_invalidate_tb_fn *)((char *)uc + offset);
    if (*slot == invalidate_tb_filtered)
        return 0;
    if (unicorn_invalidate_tb && *slot != unicorn_invalidate_tb)
        return -1;
    unicorn_invalidate_tb = *slot;
    *slot = invalidate_tb_filtered;
    return 0;
}

/* Take the filter out again (the probe failed: the offset is not that field). */
void cetfast_unfilter_exit_invalidation(void *uc, uint64_t offset)
{
    uc_invalidate_tb_fn *slot = (uc_invalidate_tb_fn *)((char *)uc + offset);
    if (*slot == invalidate_tb_filtered)
        *slot = unicorn_invalidate_tb;
}

/* The last (start, len) the filter saw: the loader's probe. */
void cetfast_filter_probe(uint64_t *start, uint64_t *len)
{
    *start = probe_start;
    *len = probe_len;
}

/* ------------------------------------------------------------------ SERIALIZE
 *
 * SERIALIZE (NP 0F 01 E8) [SDM Vol. 2B SERIALIZE] changes no architectural state; Unicorn 2.1.4
 * does not decode it and raises #UD, which reaches the UC_HOOK_INSN_INVALID hooks before any
 * interrupt hook. This one (registered first, only when the host model has SERIALIZE) retires
 * it where it stands: RIP past it, emulation goes on — Linux serializes with it after every
 * text patch, on every CPU. The instruction was counted with its block (it ends the block), so
 * nothing is counted here. Anything else — prefixes, another #UD, RFLAGS.TF (the single-step
 * trap), a mode other than 64-bit — returns 0 and Python decides (cetvm.cpu.emulate.serialize
 * is the reference). */

void cetfast_enable_serialize(void *p, void *vmem_read)
{
    cetfast_t *f = p;
    f->vmem_read = (vmem_read_fn)vmem_read;
}

uint64_t cetfast_serialized(void *p) { return ((cetfast_t *)p)->serialized; }

bool cetfast_invalid_insn(uc_engine *uc, void *user_data)
{
    cetfast_t *f = user_data;
    uint64_t rip, rflags;
    uint8_t code[3];
    if (!f->vmem_read || !f->s.long_mode || f->s.cs_base)
        return false;
    if (f->reg_read(uc, UC_X86_REG_RIP, &rip) != UC_ERR_OK || f->reg_read(uc, UC_X86_REG_RFLAGS, &rflags) != UC_ERR_OK)
        return false;
    if (rflags & RFLAGS_TF)
        return false;
    if (f->vmem_read(uc, rip, UC_PROT_EXEC, code, sizeof(code)) != UC_ERR_OK)
        return false;
    if (code[0] != 0x0F || code[1] != 0x01 || code[2] != 0xE8)
        return false;
    rip += sizeof(code);
    f->reg_write(uc, UC_X86_REG_RIP, &rip);
    f->serialized++;
    return true;
}

/* ------------------------------------------------------------------ CMPXCHG8B / CMPXCHG16B flags
 *
 * QEMU 5.0's translator (Unicorn 2.1.4) keeps the arithmetic flags lazily: the last flag-setting
 * operation (cc_op) and its operands (cc_src, cc_dst), with cc_op stored to the CPU state only
 * when something needs it. The CMPXCHG8B/CMPXCHG16B helpers compute ZF on top of the flags of
 * the *stored* cc_op, and the translator does not store the pending one before calling them,
 * as it does for every other helper that reads the flags: the stored one is the last of an
 * earlier block (wrong CF/PF/AF/SF/OF), or, after an engine run starts (x86_cpu_exec_enter) and
 * after every RFLAGS write through uc_reg_write, "the flags are cc_src" — and an ADD/SUB
 * earlier in the same block left its operand in cc_src: the helper takes that operand as
 * RFLAGS, any bit, RFLAGS.VM too, which the end of the run then makes the CPU's (the Linux
 * guest's slab allocator: PUSHF #GP in virtual-8086 "mode").
 *
 * cetvm puts a UC_HOOK_CODE on each CMPXCHG8B/16B it classifies (cetvm.cpu.flag_sync.FlagSync).
 * A code hook makes the translator store the pending cc_op in front of the instruction (it does
 * whenever cc_op changed since the block started), so RFLAGS reads right here; writing it back
 * stores "the flags are cc_src" with cc_src the flags, which is what the helper reads next. */
void cetfast_flags_hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data)
{
    (void)address, (void)size;
    cetfast_t *f = user_data;
    uint64_t rflags;
    if (f->reg_read(uc, UC_X86_REG_RFLAGS, &rflags) == UC_ERR_OK)
        f->reg_write(uc, UC_X86_REG_RFLAGS, &rflags);
}

/* ------------------------------------------------------------------ exit-point instructions
 *
 * An engine run stops in front of every instruction cetvm emulates (an exit point); Python then
 * decodes and emulates it and starts the engine again — some 50 us a stop, and a Linux guest
 * makes tens of thousands of them (each character of the serial console: an IN from the UART's
 * line-status register and an OUT to its transmit register; each context switch: a MOV to CR3).
 * cetfast_run() runs the engine and, when it stopped cleanly in front of one of these in the
 * plain case, does what Python would do here and starts it again:
 *
 *   - OUT imm8/DX, AL to a port of a coalesced PIO zone (KVM's coalesced_mmio_write, the VM exit
 *     KVM handles in the kernel): the write goes into ``writes``, which the KVM layer moves into
 *     the VM's ring, in order, after the run; no room left → Python's path (an exit);
 *   - IN AL, imm8/DX from a port with a published value (cetvm's read-only PIO registers, see
 *     cetvm.kvm.api.KvmVm.set_pio_read_value): AL gets it;
 *   - MOV to CR3 from a GPR (cetvm.cpu.emulate.mov_to_cr): the write itself is Python's
 *     ``cr3_write`` callback (Vcpu.write_cr, the one place that loads CR3) when CR3-load exiting
 *     is off;
 *   - MOV CR8, r64 (REX.R, ModRM.reg 0; cetvm.cpu.emulate.mov_to_cr): CR8 is the engine's
 *     env->v_tpr with HF2_VINTR set in env->hflags2 (cetvm.cpu.registers.Registers.cr8, offsets
 *     of cetvm.cpu.uc_context); a value with bits 63:4 set is Python's #GP.
 *   - CPUID and VMCALL (cetvm.kvm.vcpu_run.handle_cpuid / handle_vmcall): KVM's answers through
 *     the hypervisor's callbacks, exits that cost guest time (see exit_fastpath).
 *
 * Only at CPL 0 in 64-bit mode, with RFLAGS.TF clear (the single-step trap is Python's), without
 * prefixes (REX only for MOV), and only when the stop is one Python would take to the same
 * place: the run ended without an error, nothing was handed to Python in it (no interrupt for
 * Python's handler, no hand-over, no error in a callback — a block classification that added
 * exits stops at its block's start, where Python would emulate the same instruction), no
 * budget stop, budget left, no external interrupt waiting in the CPU, no interrupt- or
 * NMI-window exiting (the hypervisor waits to inject one: each VM entry after an exit checks
 * the window, so the guest must re-enter where it would have — and is exactly as after an
 * exit the Python path takes), the CPL unchanged by the native events, and the pending
 * terminator of the block that ran last has nothing to do at this address (as
 * BlockHook.apply_pending_terminator would find). Each such instruction retires one budget
 * instruction; IN/OUT count as VM exits KVM handled (``pio_exits``). Everything else returns to
 * Python, which stays the reference (cetvm.cpu.emulate.port_io / mov_to_cr).
 * ------------------------------------------------------------------------------------- */
/* Primary processor-based VM-execution controls [SDM Vol. 3C 25.6.2; cetvm.arch.vmx.CpuBasedControls]. */
#define VMX_INTERRUPT_WINDOW_EXITING (1u << 2)
#define VMX_CR3_LOAD_EXITING (1u << 15)
#define VMX_NMI_WINDOW_EXITING (1u << 22)
#define EXIT_PIO_ZONES 8
#define EXIT_PIO_READS 8
#define EXIT_PIO_WRITES 169 /* a coalesced ring's room (cetvm.kvm.coalesced_mmio) */

typedef uc_err (*emu_start_fn)(uc_engine *, uint64_t, uint64_t, uint64_t, size_t);

/* Mirrored by cetvm.cpu.native.loader.ExitInsnState. */
typedef struct {
    uint32_t enabled;        /* Python: port I/O may be handled here (KVM: not while running L2) */
    uint32_t cpu_based;      /* Python, before each run: the VMCS's primary processor-based controls */
    uint32_t tpr_threshold;  /* Python, before each run: the VMCS's TPR threshold (MOV to CR8 below it: Python's) */
    uint32_t zone_count;
    uint32_t read_count;
    uint16_t zone_lo[EXIT_PIO_ZONES]; /* coalesced PIO zones [lo, hi) */
    uint32_t zone_hi[EXIT_PIO_ZONES];
    uint16_t read_port[EXIT_PIO_READS];
    uint8_t read_value[EXIT_PIO_READS];
    uint32_t room;           /* Python: writes the KVM ring can still take */
    uint32_t write_count;    /* entries in ``writes`` (Python empties it) */
    uint32_t write_port[EXIT_PIO_WRITES];
    uint32_t write_data[EXIT_PIO_WRITES];
    uint64_t pio_exits;      /* statistics: IN/OUT handled here */
    uint64_t cr3_writes;     /* statistics: MOVs to CR3 handled here */
    uint64_t runs;           /* statistics: engine restarts saved */
    uint64_t cr8_writes;     /* statistics: MOVs to CR8 handled here */
    uint8_t *env;            /* Python: the engine's CPUX86State (MOV to CR8), NULL: not here */
    uint32_t fastpath_enabled; /* Python, before each run: CPUID and VMCALL may be answered here
                                  (KVM: not while L2 runs) */
    uint32_t exit_charge;    /* Python: the guest time of such an exit, in budget instructions */
    uint64_t cpuid_exits;    /* statistics: CPUIDs answered here (each charged exit_charge) */
    uint64_t vmcall_exits;   /* statistics: VMCALLs answered here (each charged exit_charge) */
    int (*cpuid)(uint32_t leaf, uint32_t subleaf, uint32_t *out); /* Python: KVM's answer; 0 on success */
    int (*vmcall)(uint64_t nr, uint64_t *rax); /* Python: KVM's hypercall result; 0 on success */
    /* private */
    int (*cr3_write)(uint64_t value); /* Python: Vcpu.write_cr(3, value); 0 on success */
    emu_start_fn emu_start;
    vmem_read_fn vmem_read;
} cet_exit_insns_t;

uint64_t cetfast_exit_insns_size(void) { return sizeof(cet_exit_insns_t); }

static cet_exit_insns_t *exit_insns_of(cet_events_t *e) { return e->exit_insns; }

/* Python gives the state (its memory) and the functions the loop calls. */
void cetfast_events_set_exit_insns(void *p, void *state, void *emu_start, void *vmem_read, void *cr3_write)
{
    cet_events_t *e = p;
    cet_exit_insns_t *x = state;
    x->emu_start = (emu_start_fn)emu_start;
    x->vmem_read = (vmem_read_fn)vmem_read;
    x->cr3_write = (int (*)(uint64_t))cr3_write;
    e->exit_insns = x;
}

static const int gpr_ids[16] = {
    UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX, UC_X86_REG_RSP, UC_X86_REG_RBP,
    UC_X86_REG_RSI, UC_X86_REG_RDI, UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
    UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
};

static int pio_zone_holds(const cet_exit_insns_t *x, uint32_t port)
{
    for (uint32_t i = 0; i < x->zone_count && i < EXIT_PIO_ZONES; i++)
        if (port >= x->zone_lo[i] && port + 1 <= x->zone_hi[i])
            return 1;
    return 0;
}

static int pio_read_value(const cet_exit_insns_t *x, uint32_t port, uint8_t *value)
{
    for (uint32_t i = 0; i < x->read_count && i < EXIT_PIO_READS; i++)
        if (x->read_port[i] == port) {
            *value = x->read_value[i];
            return 1;
        }
    return 0;
}

/* The byte port I/O at ``rip`` (``code``: its bytes): 1 if done here. */
static int exit_port_io(cet_events_t *e, cet_exit_insns_t *x, uc_engine *uc, const uint8_t *code, uint64_t *rip)
{
    uint8_t op = code[0];
    unsigned len = (op == 0xE4 || op == 0xE6) ? 2 : 1;
    uint64_t rax, rdx;
    if (!x->enabled || e->reg_read(uc, UC_X86_REG_RAX, &rax) != UC_ERR_OK)
        return 0;
    uint32_t port = code[1];
    if (len == 1) {
        if (e->reg_read(uc, UC_X86_REG_RDX, &rdx) != UC_ERR_OK)
            return 0;
        port = (uint32_t)rdx & 0xFFFFu;
    }
    if (op == 0xE6 || op == 0xEE) { /* OUT */
        if (!pio_zone_holds(x, port) || x->write_count >= x->room || x->write_count >= EXIT_PIO_WRITES)
            return 0;
        x->write_port[x->write_count] = port;
        x->write_data[x->write_count] = (uint32_t)rax & 0xFFu;
        x->write_count++;
    } else { /* IN */
        uint8_t value;
        if (!pio_read_value(x, port, &value))
            return 0;
        rax = (rax & ~0xFFull) | value;
        e->reg_write(uc, UC_X86_REG_RAX, &rax);
    }
    x->pio_exits++;
    *rip += len;
    return 1;
}

/* MOV to CR3 at ``rip`` (``code``: its bytes, an optional REX first): 1 if done here. */
static int exit_mov_to_cr3(cet_events_t *e, cet_exit_insns_t *x, uc_engine *uc, const uint8_t *code, uint64_t *rip)
{
    unsigned rex = 0, at = 0;
    if ((code[0] & 0xF0u) == 0x40u)
        rex = code[at++];
    if (code[at] != 0x0F || code[at + 1] != 0x22 || (x->cpu_based & VMX_CR3_LOAD_EXITING) || !x->cr3_write)
        return 0;
    uint8_t modrm = code[at + 2];
    if ((modrm >> 6) != 3 || ((modrm >> 3) & 7) != 3 || (rex & 0x4u)) /* CR3 only (REX.R: CR11, #UD) */
        return 0;
    unsigned reg = (modrm & 7u) | ((rex & 1u) << 3);
    uint64_t value;
    if (e->reg_read(uc, gpr_ids[reg], &value) != UC_ERR_OK || x->cr3_write(value) != 0)
        return 0;
    x->cr3_writes++;
    *rip += at + 3;
    return 1;
}

/* Unicorn 2.1.4's CPUX86State: hflags2 (HF2_VINTR_MASK) and v_tpr (cetvm.cpu.uc_context). */
#define ENV_HFLAGS2 180
#define ENV_HF2_VINTR (1u << 3)
#define ENV_V_TPR 5556

/* MOV CR8, r64 at ``rip`` (``code``: its 4 bytes, REX first): 1 if done here. */
static int exit_mov_to_cr8(cet_events_t *e, cet_exit_insns_t *x, uc_engine *uc, const uint8_t *code, uint64_t *rip)
{
    unsigned rex = code[0];
    uint8_t modrm = code[3];
    uint64_t value;
    uint32_t hflags2;
    if (!x->env || (rex & 0xF0u) != 0x40u || !(rex & 0x4u) || code[1] != 0x0F || code[2] != 0x22
        || (modrm >> 6) != 3 || ((modrm >> 3) & 7) != 0) /* REX.R and ModRM.reg 0: CR8 */
        return 0;
    if (e->reg_read(uc, gpr_ids[(modrm & 7u) | ((rex & 1u) << 3)], &value) != UC_ERR_OK || (value & ~0xFull)
        || value < (x->tpr_threshold & 0xFu))
        return 0; /* bits 63:4 set: Python's #GP; below the TPR threshold: Python's trap-like exit */
    x->env[ENV_V_TPR] = (uint8_t)value;
    memcpy(&hflags2, x->env + ENV_HFLAGS2, sizeof(hflags2));
    hflags2 |= ENV_HF2_VINTR;
    memcpy(x->env + ENV_HFLAGS2, &hflags2, sizeof(hflags2));
    x->cr8_writes++;
    *rip += 4;
    return 1;
}

/* CPUID (0F A2) and VMCALL (0F 01 C1), no prefix, at ``rip``: exits KVM handles in the kernel
 * (kvm_emulate_cpuid, kvm_emulate_hypercall), answered here as KVM's exit fastpath answers an exit
 * without going back to its run loop — by the hypervisor's callbacks, the same functions as its
 * exit handlers. Each is an exit that costs guest time: ``exit_charge`` budget instructions
 * count against the run's budget (which the vCPU takes back from its retired count after the
 * run), so the TSC a guest reads after it and the run's end are those of the exit Python takes.
 * Not enough budget for the charge, or a callback that declines (a hypercall for userspace):
 * Python's exit. */
static int exit_fastpath(cet_events_t *e, cet_exit_insns_t *x, uc_engine *uc, const uint8_t *code, uint64_t *rip)
{
    static const int cpuid_regs[4] = {UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX};
    cet_shared_t *s = &e->f->s;
    uint64_t rax, rcx;
    if (code[0] != 0x0F || !x->fastpath_enabled || s->budget_left <= (int64_t)x->exit_charge
        || e->reg_read(uc, UC_X86_REG_RAX, &rax) != UC_ERR_OK)
        return 0;
    if (code[1] == 0xA2 && x->cpuid) {
        uint32_t out[4];
        if (e->reg_read(uc, UC_X86_REG_RCX, &rcx) != UC_ERR_OK || x->cpuid((uint32_t)rax, (uint32_t)rcx, out) != 0)
            return 0;
        for (int i = 0; i < 4; i++) {
            uint64_t value = out[i]; /* zero-extended */
            e->reg_write(uc, cpuid_regs[i], &value);
        }
        x->cpuid_exits++;
        *rip += 2;
    } else if (code[1] == 0x01 && code[2] == 0xC1 && x->vmcall) {
        if (x->vmcall(rax, &rax) != 0)
            return 0;
        e->reg_write(uc, UC_X86_REG_RAX, &rax);
        x->vmcall_exits++;
        *rip += 3;
    } else {
        return 0;
    }
    s->budget_left -= x->exit_charge;
    return 1;
}

/* The instruction at the stop, if it is one done here: 1 and RIP past it, retired. */
static int exit_insn(cet_events_t *e, cet_exit_insns_t *x, uc_engine *uc)
{
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    uint64_t rip, rflags;
    uint8_t code[4] = {0};
    if (s->cpl != 0 || !s->long_mode || s->cs_base || s->budget_left <= 0)
        return 0;
    if (e->reg_read(uc, UC_X86_REG_RIP, &rip) != UC_ERR_OK || e->reg_read(uc, UC_X86_REG_RFLAGS, &rflags) != UC_ERR_OK
        || (rflags & (RFLAGS_TF | RFLAGS_RF))) /* Python's: the single-step trap, RF cleared at retirement */
        return 0;
    if (s->pend->kbit & s->act_kinds) /* the pending terminator has work at this address: Python */
        return 0;
    /* the shortest form is 1 byte: read what the page holds (instructions here never cross it) */
    uint64_t avail = PAGE_SIZE - (rip & (PAGE_SIZE - 1));
    if (x->vmem_read(uc, rip, UC_PROT_EXEC, code, avail < sizeof(code) ? avail : sizeof(code)) != UC_ERR_OK)
        return 0;
    uint64_t next = rip;
    int done;
    switch (code[0]) {
    case 0xE4: case 0xE6: case 0xEC: case 0xEE:
        done = exit_port_io(e, x, uc, code, &next);
        break;
    default:
        done = exit_mov_to_cr3(e, x, uc, code, &next) || exit_mov_to_cr8(e, x, uc, code, &next)
               || exit_fastpath(e, x, uc, code, &next);
        break;
    }
    if (!done)
        return 0;
    pending_none(f, next); /* BlockHook.apply_pending_terminator found nothing to do; blocks.prev = None */
    e->reg_write(uc, UC_X86_REG_RIP, &next);
    s->budget_left--;
    return 1;
}

/* One engine run from ``rip`` as Uc.emu_start(rip, 0), going on past the exit-point instructions
 * done here (see above). Returns Unicorn's status of the last run. */
int cetfast_run(void *p, uc_engine *uc, uint64_t rip)
{
    cet_events_t *e = p;
    cetfast_t *f = e->f;
    cet_shared_t *s = &f->s;
    cet_exit_insns_t *x = exit_insns_of(e);
    uint64_t cr2 = 0;
    if (!x)
        return UC_ERR_ARG;
    e->reg_read(uc, UC_X86_REG_CR2, &cr2);
    for (;;) {
        uint64_t errors = s->callback_errors, handovers = e->handovers + s->handovers;
        uint64_t slow = e->slow_calls, mode_changes = e->mode_changes;
        uc_err err = x->emu_start(uc, rip, 0, 0, 0);
        if (err != UC_ERR_OK)
            return err;
        if (s->callback_errors != errors || e->handovers + s->handovers != handovers
            || e->slow_calls != slow || e->mode_changes != mode_changes || s->handover || e->handover
            || s->budget_stop || e->irq_pending
            || (x->cpu_based & (VMX_INTERRUPT_WINDOW_EXITING | VMX_NMI_WINDOW_EXITING)) || !exit_insn(e, x, uc))
            return UC_ERR_OK;
        /* CR2 as the guest has it (cetvm.cpu.uc_context.cr2_kept): the last #PF delivered here */
        uint64_t guest_cr2 = e->pf_delivered ? e->pf_cr2 : cr2;
        e->reg_write(uc, UC_X86_REG_CR2, &guest_cr2);
        if (e->reg_read(uc, UC_X86_REG_RIP, &rip) != UC_ERR_OK || s->budget_left <= 0)
            return UC_ERR_OK;
        x->runs++;
    }
}
