"""The qemu-system-x86_64 front end (cetvm.vmm.qemu_frontend): what kvm-unit-tests' scripts
probe and pass, QEMU's exit statuses, one line for everything refused; and, when a built
kvm-unit-tests tree is available ($CETVM_KUT or /work/ext/kut), x86/run running unmodified."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cetvm.vmm import qemu_frontend as fe
from spec_images import debug_exit, elf64_kernel, out_imm8, serial_text

KUT = Path(os.environ.get("CETVM_KUT", "/work/ext/kut"))
FRONTEND = Path(sys.executable).parent / "cetvm-qemu-system-x86_64"


def run(argv, tmp_path=None):
    out, err = io.BytesIO(), io.StringIO()
    status = fe.run(argv, stdout=out, stderr=err)
    return status, out.getvalue().decode(), err.getvalue()


def kernel(tmp_path, code: bytes) -> str:
    path = tmp_path / "k.elf"
    path.write_bytes(elf64_kernel(code))
    return str(path)


def test_help_first_line_is_what_kvm_unit_tests_parses():
    status, out, _ = run(["-h"])
    assert status == 0 and "QEMU" in out
    version = out.splitlines()[0].replace(".", " ").split()
    assert version[:3] == ["QEMU", "emulator", "version"] and version[3:6] == ["7", "2", "0"]


def test_device_list_has_the_quoted_names_x86_run_greps():
    status, out, _ = run(["-device", "?"])
    assert status == 0
    assert '"pc-testdev"' in out and '"pci-testdev"' in out and '"isa-debug-exit"' in out


def test_premature_failure_probe_message():
    """run_tests.sh boots a missing kernel and expects QEMU's "could not load kernel"."""
    status, out, err = run(["-nodefaults", "-kernel", "_NO_FILE_4Uhere_", "-smp", "1"])
    assert status == 1 and "could not load kernel '_NO_FILE_4Uhere_'" in err and err.count("\n") == 1


def test_smp_above_the_maximum_is_qemus_invalid_smp_line():
    status, _, err = run(["-kernel", "_NO_FILE_4Uhere_", "-smp", "9"])
    assert status == 1 and "Invalid SMP CPUs 9. The max CPUs supported by machine 'cetvm' is 8" in err


@pytest.mark.parametrize("argv,words", [
    (["-hda", "disk.img"], "invalid option"),
    (["-device", "e1000"], "not a valid device model"),
    (["-machine", "accel=hvf"], "invalid accelerator"),
    (["-display", "gtk"], "no display"),
    (["-cpu", "Haswell"], "unknown CPU model"),
    (["-cpu", "max,+notafeature"], "unknown CPU feature"),
    (["-m", "lots"], "invalid RAM size"),
])
def test_anything_else_is_refused_with_one_line(argv, words):
    status, _, err = run(argv + ["-kernel", "/nonexistent"])
    assert status == 1 and words in err and err.count("\n") == 1 and err.startswith("qemu-system-x86_64: ")


def test_the_whole_x86_run_command_line_parses():
    cmd = fe.parse_command_line(
        "--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard -device pc-testdev -device "
        "isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio -device pci-testdev -machine "
        "accel=kvm -kernel x86/cet.flat -smp 2 -enable-kvm -m 2048 -cpu host -append a -initrd env".split())
    assert (cmd.kernel, cmd.smp, cmd.memory, cmd.cpu, cmd.serial) == ("x86/cet.flat", 2, 2048 << 20, "host", "stdio")
    config = cmd.machine_config(None)
    assert config.cmdline == "x86/cet.flat a"  # QEMU's multiboot cmdline: "KERNEL APPEND"
    assert config.modules == ("env",) and config.smp == 2 and config.guest_cpu == ""
    assert fe.parse_qemu_memory("4g") == 4 << 30 and fe.parse_qemu_memory("512M") == 512 << 20


def test_guest_exit_status_is_isa_debug_exit_and_serial_goes_to_stdout(tmp_path):
    k = kernel(tmp_path, serial_text("hi\n") + debug_exit(0x10))
    status, out, err = run(["-nodefaults", "-serial", "stdio", "-display", "none", "-kernel", k, "-m", "64"])
    assert (status, out, err) == (0x21, "hi\n", "")
    status, out, _ = run(["-nodefaults", "-kernel", k])  # no -serial: COM1 goes nowhere
    assert status == 0x21 and out == ""


def test_power_off_is_status_0(tmp_path):
    code = b"".join(b"\x66\xBA\x00\x89" + bytes([0xB0, c, 0xEE]) for c in b"Shutdown")
    status, _, err = run(["-kernel", kernel(tmp_path, code)])
    assert status == 0 and err == ""


def test_smp_2_boots(tmp_path):
    status, _, err = run(["-kernel", kernel(tmp_path, debug_exit(0)), "-smp", "2"])
    assert status == 1 and err == ""


def test_cpu_warnings_are_qemu_warning_lines(tmp_path):
    status, _, err = run(["-kernel", kernel(tmp_path, debug_exit(0)), "-cpu", "qemu64,+x2apic,+avx"])
    assert status == 1
    assert err.startswith("qemu-system-x86_64: warning: host doesn't support requested feature") and "avx" in err


def test_pc_testdev_is_there_when_asked_for(tmp_path):
    # out 0xE0, 0x5A; in al, 0xE0; out 0xF4, al  -> status (0x5A << 1) | 1
    code = out_imm8(0xE0, 0x5A) + b"\xE4\xE0" + b"\xE6\xF4"
    k = kernel(tmp_path, code)
    assert run(["-device", "pc-testdev", "-kernel", k])[0] == (0x5A << 1 | 1) & 0xFF
    assert run(["-kernel", k])[0] == 0xFF  # unclaimed port reads all ones


@pytest.mark.skipif(not (KUT / "x86" / "hypercall.flat").is_file(),
                    reason=f"kvm-unit-tests not built at {KUT} (set CETVM_KUT to a built tree)")
def test_kvm_unit_tests_x86_run_hypercall_passes_unmodified():
    """x86/run, unmodified, with QEMU=the console script (VMMCALL and the canonical-edge
    VMCALL: bugs kvm-unit-tests found, kept fixed by test_guest_cpuid_honesty too)."""
    env = dict(os.environ, QEMU=str(FRONTEND))
    proc = subprocess.run(["./x86/run", "x86/hypercall.flat", "-smp", "1"], cwd=KUT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SUMMARY: 4 tests" in proc.stdout and "FAIL" not in proc.stdout


def test_the_host_kernel_command_line_sets_kvm_module_parameters(monkeypatch):
    """$CETVM_QEMU_HOST_CMDLINE is the modeled host's kernel command line: with
    kvm.force_emulation_prefix=1 KVM emulates after the prefix (and refuses CET-guarded
    instructions); without it the prefix is a plain #UD."""
    from guest_build import tap_kernel
    image = str(tap_kernel("fep_cet"))
    monkeypatch.setenv(fe.HOST_CMDLINE_ENV, "kvm.force_emulation_prefix=1")
    status, out, err = run(["-kernel", image, "-append", "fep=1", "-m", "32", "-serial", "stdio"])
    assert status == 1 and "# 0 failed" in out and "SKIP" not in out, (out, err)
    monkeypatch.delenv(fe.HOST_CMDLINE_ENV)
    status, out, _ = run(["-kernel", image, "-append", "fep=1", "-m", "32", "-serial", "stdio"])
    assert "not ok 1 - FEP NOP" in out


def test_an_amd_guest_has_syscall_in_compatibility_mode():
    """kvm-unit-tests x86/syscall (-cpu Opteron_G1,vendor=AuthenticAMD): Intel hardware has no
    SYSCALL outside 64-bit mode (#UD), KVM emulates it for a guest whose CPUID says AMD (to
    IA32_CSTAR); the same kernel on the default Intel model still sees the #UD."""
    from guest_build import tap_kernel
    image = str(tap_kernel("compat_events"))
    status, out, err = run(["-kernel", image, "-m", "32", "-serial", "stdio", "-cpu", "qemu64,vendor=AuthenticAMD"])
    assert status == 1 and "# 0 failed" in out, (out, err)
    assert "# AMD guest without CET: KVM emulates SYSCALL from compatibility mode" in out
    assert "\nok 2 - SYSCALL in compatibility mode" in out


def test_rtc_base_follows_qemu_default_host_time_or_a_given_date():
    """QEMU's RTC starts at the host's UTC time unless -rtc base= says otherwise (kvm-unit-tests'
    kvmclock_test compares kvmclock's wall clock with `date +%s`)."""
    assert fe.parse_command_line(["-kernel", "k"]).wall_clock == "host"
    assert fe.parse_command_line(["-rtc", "base=utc,clock=vm"]).wall_clock == "host"
    assert fe.parse_command_line(["-rtc", "base=2020-02-03T04:05:06"]).wall_clock == 1_580_702_706 * 10**9
    assert fe.parse_command_line(["-rtc", "base=2020-02-03"]).wall_clock == 1_580_688_000 * 10**9
    for bad in ("base=2020-02-30", "base=yesterday", "base=1969-12-31", "speed=fast"):
        with pytest.raises(fe.QemuUsageError):
            fe.parse_command_line(["-rtc", bad])
