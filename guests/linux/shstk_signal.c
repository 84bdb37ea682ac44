/*
 * shstk_signal: signals delivered and returned with the shadow stack on (Linux
 * setup_signal_shadow_stack() / restore_signal_shadow_stack()).
 *
 * On delivery the kernel pushes a two-word frame onto the shadow stack: at SSP+8 the old SSP
 * with bit 63 set (a "data" word that can never be a return address), at SSP the restorer the
 * handler returns to. rt_sigreturn pops the frame and refuses (SIGSEGV) a word without bit 63.
 */
#include "cet_user.h"

struct seen {
	unsigned long ssp;		/* SSP at handler entry */
	unsigned long restorer;		/* the word at SSP */
	unsigned long token;		/* the word at SSP + 8 */
	unsigned long calls;
};

static volatile struct seen first, nested;
static volatile int nested_signal;

/* `ssp`: the handler's SSP read in the handler itself before any call (RDSSP is inline), i.e. the
 * frame. (Reading it in here and adding 8 for our own return address breaks when the compiler
 * turns the handler's last call into a tail jump, which pushes nothing.) */
static NOINLINE void record(volatile struct seen *out, unsigned long ssp)
{
	out->ssp = ssp;
	out->restorer = ((unsigned long *)ssp)[0];
	out->token = ((unsigned long *)ssp)[1];
	out->calls = cet_nested_calls(16);
}

static void on_usr2(int sig)
{
	(void)sig;
	record(&nested, cet_ssp());
}

static void on_usr1(int sig)
{
	(void)sig;
	record(&first, cet_ssp());
	if (nested_signal)
		raise(SIGUSR2);
}

static int frame_ok(volatile struct seen *s)
{
	return s->ssp && (s->token & SHSTK_SIGFRAME_BIT) && (s->token & ~SHSTK_SIGFRAME_BIT) == s->ssp + 16 &&
	       s->restorer != 0 && s->calls == 17;
}

static void install(int sig, void (*fn)(int), int flags)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = fn;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	sigaction(sig, &sa, NULL);
}

/* The handler rewrites the frame's token word with WRSS: `keep` writes it back unchanged. */
static volatile int keep_token;

static void on_usr1_rewrite(int sig)
{
	unsigned long *frame = (unsigned long *)(cet_ssp());	/* inline: no call, SSP is the frame */

	(void)sig;
	cet_wrss(&frame[1], keep_token ? frame[1] : frame[1] & ~SHSTK_SIGFRAME_BIT);
}

static void child_rewrite_token(void)
{
	child_enable_wrss();
	install(SIGUSR1, on_usr1_rewrite, 0);
	raise(SIGUSR1);
}

int main(void)
{
	unsigned long before;
	stack_t alt;
	int status;

	cet_enable_or_skip();
	tap_plan(7);

	install(SIGUSR1, on_usr1, 0);
	install(SIGUSR2, on_usr2, 0);
	before = cet_ssp();
	raise(SIGUSR1);
	tap_ok(frame_ok(&first), "handler entry: restorer on top, then old SSP|bit 63 (SSP 0x%lx, token 0x%lx)",
	       first.ssp, first.token);
	tap_ok(cet_ssp() == before, "after sigreturn the SSP is what it was before the signal");
	tap_ok(first.ssp < before, "the frame was pushed below the interrupted code's SSP");

	nested_signal = 1;
	memset((void *)&nested, 0, sizeof(nested));
	raise(SIGUSR1);
	tap_ok(frame_ok(&nested) && nested.ssp < first.ssp && cet_ssp() == before,
	       "a signal inside a handler: a second frame below the first, both return");
	nested_signal = 0;

	alt.ss_sp = malloc(1 << 16);
	alt.ss_size = 1 << 16;
	alt.ss_flags = 0;
	sigaltstack(&alt, NULL);
	install(SIGUSR1, on_usr1, SA_ONSTACK);
	memset((void *)&first, 0, sizeof(first));
	raise(SIGUSR1);
	tap_ok(frame_ok(&first) && cet_ssp() == before, "on a sigaltstack the shadow stack frame is the same and returns");

	keep_token = 1;
	tap_child_exit(child_rewrite_token, 0,
		       "the token rewritten unchanged with WRSS: sigreturn accepts it");
	keep_token = 0;
	status = run_in_child(child_rewrite_token);
	tap_ok(status != -1 && WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
	       "the token without bit 63: sigreturn refuses it, SIGSEGV (%s)", status_words(status));
	tap_done();
}
