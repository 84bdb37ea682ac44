/*
 * cet_user.h - shared helpers of cetvm's static Linux user-space CET tests (guests/linux/).
 *
 * The Linux user shadow-stack ABI (Linux 6.6+, the kernel's x86 "Control-flow Enforcement Technology
 * (CET) Shadow Stack" document):
 *   arch_prctl(ARCH_SHSTK_ENABLE / DISABLE / LOCK / UNLOCK / STATUS, features)
 *   map_shadow_stack(addr, size, SHADOW_STACK_SET_TOKEN)   (syscall 453)
 * A #CP in user mode is delivered as SIGSEGV with si_code SEGV_CPERR.
 *
 * Enabling: the function that enables the shadow stack can never return, because its return
 * address was pushed before the shadow stack existed (the RET would pop an empty shadow stack:
 * #CP). So main() enables with an inline SYSCALL (cet_enable_or_skip(), a macro, no call) and
 * ends with tap_done(), which calls exit() instead of returning. glibc 2.36 (Debian 12) does not
 * know this ABI, so nothing else in the process enables or unwinds the shadow stack.
 *
 * Output is TAP: "1..N", "ok N - what", "not ok N - what", "ok N - what # SKIP why", and
 * "1..0 # SKIP shadow stack not supported (...)" when ARCH_SHSTK_ENABLE fails (QEMU TCG, a CPU
 * or kernel without user shadow stacks). The exit status is 0 when nothing failed.
 */
#ifndef CET_USER_H
#define CET_USER_H

#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef ARCH_SHSTK_ENABLE
#define ARCH_SHSTK_ENABLE  0x5001
#define ARCH_SHSTK_DISABLE 0x5002
#define ARCH_SHSTK_LOCK    0x5003
#define ARCH_SHSTK_UNLOCK  0x5004
#define ARCH_SHSTK_STATUS  0x5005
#endif
#ifndef ARCH_SHSTK_SHSTK
#define ARCH_SHSTK_SHSTK (1UL << 0)
#define ARCH_SHSTK_WRSS  (1UL << 1)
#endif
#ifndef __NR_map_shadow_stack
#define __NR_map_shadow_stack 453
#endif
#ifndef SHADOW_STACK_SET_TOKEN
#define SHADOW_STACK_SET_TOKEN (1UL << 0)
#endif
#ifndef SEGV_CPERR
#define SEGV_CPERR 10
#endif

/* The data bit the kernel sets in a signal frame's shadow-stack entry (never a return address). */
#define SHSTK_SIGFRAME_BIT (1UL << 63)
/* Mode bit of a restore token: the token was made in 64-bit mode (SDM Vol. 1, 17.2.3). */
#define SHSTK_TOKEN_64BIT 1UL
/* Busy bit of a "previous SSP" token left by RSTORSSP. */
#define SHSTK_TOKEN_PREV 2UL

#define NOINLINE __attribute__((noinline))
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* arch_prctl through an inline SYSCALL: usable at the point where the shadow stack changes. */
static ALWAYS_INLINE long cet_arch_prctl(long option, unsigned long arg)
{
	long ret;
	register long rdi asm("rdi") = option;
	register unsigned long rsi asm("rsi") = arg;

	asm volatile("syscall"
		     : "=a"(ret)
		     : "0"((long)SYS_arch_prctl), "r"(rdi), "r"(rsi)
		     : "rcx", "r11", "memory", "cc");
	return ret;
}

/* The current shadow-stack pointer (RDSSPQ; 0 when shadow stacks are off). */
static ALWAYS_INLINE unsigned long cet_ssp(void)
{
	unsigned long ssp = 0;

	asm volatile("rdsspq %0" : "+r"(ssp));
	return ssp;
}

/* ARCH_SHSTK_STATUS: the enabled feature bits, or ~0 when the call fails. */
static inline unsigned long cet_status(void)
{
	unsigned long features = 0;

	if (cet_arch_prctl(ARCH_SHSTK_STATUS, (unsigned long)&features))
		return ~0UL;
	return features;
}

static inline void *cet_map_shadow_stack(void *addr, unsigned long size, unsigned long flags)
{
	return (void *)syscall(__NR_map_shadow_stack, addr, size, flags);
}

/* WRSSQ: write to shadow-stack memory (needs ARCH_SHSTK_WRSS). */
static ALWAYS_INLINE void cet_wrss(unsigned long *addr, unsigned long value)
{
	asm volatile("wrssq %1, %0" : "=m"(*addr) : "r"(value) : "memory");
}

/* ---- TAP ---- */

static int tap_number;
static int tap_failures;

static inline void tap_plan(int count)
{
	printf("1..%d\n", count);
	fflush(stdout);
}

static inline __attribute__((format(printf, 2, 3))) int tap_ok(int pass, const char *fmt, ...)
{
	va_list ap;

	printf("%s %d - ", pass ? "ok" : "not ok", ++tap_number);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!pass)
		tap_failures++;
	return pass;
}

static inline __attribute__((format(printf, 2, 3))) void tap_skip(const char *what, const char *fmt, ...)
{
	va_list ap;

	printf("ok %d - %s # SKIP ", ++tap_number, what);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static inline __attribute__((format(printf, 1, 2))) void tap_diag(const char *fmt, ...)
{
	va_list ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* The end of main(): exit, never return (see the top of this file). */
static inline __attribute__((noreturn)) void tap_done(void)
{
	if (tap_number == 0)
		printf("not ok 1 - the test ran no checks\n");
	fflush(stdout);
	exit(tap_failures || tap_number == 0 ? 1 : 0);
}

/*
 * Enable the shadow stack in main() (a macro: no call, no return); when the kernel refuses,
 * print the TAP "skip everything" plan and exit 0.
 */
#define cet_enable_or_skip()                                                               \
	do {                                                                               \
		long _err = cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_SHSTK);           \
		if (_err) {                                                                \
			printf("1..0 # SKIP shadow stack not supported "                  \
			       "(arch_prctl(ARCH_SHSTK_ENABLE): %s)\n", strerror((int)-_err)); \
			fflush(stdout);                                                    \
			exit(0);                                                           \
		}                                                                          \
	} while (0)

/* ---- children that are expected to die or exit in a given way ---- */

/* The exit status a child's fault handler reports: 100 + si_code of the signal it caught. */
#define CHILD_CAUGHT(code) (100 + (code))

static int child_expected_signal;

static void child_fault_handler(int sig, siginfo_t *info, void *ctx)
{
	(void)ctx;
	_exit(sig == child_expected_signal ? CHILD_CAUGHT(info->si_code) : 99);
}

/* Catch `sig` in this (child) process and exit with CHILD_CAUGHT(si_code) when it arrives. */
static inline void child_catch(int sig)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = child_fault_handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	child_expected_signal = sig;
	sigaction(sig, &sa, NULL);
}

/* Run fn() in a forked child (exit status 0 when it returns); the child's wait status. */
static inline int run_in_child(void (*fn)(void))
{
	int status = -1;
	pid_t pid;

	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		fn();
		_exit(0);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid)
		return -1;
	return status;
}

/* In a child: enable WRSS or exit with status 2 (the parent reports the status). */
static inline void child_enable_wrss(void)
{
	if (cet_arch_prctl(ARCH_SHSTK_ENABLE, ARCH_SHSTK_WRSS))
		_exit(2);
}

/* A wait status in words, for TAP diagnostics. */
static inline const char *status_words(int status)
{
	static char text[64];

	if (status == -1)
		snprintf(text, sizeof(text), "fork/wait failed");
	else if (WIFEXITED(status))
		snprintf(text, sizeof(text), "exit status %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(text, sizeof(text), "killed by signal %d", WTERMSIG(status));
	else
		snprintf(text, sizeof(text), "wait status 0x%x", status);
	return text;
}

static inline int exited_with(int status, int code)
{
	return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == code;
}

/* Run fn() in a child; one TAP line: did it exit with `code`? ("what (how it ended)") */
static inline int tap_child_exit(void (*fn)(void), int code, const char *what)
{
	int status = run_in_child(fn);

	return tap_ok(exited_with(status, code), "%s (%s)", what, status_words(status));
}

/*
 * Nested calls and returns: each RET is checked against the shadow stack. The recursion goes
 * through a volatile pointer so the compiler cannot turn it into a loop. Returns depth + 1.
 */
static unsigned long cet_nested_calls(int depth);
static unsigned long (*volatile cet_nested_ptr)(int) = cet_nested_calls;

static NOINLINE unsigned long cet_nested_calls(int depth)
{
	if (depth <= 0)
		return 1;
	return cet_nested_ptr(depth - 1) + 1;
}

#endif
