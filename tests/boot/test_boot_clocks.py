"""Acceptance: guests/tests/clocks.c — the clocks a KVM guest kernel uses: a deterministic TSC
(RDTSC, RDTSCP with TSC_AUX, CR4.TSD, IA32_TSC writes) whose rate CPUID 15H/16H state and the
APIC timer confirms, kvmclock (pvclock structures behind MSR_KVM_SYSTEM_TIME_NEW /
WALL_CLOCK_NEW, CPUID 0x40000001), the CMOS RTC and the LAPIC TSC-deadline timer, and VM exits
taking guest time (1 us each). Guest time is instructions retired and exits taken, so two runs
print the same clock values, and a restored snapshot continues
the very clocks the saved machine had (the guest prints its TSC/kvmclock/RTC readings)."""

from boot_support import Tap, boot, guest

from cetvm.cpu.native.loader import is_built
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine

PASS_STATUS = 1  # isa-debug-exit (0 << 1) | 1
LIMIT = 20_000_000


def run_machine(cpu: str = "sapphire-rapids", **run_args):
    out = bytearray()
    machine = Machine.boot(guest("clocks"), MachineConfig(cpu=cpu, memory="32M", serial_sink=out.extend))
    return machine, machine.run(max_instructions=LIMIT, **run_args), out


def test_every_clock_check_passes_on_an_intel_host(capsys):
    result = boot(capsys, "--memory", "32M", "--max-instructions", str(LIMIT), str(guest("clocks")))
    tap = result.tap
    tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    assert not tap.skipped()
    assert "# TSC 2000000000 Hz" in result.out
    for name in ("CPUID.15H states the TSC rate", "a VM exit (CPUID, handled by KVM) takes 1 us of guest time",
                 "an I/O exit takes 1 us too", "100 us APIC one-shot timer lasts 100 us of TSC",
                 "RDTSCP: ECX = IA32_TSC_AUX", "CR4.TSD = 1 -> #GP(0)", "WRMSR IA32_TIME_STAMP_COUNTER",
                 "publishes pvclock_vcpu_time_info", "kvmclock advances at the TSC", "legacy kvmclock MSRs",
                 "wall clock agrees with the RTC", "RTC seconds advance", "SET freezes the registers",
                 "TSC-deadline timer fires when the TSC reaches the deadline", "writing 0 disarms"):
        assert tap.passed(name), name


def test_amd_host_gets_the_rate_from_kvmclock_and_no_tsc_deadline(capsys):
    result = boot(capsys, "--cpu", "zen4", "--memory", "32M", "--max-instructions", str(LIMIT),
                  str(guest("clocks")))
    result.tap.assert_complete_and_green()
    assert result.status == PASS_STATUS, result.err
    skipped = result.tap.skipped()
    assert sum("CPUID.1:ECX[24] is clear" in s for s in skipped) == 4
    assert sum("not an Intel CPU" in s for s in skipped) == 2
    assert "# TSC 2000000000 Hz" in result.out


def test_clocks_are_deterministic():
    _, first, out1 = run_machine()
    _, second, out2 = run_machine()
    assert first.status == second.status == PASS_STATUS
    assert first.instructions == second.instructions
    assert out1 == out2
    assert b"# t rtc 2024-1-1 0:0:0 wday 2" in out1  # the fixed default epoch
    Tap.parse(out1.decode()).assert_complete_and_green()


def test_snapshot_restores_tsc_kvmclock_and_rtc_where_they_stood(tmp_path):
    _, whole, whole_out = run_machine()
    # stops: after kvmclock is on (the RTC tests read it), inside the 1.5 s halted wait (the APIC
    # one-shot armed), and in the TSC-deadline tests
    for marker in (b"kvmclock disabled", b"# t rtc", b"outside TSC-deadline mode"):
        out = bytearray()
        machine = Machine.boot(guest("clocks"), MachineConfig(memory="32M", serial_sink=out.extend))
        save_at = 0
        while marker not in out:
            save_at += 20_000
            stop = machine.run(save_at=save_at)
            assert stop.reason.value == "snapshot taken", stop
        path = tmp_path / "clocks.snap"
        machine.save(path)
        restored = Machine.restore(path, serial_sink=out.extend)
        rest = restored.run(max_instructions=LIMIT)
        assert rest.status == PASS_STATUS
        assert rest.instructions == whole.instructions
        assert bytes(out) == bytes(whole_out), marker


def test_host_wall_clock_option_starts_the_rtc_at_the_host_time():
    out = bytearray()
    config = MachineConfig(memory="32M", wall_clock="host", serial_sink=out.extend)
    machine = Machine.boot(guest("clocks"), config)
    assert machine.run(max_instructions=LIMIT).status == PASS_STATUS
    assert b"# t rtc 2024-1-1 0:0:0" not in out
    assert config.to_manifest()["wall_clock"] == config.realtime_base_ns


def test_python_cet_path_reads_the_same_clocks(monkeypatch):
    """RDTSC/RDTSCP are instruction hooks of the engine: native ones (extrapolating the TSC from
    the instruction counter) when the library is built, Python ones (reading the clock) on the
    Python CET path — the same values."""
    native_machine, native, native_out = run_machine()
    assert native_machine.vcpu.cpu.tsc.native == is_built()
    monkeypatch.setenv("CETVM_CET_PATH", "python")
    machine, python, python_out = run_machine()
    assert machine.vcpu.cpu.cet_path == "python" and not machine.vcpu.cpu.tsc.native
    assert python.instructions == native.instructions
    assert python_out == native_out


def test_wall_clock_option(capsys, tmp_path):
    result = boot(capsys, "--wall-clock", "1700000000000000000", "--memory", "32M", "--max-instructions",
                  str(LIMIT), str(guest("clocks")))
    assert result.status == PASS_STATUS, result.err
    assert "# t rtc 2023-11-14 22:13:20 wday 3" in result.out  # a Tuesday
    bad = boot(capsys, "--wall-clock", "yesterday", str(guest("clocks")))
    assert bad.status == 2 and bad.err.count("\n") == 1 and "wall clock must be" in bad.err
    both = boot(capsys, "--wall-clock", "host", "--restore-state", str(tmp_path / "none.snap"))
    assert both.status == 2 and "--wall-clock cannot be combined with --restore-state" in both.err


def test_snapshot_keeps_guest_time_exact(tmp_path):
    """Guest time counts VM exits (1 us each): a snapshot carries their number, so the restored
    machine's clock (the devices' and KVM's host clock) is the saved one's to the nanosecond."""
    machine = Machine.boot(guest("clocks"), MachineConfig(memory="32M", serial_sink=lambda _b: None))
    assert machine.run(save_at=400_000).reason.value == "snapshot taken"
    path = tmp_path / "time.snap"
    machine.save(path)
    assert machine.exits > 100
    restored = Machine.restore(path, serial_sink=lambda _b: None)
    assert (restored.instructions, restored.exits, restored.clock()) == \
        (machine.instructions, machine.exits, machine.clock())
