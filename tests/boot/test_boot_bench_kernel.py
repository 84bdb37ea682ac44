"""The benchmark kernel (guests/tests/bench.c, used by benchmarks/bench_boot.py) runs its
workloads correctly under every page layout it offers: the CALL/ENDBR/RET loop with kernel IBT
and shadow stacks, #PF -> IRETQ round trips with supervisor shadow stacks, SYSCALL -> SYSRET
round trips with user shadow stacks, port reads and CPUIDs."""

import pytest

from boot_support import boot, guest

PASS_STATUS = 1


@pytest.mark.parametrize("pages", ["default", "nx", "rwx2m"])
def test_bench_kernel_workloads_pass(capsys, pages):
    result = boot(capsys, str(guest("bench")), "--memory", "32M",
                  "--append", f"pages={pages} loop=2000 faults=20 syscalls=20 ports=5 scratch=5 cpuid=20")
    result.tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    assert f"pages {pages}" in result.out
