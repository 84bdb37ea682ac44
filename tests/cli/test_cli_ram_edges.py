"""Issue 9: the CPU's own accesses (event delivery, an emulated IRETQ) reaching guest-physical
memory without RAM end the run like KVM would — KVM_EXIT_INTERNAL_ERROR with the suberror KVM
uses — as one line with exit status 126, on every CET path; never an engine crash."""

import pytest

from cli_support import assert_one_line_error, cetvm, guest

STATUS_INTERNAL_ERROR = 126
CASES = {
    "rsp": ("KVM_INTERNAL_ERROR_DELIVERY_EV", "delivering #UD", "write of 40 bytes at guest-physical 0xd00007d8"),
    "idt": ("KVM_INTERNAL_ERROR_DELIVERY_EV", "delivering #UD", "read of 16 bytes at guest-physical 0xd0000060"),
    "iret": ("KVM_INTERNAL_ERROR_EMULATION", "read of 40 bytes at guest-physical 0xfee00100"),
    "callmmio": ("KVM_INTERNAL_ERROR_EMULATION", "instruction CET guards"),
}


@pytest.mark.parametrize("path", ["native", "python"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_accesses_to_memory_without_ram_are_a_kvm_internal_error(capsys, monkeypatch, case, path):
    monkeypatch.setenv("CETVM_CET_PATH", path)
    run = cetvm(capsys, "boot", str(guest("ram_edges")), "--memory", "32M", "--append", f"case={case}")
    assert_one_line_error(run, STATUS_INTERNAL_ERROR, "KVM_EXIT_INTERNAL_ERROR", *CASES[case])
