"""Issue 8, bug 1: a CET guest that runs across many KVM_RUN slices must never see a false #CP.

The `long_run` kernel runs the bench loop (CALL * → ENDBR64; CALL * → ENDBR64; RET → RET; DEC;
JNZ) with supervisor shadow stacks + kernel IBT at CPL0, then with U_CET.SH_STK_EN|ENDBR_EN at
CPL3. Each slice of `cetvm boot` (2M instructions, 200k with --timeout) ends wherever the budget
runs out — often between a block's start and its CALL/RET — and the engine resumes mid-block;
the terminator recorded at the block start must not be applied twice (or before it runs).
"""

import pytest

from boot_support import boot, guest
from cetvm.cpu.native import native_available

PASS_STATUS = 1

#: Acceptance: 6.5M iterations a ring ≈ 104M instructions in all (native path only: ~2 s).
FULL = ()
#: The Python paths count instructions at ~1.2 MIPS: enough iterations to cross slice boundaries
#: many times (the first RUN_SLICE boundary is at 2M instructions; --timeout slices are 200k).
PYTHON_ITERATIONS = {False: "iterations=270000", True: "iterations=70000"}


def run_long(capsys, *extra):
    result = boot(capsys, str(guest("long_run")), "--memory", "32M", *extra)
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    return result


@pytest.mark.skipif(not native_available(), reason="native CET fast path not built (make native)")
@pytest.mark.parametrize("timeout", [False, True], ids=["2M-slices", "timeout-200k-slices"])
def test_100m_instructions_of_calls_and_returns_on_the_native_path(capsys, monkeypatch, timeout):
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    extra = ("--timeout", "600") if timeout else ()
    if timeout:
        extra += ("--append", "iterations=1500000")  # 24M instructions, ~120 slices
    run_long(capsys, *extra)


@pytest.mark.parametrize("fast, timeout", [("1", False), ("1", True), ("0", True)],
                         ids=["python-2M-slices", "python-timeout-200k-slices", "python-reference-timeout-200k-slices"])
def test_calls_and_returns_across_slices_on_the_python_paths(capsys, monkeypatch, fast, timeout):
    monkeypatch.setenv("CETVM_CET_PATH", "python")
    monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", fast)
    extra = ("--timeout", "600") if timeout else ()
    run_long(capsys, "--append", PYTHON_ITERATIONS[timeout], *extra)


@pytest.mark.skipif(not native_available(), reason="native CET fast path not built (make native)")
@pytest.mark.parametrize("limit", ["1000003", "2000001", "7777777"])
def test_instruction_limit_stops_anywhere_without_a_false_cp(capsys, monkeypatch, limit):
    """--max-instructions ends the run at an arbitrary instruction of the loop: the guest must not
    have taken a #CP by then (the run stops with 124, not with a TAP failure)."""
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    result = boot(capsys, str(guest("long_run")), "--memory", "32M", "--max-instructions", limit)
    assert result.status == 124, result.err
    assert "not ok" not in result.out


@pytest.mark.skipif(not native_available(), reason="native CET fast path not built (make native)")
def test_snapshot_in_the_middle_of_the_loop_continues_without_a_false_cp(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    snap = tmp_path / "mid.snap"
    first = boot(capsys, str(guest("long_run")), "--memory", "32M", "--append", "iterations=1000000",
                 "--save-state", str(snap), "--save-at", "5000017")
    assert first.status == 0, first.err
    rest = boot(capsys, "--restore-state", str(snap))
    assert "not ok" not in first.out + rest.out
    assert rest.status == PASS_STATUS, rest.err
    assert "# 0 failed" in rest.out
