/*
 * shstk_map: map_shadow_stack(2) (syscall 453) and switching shadow stacks with RSTORSSP and
 * SAVEPREVSSP (SDM Vol. 1, 17.2.3 "Supervisor Shadow Stack Token" and the restore-token rules of
 * RSTORSSP/SAVEPREVSSP in Vol. 2).
 *
 * With SHADOW_STACK_SET_TOKEN the kernel puts a restore token at the top of the new stack: at
 * top - 8 the value top | 1 (64-bit mode). RSTORSSP on that token makes it the SSP (and marks
 * the token "previous SSP"); SAVEPREVSSP then leaves a restore token on the stack we left, so
 * the same two instructions switch back. Without the token RSTORSSP is #CP (SIGSEGV, SEGV_CPERR).
 */
#include <sys/mman.h>

#include "cet_user.h"

#define STACK_SIZE 0x4000UL

/* RSTORSSP to the token at `token`, then SAVEPREVSSP: SSP = token + 8 on the other stack. */
static ALWAYS_INLINE void switch_shadow_stack(unsigned long *token)
{
	asm volatile("rstorssp (%0)\n\tsaveprevssp" : : "r"(token) : "memory");
}

struct pivot {
	unsigned long ssp_there;	/* SSP right after switching to the new stack */
	unsigned long calls;		/* cet_nested_calls() on the new stack */
	unsigned long ssp_back;		/* SSP after switching back */
	unsigned long ssp_before;	/* SSP before switching */
};

/* Switch to the stack whose restore token is at `token`, call and return there, switch back. */
static NOINLINE void pivot(unsigned long *token, struct pivot *out)
{
	unsigned long here = cet_ssp();

	switch_shadow_stack(token);
	out->ssp_there = cet_ssp();
	out->calls = cet_nested_calls(32);
	switch_shadow_stack((unsigned long *)(here - 8));
	out->ssp_back = cet_ssp();
	out->ssp_before = here;
}

static unsigned long *no_token_top;

static void child_rstorssp_without_token(void)
{
	child_catch(SIGSEGV);
	switch_shadow_stack(no_token_top);
	_exit(1);
}

static unsigned long *store_target;

static void child_store(void)
{
	child_catch(SIGSEGV);
	*(volatile unsigned long *)store_target = 1;
	_exit(1);
}

static int pivot_ok(unsigned long *token, unsigned long top)
{
	struct pivot p;

	pivot(token, &p);
	return p.ssp_there == top && p.calls == 33 && p.ssp_back == p.ssp_before &&
	       *token == (top | SHSTK_TOKEN_64BIT);
}

int main(void)
{
	unsigned long *stack, *plain, top, *token;
	cet_enable_or_skip();
	tap_plan(11);

	errno = 0;
	tap_ok(cet_map_shadow_stack(NULL, STACK_SIZE, 1UL << 1) == MAP_FAILED && errno == EINVAL,
	       "unknown flag: EINVAL");
	errno = 0;
	tap_ok(cet_map_shadow_stack((void *)0x10000, STACK_SIZE, 0) == MAP_FAILED && errno == ERANGE,
	       "an address below 4 GiB: ERANGE");
	errno = 0;
	tap_ok(cet_map_shadow_stack(NULL, 4, SHADOW_STACK_SET_TOKEN) == MAP_FAILED && errno == ENOSPC,
	       "no room for the token (4 bytes): ENOSPC");

	stack = cet_map_shadow_stack(NULL, STACK_SIZE, SHADOW_STACK_SET_TOKEN);
	if (stack == MAP_FAILED) {
		tap_ok(0, "map_shadow_stack(SHADOW_STACK_SET_TOKEN): %s", strerror(errno));
		tap_done();
	}
	top = (unsigned long)stack + STACK_SIZE;
	token = (unsigned long *)(top - 8);
	tap_ok(*token == (top | SHSTK_TOKEN_64BIT), "the restore token at the top reads top|1 (0x%lx at 0x%lx)",
	       *token, top - 8);

	plain = cet_map_shadow_stack(NULL, 0x1000, 0);
	tap_ok(plain != MAP_FAILED && plain[0x1000 / 8 - 1] == 0, "without SET_TOKEN the new stack is all zero");

	store_target = stack;
	tap_child_exit(child_store, CHILD_CAUGHT(SEGV_ACCERR),
		       "an ordinary store to it: SIGSEGV, SEGV_ACCERR");

	tap_ok(pivot_ok(token, top), "RSTORSSP+SAVEPREVSSP to it, 32 calls there, and back; the token is restored");
	tap_ok(pivot_ok(token, top), "the same stack again through the token left by SAVEPREVSSP");
	tap_ok(cet_nested_calls(16) == 17, "calls still return on the original shadow stack");

	if (plain != MAP_FAILED) {
		no_token_top = &plain[0x1000 / 8 - 1];
		tap_child_exit(child_rstorssp_without_token, CHILD_CAUGHT(SEGV_CPERR),
			       "RSTORSSP on a word that is no token: SEGV_CPERR");
	} else {
		tap_skip("RSTORSSP on a word that is no token", "map_shadow_stack without a token failed");
	}
	tap_ok(munmap(stack, STACK_SIZE) == 0, "munmap of a shadow stack");
	tap_done();
}
