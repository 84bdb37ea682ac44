/*
 * shstk_rop: a return-oriented attack on the normal stack is stopped by the shadow stack.
 *
 * rop_victim overwrites its own return address with rop_gadget and returns. With the shadow
 * stack on, the RET finds a different address on the shadow stack: #CP(near-ret), delivered by
 * Linux as SIGSEGV with si_code SEGV_CPERR. With it off, the attack "works" and the gadget runs
 * (exit status 0x60) - the control that shows the attack is real. WRSS (ARCH_SHSTK_WRSS) may
 * change the shadow stack: a mismatch it creates is caught the same way, and writing the gadget
 * to both stacks lets it through, as the architecture says. An ordinary store to the shadow stack
 * faults (SIGSEGV, SEGV_ACCERR); WRSS while not enabled is #UD (SIGILL, ILL_ILLOPN).
 */
#include "cet_user.h"

/* Exit status of rop_gadget (exit_group from the gadget: the hijack succeeded). */
#define GADGET_RAN 0x60

void rop_victim(void);
void rop_victim_shstk_only(void);
void rop_victim_both_stacks(void);

asm(".text\n"
    "rop_gadget:\n"
    "	endbr64\n"
    "	movl $231, %eax\n"		/* exit_group(GADGET_RAN) */
    "	movl $0x60, %edi\n"
    "	syscall\n"
    "	hlt\n"
    /* Replace the return address on the normal stack only. */
    ".globl rop_victim\n"
    ".type rop_victim, @function\n"
    "rop_victim:\n"
    "	endbr64\n"
    "	leaq rop_gadget(%rip), %rax\n"
    "	movq %rax, (%rsp)\n"
    "	ret\n"
    /* Replace it on the shadow stack only (WRSS). */
    ".globl rop_victim_shstk_only\n"
    ".type rop_victim_shstk_only, @function\n"
    "rop_victim_shstk_only:\n"
    "	endbr64\n"
    "	xorl %eax, %eax\n"
    "	rdsspq %rax\n"
    "	leaq rop_gadget(%rip), %rcx\n"
    "	wrssq %rcx, (%rax)\n"
    "	ret\n"
    /* Replace it on both stacks (WRSS + store): the RET goes to the gadget without a #CP. */
    ".globl rop_victim_both_stacks\n"
    ".type rop_victim_both_stacks, @function\n"
    "rop_victim_both_stacks:\n"
    "	endbr64\n"
    "	xorl %eax, %eax\n"
    "	rdsspq %rax\n"
    "	leaq rop_gadget(%rip), %rcx\n"
    "	wrssq %rcx, (%rax)\n"
    "	movq %rcx, (%rsp)\n"
    "	ret\n");

static void child_rop(void)
{
	child_catch(SIGSEGV);
	rop_victim();
	_exit(1);		/* the RET neither faulted nor reached the gadget */
}

static void child_rop_unprotected(void)
{
	if (cet_arch_prctl(ARCH_SHSTK_DISABLE, ARCH_SHSTK_SHSTK))
		_exit(2);
	rop_victim();
	_exit(1);
}

static void child_store_to_shstk(void)
{
	volatile unsigned long *top = (volatile unsigned long *)cet_ssp();

	child_catch(SIGSEGV);
	*top = 0;
	_exit(1);
}

static void child_wrss_disabled(void)
{
	unsigned long *top = (unsigned long *)cet_ssp();

	child_catch(SIGILL);
	cet_wrss(top, *top);
	_exit(1);
}

static void child_wrss_mismatch(void)
{
	child_enable_wrss();
	child_catch(SIGSEGV);
	rop_victim_shstk_only();
	_exit(1);
}

static void child_wrss_both(void)
{
	child_enable_wrss();
	rop_victim_both_stacks();
	_exit(1);
}

int main(void)
{
	cet_enable_or_skip();
	tap_plan(6);

	tap_child_exit(child_rop, CHILD_CAUGHT(SEGV_CPERR),
		       "overwritten return address: SIGSEGV with si_code SEGV_CPERR");
	tap_child_exit(child_rop_unprotected, GADGET_RAN,
		       "the same attack with the shadow stack disabled reaches the gadget");
	tap_child_exit(child_store_to_shstk, CHILD_CAUGHT(SEGV_ACCERR),
		       "an ordinary store to the shadow stack: SIGSEGV with SEGV_ACCERR");
	tap_child_exit(child_wrss_disabled, CHILD_CAUGHT(ILL_ILLOPN),
		       "WRSS without ARCH_SHSTK_WRSS: SIGILL (#UD)");
	tap_child_exit(child_wrss_mismatch, CHILD_CAUGHT(SEGV_CPERR),
		       "return address changed on the shadow stack only (WRSS): SEGV_CPERR");
	tap_child_exit(child_wrss_both, GADGET_RAN,
		       "changed on both stacks (WRSS + store): the RET follows them");
	tap_done();
}
