/*
 * shstk_fork_thread: new tasks with the shadow stack on (Linux shstk_alloc_thread_stack()).
 *
 * fork: the child continues on a copy of the parent's shadow stack (same SSP, copy-on-write) and
 * its returns check against that copy. pthread_create (glibc 2.34+ uses clone3 with CLONE_VM):
 * the kernel gives every new thread a shadow stack of its own, with SHSTK already enabled.
 */
#include <pthread.h>

#include <sched.h>

#include "cet_user.h"

#define THREADS 4

struct thread_seen {
	unsigned long ssp;
	unsigned long status;
	unsigned long calls;
};

/* Threads stay alive until every one has recorded its SSP: a thread that exited has its shadow
 * stack freed, and the next thread's may then be mapped at the same address (seen with 2 CPUs). */
static int recorded, release;

static void *thread_main(void *arg)
{
	struct thread_seen *out = arg;

	out->ssp = cet_ssp();
	out->status = cet_status();
	out->calls = cet_nested_calls(64);
	__atomic_add_fetch(&recorded, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_load_n(&release, __ATOMIC_SEQ_CST))
		sched_yield();
	return NULL;
}

static int threads_distinct(struct thread_seen *seen, unsigned long main_ssp)
{
	for (int i = 0; i < THREADS; i++) {
		if (!seen[i].ssp || seen[i].ssp == main_ssp)
			return 0;
		for (int j = 0; j < i; j++)
			if (seen[i].ssp == seen[j].ssp)
				return 0;
	}
	return 1;
}

int main(void)
{
	struct thread_seen seen[THREADS];
	pthread_t threads[THREADS];
	unsigned long ssp;
	int status = -1, all_ok = 1, created = 0;
	pid_t pid;

	cet_enable_or_skip();
	tap_plan(6);

	ssp = cet_ssp();
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		/* Same function, same depth: the child's SSP is the parent's. */
		if (cet_ssp() != ssp)
			_exit(1);
		if (cet_status() != ARCH_SHSTK_SHSTK)
			_exit(2);
		if (cet_nested_calls(128) != 129)
			_exit(3);
		_exit(0);
	}
	if (pid > 0)
		waitpid(pid, &status, 0);
	tap_ok(exited_with(status, 0), "fork: the child has the parent's SSP, SHSTK on, and its calls return (%s)",
	       status_words(status));
	tap_ok(cet_nested_calls(128) == 129 && cet_ssp() == ssp, "the parent's shadow stack is intact after the child ran");

	memset(seen, 0, sizeof(seen));
	for (int i = 0; i < THREADS; i++)
		if (pthread_create(&threads[i], NULL, thread_main, &seen[i]) == 0)
			created++;
	while (__atomic_load_n(&recorded, __ATOMIC_SEQ_CST) < created)
		sched_yield();
	__atomic_store_n(&release, 1, __ATOMIC_SEQ_CST);
	for (int i = 0; i < created; i++)
		pthread_join(threads[i], NULL);
	tap_ok(created == THREADS, "pthread_create of %d threads (%d created)", THREADS, created);
	for (int i = 0; i < created; i++)
		all_ok &= seen[i].status == ARCH_SHSTK_SHSTK && seen[i].calls == 65;
	tap_ok(all_ok, "every thread starts with SHSTK enabled and its calls return");
	tap_ok(threads_distinct(seen, ssp), "every thread has a shadow stack of its own (SSPs 0x%lx 0x%lx ...)",
	       seen[0].ssp, seen[1].ssp);
	tap_ok(cet_ssp() == ssp && cet_nested_calls(8) == 9, "the main thread's shadow stack is untouched");
	tap_done();
}
