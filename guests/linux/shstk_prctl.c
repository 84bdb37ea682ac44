/*
 * shstk_prctl: the arch_prctl(ARCH_SHSTK_*) interface of Linux user shadow stacks
 * (Linux shstk_prctl()): ENABLE, STATUS, DISABLE, LOCK, UNLOCK from the task
 * itself, WRSS on and off, and the error codes for requests the kernel refuses.
 */
#include "cet_user.h"

/* A child that disables the shadow stack: STATUS reads 0, RDSSP reads 0, returns still work. */
static void child_disable(void)
{
	if (cet_arch_prctl(ARCH_SHSTK_DISABLE, ARCH_SHSTK_SHSTK))
		_exit(1);
	if (cet_status() != 0)
		_exit(2);
	if (cet_ssp() != 0)
		_exit(3);
	if (cet_nested_calls(8) != 9)
		_exit(4);
	/* WRSS needs the shadow stack: EPERM without it (wrss_control()). */
	if (cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_WRSS) != -EPERM)
		_exit(5);
}

/* A child that locks SHSTK: it can neither disable nor re-enable it, nor unlock itself. */
static void child_lock(void)
{
	if (cet_arch_prctl(ARCH_SHSTK_LOCK, ARCH_SHSTK_SHSTK))
		_exit(1);
	if (cet_arch_prctl(ARCH_SHSTK_DISABLE, ARCH_SHSTK_SHSTK) != -EPERM)
		_exit(2);
	if (cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_SHSTK) != -EPERM)
		_exit(3);
	/* UNLOCK is for ptrace (CRIU) only: from the task itself a locked feature stays EPERM. */
	if (cet_arch_prctl(ARCH_SHSTK_UNLOCK, ARCH_SHSTK_SHSTK) != -EPERM)
		_exit(4);
	if (cet_status() != ARCH_SHSTK_SHSTK || cet_ssp() == 0)
		_exit(5);
	/* WRSS is not locked: it can still be enabled. */
	if (cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_WRSS))
		_exit(6);
}

/* A child that locks WRSS off: enabling it is EPERM. */
static void child_lock_wrss(void)
{
	if (cet_arch_prctl(ARCH_SHSTK_LOCK, ARCH_SHSTK_WRSS))
		_exit(1);
	if (cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_WRSS) != -EPERM)
		_exit(2);
	if (cet_status() & ARCH_SHSTK_WRSS)
		_exit(3);
}

int main(void)
{
	unsigned long ssp;
	cet_enable_or_skip();
	tap_plan(12);

	ssp = cet_ssp();
	tap_ok(ssp != 0 && (ssp & 7) == 0, "RDSSP reads an 8-byte aligned SSP after ARCH_SHSTK_ENABLE (0x%lx)", ssp);
	tap_ok(cet_status() == ARCH_SHSTK_SHSTK, "ARCH_SHSTK_STATUS reports SHSTK only (0x%lx)", cet_status());
	tap_ok(cet_nested_calls(64) == 65, "64 nested calls return through the shadow stack");
	tap_ok(cet_ssp() == ssp, "SSP is back where it was after the calls returned");
	tap_ok(cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_SHSTK | ARCH_SHSTK_WRSS) == -EINVAL,
	       "enabling two features in one call is EINVAL");
	tap_ok(cet_arch_prctl(ARCH_SHSTK_ENABLE, 1UL << 5) == -EINVAL, "enabling an unknown feature is EINVAL");

	tap_child_exit(child_disable, 0,
		       "ARCH_SHSTK_DISABLE: status 0, SSP 0, calls still return, WRSS then EPERM");
	tap_child_exit(child_lock, 0,
		       "ARCH_SHSTK_LOCK: disable/enable EPERM, self-UNLOCK EPERM, WRSS still allowed");
	tap_child_exit(child_lock_wrss, 0,
		       "ARCH_SHSTK_LOCK of WRSS: enabling WRSS is EPERM");

	tap_ok(cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_WRSS) == 0 &&
	       cet_status() == (ARCH_SHSTK_SHSTK | ARCH_SHSTK_WRSS),
	       "ARCH_SHSTK_ENABLE of WRSS: STATUS shows SHSTK|WRSS (0x%lx)", cet_status());
	tap_ok(cet_arch_prctl(ARCH_SHSTK_DISABLE, ARCH_SHSTK_WRSS) == 0 && cet_status() == ARCH_SHSTK_SHSTK,
	       "ARCH_SHSTK_DISABLE of WRSS: STATUS shows SHSTK again (0x%lx)", cet_status());
	tap_ok(cet_ssp() == ssp, "SSP unchanged by the WRSS switches");
	tap_done();
}
