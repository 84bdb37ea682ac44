"""Nested VMX with CET, judged by our L1 hypervisor kernel (guests/tests/nested_cet.c): the cover
letter's L2 user shadow-stack test (#CP(1) at the RET) and kernel IBT test (#CP(3) at the JMP
target), visible to L1 only when it intercepts #CP, with and without the load-CET-state
controls — on every CET path; and a snapshot taken while L2 runs continues to the same
verdicts in a fresh process (KVM_GET/SET_NESTED_STATE)."""

import subprocess
import sys

import pytest

from boot_support import MAX_INSTRUCTIONS, Tap, boot, guest
from cetvm.cpu.native import native_available
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1
MEMORY = "32M"


@pytest.mark.parametrize("cet_path", ["native", "python", "python-reference"])
def test_l2_cet_violations_reach_l1_only_when_it_intercepts_cp(capsys, monkeypatch, cet_path):
    if cet_path == "native" and not native_available():
        pytest.skip("native CET fast path not built (make native)")
    monkeypatch.setenv("CETVM_CET_PATH", "native" if cet_path == "native" else "python")
    monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", "0" if cet_path == "python-reference" else "1")
    result = boot(capsys, str(guest("nested_cet")), "--memory", MEMORY, "--max-instructions", MAX_INSTRUCTIONS)
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    assert not tap.skipped()
    for controls in ("load-CET controls", "no load-CET controls"):
        assert tap.passed(f"L2 user RET to a forged address -> #CP(1) exit to L1 ({controls})")
        assert tap.passed(f"L2 user #CP(1) not intercepted: L2's kernel handles it ({controls})")
        assert tap.passed(f"L2 kernel JMP* without ENDBR64 -> #CP(3) exit to L1 ({controls})")
        assert tap.passed(f"L2 kernel #CP(3) not intercepted: L2's handler sees it ({controls})")
    assert tap.passed("bad HOST_S_CET -> VMfailValid(8)")
    assert tap.passed("bad GUEST_S_CET -> VM-entry failure 0x80000021")
    assert tap.passed("IA32_VMX_BASIC[56]: #CP injected without an error code is delivered without one")
    assert tap.passed("L2 INT3 with EXCEPTION_BITMAP[3] -> software-exception exit to L1")
    # nested VMX without CET (kvm-unit-tests vmx 'interrupt', 'debug controls', 'MSR switch',
    # vmx_pending_event_test, the guest-state area checks)
    for name in ("entry in the HLT activity state with an injected interrupt: L2 wakes into its handler",
                 "entry in the HLT activity state: L2 halts until the timer interrupt exits to L1",
                 "L2 HLT without HLT exiting halts until the timer interrupt exits to L1 (RIP after the HLT)",
                 "acknowledge interrupt on exit: the vector in VM_EXIT_INTR_INFO, nothing left for L1",
                 "external-interrupt exit without acknowledge: the interrupt stays pending for L1",
                 "debug controls: GUEST_DR7 loaded and saved back, L1's DR7 is 0x400 after the exit",
                 "MSR lists: entry load, exit store of L2's value, exit load for L1",
                 "FS_BASE in the entry MSR-load list -> VM-entry failure 0x80000022, qualification 1",
                 "GUEST_TR selector with TI set -> VM-entry failure 0x80000021"):
        assert tap.passed(name), name


def _run_until_l2(machine: Machine, load_cet: bool, step: int = 300, limit: int = 2_000_000) -> int:
    """Run in small slices until L2 runs with (or without) the load-CET-state entry control."""
    done = 0
    while done < limit:
        done += step
        result = machine.run(save_at=done)
        assert result.reason.name == "SNAPSHOT", result
        nested = machine.vcpu.nested
        if nested.guest_mode and bool(nested.vmcs12.read(0x4012) >> 20 & 1) is load_cet:
            return done
    raise AssertionError("L2 never ran")


@pytest.mark.parametrize("load_cet", [True, False])
def test_snapshot_in_l2_continues_in_a_fresh_process(tmp_path, load_cet):
    serial = bytearray()
    machine = Machine.boot(guest("nested_cet"), MachineConfig(memory=MEMORY, serial_sink=serial.extend))
    _run_until_l2(machine, load_cet)
    path = tmp_path / "l2.snap"
    machine.save(path)
    proc = subprocess.run([sys.executable, "-m", "cetvm", "boot", "--restore-state", str(path)],
                          capture_output=True, timeout=300)
    tap = Tap.parse(serial.decode() + proc.stdout.decode())
    tap.assert_complete_and_green()
    assert proc.returncode == PASS_STATUS, proc.stderr.decode()


def _tap_on(host) -> tuple[Tap, int]:
    serial = bytearray()
    config = MachineConfig(memory=MEMORY, serial_sink=serial.extend, host=host)
    result = Machine.boot(guest("nested_cet"), config).run(max_instructions=int(MAX_INSTRUCTIONS))
    return Tap.parse(serial.decode()), result.status


def test_without_vmx_basic_56_an_injected_cp_must_carry_its_error_code():
    """A host without IA32_VMX_BASIC[56]: KVM offers no CET (so the L2 CET tests skip) and the
    VM-entry consistency check of the error code stays: #CP without one is VMfailValid(7)."""
    from cetvm.kvm.host import Host
    tap, status = _tap_on(Host.from_model_name("sapphire-rapids", vmx_basic_56=False))
    tap.assert_complete_and_green()
    assert status == PASS_STATUS
    assert tap.passed("IA32_VMX_BASIC[56] clear: #CP without an error code -> VMfailValid(7)")
    assert tap.passed("load-CET-state controls offered with SHSTK/IBT")  # neither offered


def test_with_nested_off_the_guest_sees_no_vmx():
    from cetvm.kvm.host import Host
    tap, status = _tap_on(Host.from_model_name("sapphire-rapids", nested=False))
    tap.assert_complete_and_green()
    assert len(tap.skipped()) == tap.plan
