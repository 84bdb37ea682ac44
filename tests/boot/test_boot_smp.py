"""SMP through `cetvm boot --smp N`: the smp kernel (guests/tests/smp.c) starts every AP with
INIT/SIPI (real mode → long mode), each AP reports its APIC ID and runs CET code on its own
supervisor shadow stack, the CPUs share a LOCK CMPXCHG counter and exchange IPIs. Scheduling is
deterministic (round-robin): a snapshot taken with 2 vCPUs mid-run continues identically, to
the instruction, in a fresh process; and a snapshot is refused for another vCPU count."""

from __future__ import annotations

import json

import pytest

from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.snapshot import read_snapshot, write_snapshot

from boot_support import Tap, boot, guest
from test_boot_snapshot import cetvm_in_fresh_process

MEMORY = "16M"
#: Instructions after the SIPI: both vCPUs are running, the AP with CET on (guests/tests/smp.c).
APS_LIVE = 55_000


@pytest.fixture(scope="module")
def uninterrupted_2():
    """(result, serial output, the instruction count at which the BSP's SIPI reached the AP)."""
    serial = bytearray()
    machine = Machine.boot(guest("smp"), MachineConfig(memory=MEMORY, smp=2, serial_sink=serial.extend))
    sipi_at: list[int] = []
    deliver = machine.apic_bus.sipi
    machine.apic_bus.sipi = lambda index, vector: (sipi_at.append(machine.instructions), deliver(index, vector))
    result = machine.run()
    assert len(sipi_at) == 1
    return result, serial.decode(), sipi_at[0]


def _check_green(out: str, smp: int) -> None:
    Tap.parse(out).assert_complete_and_green()
    assert f"# {smp} CPUs" in out
    for cpu in range(1, smp):
        assert f"# AP {cpu}: APIC ID {cpu} (x2APIC {cpu}, APIC {cpu})" in out


def test_smp_2_is_green(uninterrupted_2):
    result, serial, _ = uninterrupted_2
    assert result.status == 1, result.diagnosis()
    assert "# 2 CPUs (xAPIC)" in serial
    _check_green(serial, 2)


def test_cetvm_boot_smp_4_with_x2apic_is_green(capsys):
    """INIT/SIPI and every IPI through the x2APIC ICR MSR (KVM_EXIT_X86_WRMSR to the VMM)."""
    run = boot(capsys, str(guest("smp")), "--smp", "4", "--memory", MEMORY, "--append", "x2apic",
               "--max-instructions", "20000000")
    assert run.status == 1, run.err
    assert "# 4 CPUs (x2APIC)" in run.out
    _check_green(run.out, 4)


def test_max_instructions_counts_every_vcpu(uninterrupted_2):
    _, _, sipi_at = uninterrupted_2
    machine = Machine.boot(guest("smp"), MachineConfig(memory=MEMORY, smp=2, serial_sink=lambda _b: None))
    result = machine.run(max_instructions=sipi_at + APS_LIVE)
    per_vcpu = [vcpu.get_stats()["instructions"] for vcpu in machine.vcpus]
    assert result.instructions == sipi_at + APS_LIVE == sum(per_vcpu)
    assert all(n > 0 for n in per_vcpu), per_vcpu


def test_snapshot_with_two_vcpus_restores_identically(tmp_path, uninterrupted_2):
    full, full_serial, sipi_at = uninterrupted_2
    path = tmp_path / "smp.snap"
    serial = bytearray()
    machine = Machine.boot(guest("smp"), MachineConfig(memory=MEMORY, smp=2, serial_sink=serial.extend))
    assert machine.run(save_at=sipi_at + APS_LIVE).instructions == sipi_at + APS_LIVE
    machine.save(path)
    manifest, sections = read_snapshot(path)
    assert manifest["machine"]["smp"] == 2 and len(manifest["vcpus"]) == 2
    assert {"xsave/vcpu0", "xsave/vcpu1"} <= set(sections)
    ap = manifest["vcpus"][1]
    assert ap["mp_state"] == "RUNNABLE" and ap["sregs"]["cr4"] & (1 << 23), "the AP should run with CET on"
    assert len(manifest["devices"]["lapics"]) == 2 and "scheduler" in manifest["run"]
    proc = cetvm_in_fresh_process("--restore-state", str(path), "--smp", "2", "--json")
    doc = json.loads(proc.stdout)
    assert serial.decode() + doc["serial"] == full_serial
    assert (doc["status"], doc["instructions"], doc["rip"]) == (full.status, full.instructions, full.rip)


#: Save points relative to the SIPI (None: at instruction 1000), with the AP's MP state, CR0.PE,
#: CR0.PG, 64-bit code there: before its INIT; in smp.S's trampoline in real mode, with CR0.PE
#: set and the real-mode CS still loaded, and in IA-32e compatibility mode (the BSP's SIPI
#: store completes when its turn ends, then the AP runs: its k-th instruction retires at
#: SIPI + 1 + k).
STARTUP_POINTS = [(None, "UNINITIALIZED", 0, 0, False), (4, "RUNNABLE", 0, 0, False),
                  (8, "RUNNABLE", 1, 0, False), (25, "RUNNABLE", 1, 1, False)]


def _vcpu_states(machine: Machine) -> list:
    return [machine.instructions] + [(vcpu.get_mp_state(), vcpu.get_regs(), vcpu.get_sregs()) for vcpu in machine.vcpus]


def test_snapshots_during_ap_startup_restore_identically(tmp_path, capsys, uninterrupted_2):
    """The saved machine goes on; the machine restored from each snapshot is in exactly its
    state at the next save point, and the last one ends exactly as the uninterrupted run.
    Restoring into another vCPU count is refused."""
    full, full_serial, sipi_at = uninterrupted_2
    serial = bytearray()
    machine = Machine.boot(guest("smp"), MachineConfig(memory=MEMORY, smp=2, serial_sink=serial.extend))
    restored = None
    for offset, mp_state, pe, pg, long64 in STARTUP_POINTS:
        at = 1000 if offset is None else sipi_at + offset
        machine.run(save_at=at)
        ap = machine.vcpus[1]
        sregs = ap.get_sregs()
        assert (ap.get_mp_state().name, sregs.cr0 & 1, sregs.cr0 >> 31, sregs.cs.long) == (mp_state, pe, pg, long64), \
            f"at {at}: smp.S changed? pick new offsets"
        if restored is not None:
            restored.run(save_at=at)
            assert _vcpu_states(restored) == _vcpu_states(machine), f"restored from the previous point, at {at}"
            assert restored._loop.get_state() == machine._loop.get_state()
        path = tmp_path / f"at{at}.snap"
        machine.save(path)
        after = bytearray()
        restored = Machine.restore(path, serial_sink=after.extend)
    result = restored.run()
    assert (result.instructions, (serial + after).decode()) == (full.instructions, full_serial)
    run = boot(capsys, "--restore-state", str(tmp_path / "at1000.snap"), "--smp", "4")
    assert run.status == 2 and "2 vCPU(s)" in run.err and "4" in run.err
    manifest, sections = read_snapshot(tmp_path / "at1000.snap")
    manifest["run"]["scheduler"]["current"] = 2
    write_snapshot(tmp_path / "bad.snap", manifest, sections)
    run = boot(capsys, "--restore-state", str(tmp_path / "bad.snap"))
    assert run.status == 2 and "run.scheduler.current" in run.err and len(run.err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["0", "9", "two"])
def test_smp_option_range(capsys, value):
    run = boot(capsys, str(guest("smp")), "--smp", value)
    assert run.status == 2 and "1 to 8" in run.err and len(run.err.strip().splitlines()) == 1


def test_ap_cet_loop_across_many_turns(capsys):
    """Issue 8 (1) on the APs: SMP turns end at arbitrary instructions, inside CALL/RET blocks."""
    run = boot(capsys, str(guest("smp")), "--smp", "2", "--memory", MEMORY, "--append", "pairs=30000",
               "--max-instructions", "20000000")
    run.tap.assert_complete_and_green()
