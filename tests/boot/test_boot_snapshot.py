"""Snapshots: stop after N instructions, save, continue in a FRESH PROCESS with
`cetvm boot --restore-state`; the serial output and the end state equal an uninterrupted run,
CET state included. Incomplete snapshots are refused before the vCPU is touched."""

import json
import subprocess
import sys

import pytest

from cetvm.arch.msr import Msr
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.snapshot import read_snapshot, write_snapshot
from cetvm.vmm.snapshot_io import msr_key

from boot_support import boot, guest

#: shstk_user: supervisor shadow stacks, IBT and a ring-3 shadow stack are live at this point
#: (checked below through the snapshot itself).
SAVE_AT_CET_LIVE = 270_000
MEMORY = "16M"


def cetvm_in_fresh_process(*args: str) -> subprocess.CompletedProcess:
    """`python -m cetvm boot ARGS` (stdout/stderr decoded without newline translation: the guest
    console writes CRLF)."""
    proc = subprocess.run([sys.executable, "-m", "cetvm", "boot", *args], capture_output=True, timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture(scope="module")
def uninterrupted():
    serial = bytearray()
    result = Machine.boot(guest("shstk_user"), MachineConfig(memory=MEMORY, serial_sink=serial.extend)).run()
    return result, serial.decode()


@pytest.fixture(scope="module")
def mid_run_snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "shstk_user.snap"
    serial = bytearray()
    machine = Machine.boot(guest("shstk_user"), MachineConfig(memory=MEMORY, serial_sink=serial.extend))
    result = machine.run(save_at=SAVE_AT_CET_LIVE)
    machine.save(path)
    return path, result, serial.decode()


def test_snapshot_holds_live_cet_state(mid_run_snapshot):
    path, result, _ = mid_run_snapshot
    manifest, sections = read_snapshot(path)
    vcpu = manifest["vcpus"][0]
    assert manifest["run"]["instructions"] == result.instructions >= SAVE_AT_CET_LIVE
    assert vcpu["sregs"]["cr4"] & (1 << 23), "CR4.CET should be on at the save point"
    assert vcpu["msrs"][msr_key(Msr.IA32_S_CET)] & 1, "supervisor shadow stack should be on"
    assert vcpu["msrs"][msr_key(Msr.IA32_U_CET)] != 0
    assert vcpu["guest_ssp"] != 0
    assert sections["xsave/vcpu0"] and "ram@0x0" in sections


def test_restore_in_a_fresh_process_continues_identically(mid_run_snapshot, uninterrupted):
    path, _, serial_before = mid_run_snapshot
    full_result, full_serial = uninterrupted
    proc = cetvm_in_fresh_process("--restore-state", str(path), "--json")
    doc = json.loads(proc.stdout)
    assert serial_before + doc["serial"] == full_serial
    assert (doc["status"], doc["instructions"], doc["rip"]) == (full_result.status, full_result.instructions, full_result.rip)
    assert proc.returncode == full_result.exit_code


def test_cli_save_at_then_restore_reproduces_the_tap_output(tmp_path, capsys, uninterrupted):
    _, full_serial = uninterrupted
    snap = tmp_path / "s.snap"
    first = boot(capsys, str(guest("shstk_user")), "--memory", MEMORY, "--save-state", str(snap), "--save-at", "200000")
    assert first.status == 0 and snap.exists()
    second = cetvm_in_fresh_process("--restore-state", str(snap))
    assert first.out + second.stdout == full_serial
    assert second.returncode == 1


def test_snapshot_without_ia32_xss_while_cet_user_state_is_in_use_is_refused(mid_run_snapshot, tmp_path, capsys):
    path, _, _ = mid_run_snapshot
    manifest, sections = read_snapshot(path)
    del manifest["vcpus"][0]["msrs"][msr_key(Msr.IA32_XSS)]
    broken = tmp_path / "no_xss.snap"
    write_snapshot(broken, manifest, sections)
    result = boot(capsys, "--restore-state", str(broken))
    assert result.status == 2
    assert "IA32_XSS" in result.err and "CET_U" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_snapshot_without_guest_ssp_while_shadow_stacks_are_on_is_refused(mid_run_snapshot, tmp_path, capsys):
    path, _, _ = mid_run_snapshot
    manifest, sections = read_snapshot(path)
    del manifest["vcpus"][0]["guest_ssp"]
    broken = tmp_path / "no_ssp.snap"
    write_snapshot(broken, manifest, sections)
    result = boot(capsys, "--restore-state", str(broken))
    assert result.status == 2 and "guest_ssp" in result.err


def test_truncated_snapshot_is_refused_with_one_line(mid_run_snapshot, tmp_path, capsys):
    path, _, _ = mid_run_snapshot
    cut = tmp_path / "cut.snap"
    cut.write_bytes(path.read_bytes()[:-100])
    result = boot(capsys, "--restore-state", str(cut))
    assert result.status == 2 and "snapshot" in result.err and len(result.err.strip().splitlines()) == 1


def test_restore_refuses_machine_options(mid_run_snapshot, capsys):
    path, _, _ = mid_run_snapshot
    result = boot(capsys, "--restore-state", str(path), "--cet", "off")
    assert result.status == 2 and "--cet" in result.err


def test_a_snapshot_taken_at_any_instruction_replays_no_output_twice(tmp_path):
    """Including right after an OUT the VMM has already handed to the UART."""
    from boot_support import debug_exit, elf64_kernel, serial_text

    image = tmp_path / "abc.elf"
    image.write_bytes(elf64_kernel(serial_text("abc") + debug_exit(0)))
    for n in range(1, 10):
        before, after = bytearray(), bytearray()
        machine = Machine.boot(image, MachineConfig(memory="4M", serial_sink=before.extend))
        machine.run(save_at=n)
        machine.save(tmp_path / "s.snap")
        result = Machine.restore(tmp_path / "s.snap", serial_sink=after.extend).run()
        assert (bytes(before + after), result.status) == (b"abc", 1), f"snapshot after {n} instructions"


def test_a_machine_saved_inside_its_smi_handler_continues_after_rsm(tmp_path):
    """Issue 12: the smm_cet kernel saved a few instructions into its first SMI handler (the vCPU in
    SMM, CR4 = 0, the state-save map in RAM, the smi vCPU events in the snapshot) and restored in
    a fresh machine finishes with the same TAP output and instruction count as without the stop."""
    serial = bytearray()
    reference = Machine.boot(guest("smm_cet"), MachineConfig(memory=MEMORY, serial_sink=serial.extend))
    smi_at: list[int] = []
    raise_smi = reference.devices.apm.smi
    reference.devices.apm.smi = lambda: (smi_at.append(reference.instructions), raise_smi())
    full = reference.run(max_instructions=5_000_000)
    assert smi_at, "the kernel raised no SMI"

    before, after = bytearray(), bytearray()
    machine = Machine.boot(guest("smm_cet"), MachineConfig(memory=MEMORY, serial_sink=before.extend))
    machine.run(save_at=smi_at[0] + 5)
    assert machine.vcpu.get_vcpu_events_smi().smm and machine.vcpu.get_sregs().cr4 == 0
    machine.save(tmp_path / "smm.snap")
    manifest, _ = read_snapshot(tmp_path / "smm.snap")
    assert manifest["vcpus"][0]["smi"]["smm"] is True
    restored = Machine.restore(tmp_path / "smm.snap", serial_sink=after.extend)
    assert restored.vcpu.get_vcpu_events_smi().smm
    result = restored.run(max_instructions=5_000_000)
    assert (before + after).decode() == serial.decode() and "# 0 failed" in serial.decode()
    assert (result.status, result.instructions) == (full.status, full.instructions)
