/*
 * without_cap_sys_ptrace PROGRAM [ARGS...]: run PROGRAM as root without CAP_SYS_PTRACE (dropped
 * from the bounding, permitted, effective and inheritable sets), so it cannot be given back.
 *
 * Why (cetvm.linux.init_script): Linux 6.12 refuses userfaultfd registration on shadow-stack
 * memory, yet its test_shadow_stack_64 expects it to work; userfaultfd() for kernel faults needs
 * CAP_SYS_PTRACE (with vm.unprivileged_userfaultfd = 0), so without it the selftest prints
 * "[SKIP] Userfaultfd unavailable." as in the KVM CET series' cover letter — while its uretprobe
 * test keeps the CAP_PERFMON/CAP_SYS_ADMIN that perf's uprobe PMU needs.
 */
#include <errno.h>
#include <linux/capability.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
	const unsigned int bit = 1u << CAP_SYS_PTRACE; /* CAP_SYS_PTRACE < 32: word 0 */

	if (argc < 2) {
		fprintf(stderr, "usage: %s PROGRAM [ARGS...]\n", argv[0]);
		return 2;
	}
	if (prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0) != 0 ||
	    syscall(SYS_capget, &header, data) != 0) {
		fprintf(stderr, "%s: cannot drop CAP_SYS_PTRACE: %s\n", argv[0], strerror(errno));
		return 126;
	}
	data[0].effective &= ~bit;
	data[0].permitted &= ~bit;
	data[0].inheritable &= ~bit;
	if (syscall(SYS_capset, &header, data) != 0) {
		fprintf(stderr, "%s: capset: %s\n", argv[0], strerror(errno));
		return 126;
	}
	execv(argv[1], argv + 1);
	fprintf(stderr, "%s: cannot run %s: %s\n", argv[0], argv[1], strerror(errno));
	return 127;
}
