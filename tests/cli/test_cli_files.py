"""The file boundary on the command line (issue 9): no input or special file is ever truncated or
replaced, no input can block a command, big inputs are refused before they are read, non-UTF-8
arguments and outputs that fail are one line — never a traceback, never a silent exit 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cetvm.cpuid import get_model
from cetvm.vmm.snapshot import read_snapshot

from cli_support import JMP_SELF, assert_one_line_error, cetvm, debug_exit, elf64_kernel
from spec_images import serial_text

CETVM = [sys.executable, "-m", "cetvm.cli.main"]


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "k.elf"
    path.write_bytes(elf64_kernel(JMP_SELF))
    return path


@pytest.fixture
def talker(tmp_path):
    """Prints 600 bytes on COM1, then isa-debug-exit 3 (process status 7)."""
    path = tmp_path / "talk.elf"
    path.write_bytes(elf64_kernel(serial_text("hello world\n" * 50) + debug_exit(3) + JMP_SELF))
    return path


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


# --------------------------------------------------------------------------- data loss
def test_serial_onto_the_image_is_refused_and_the_image_survives(capsys, kernel):
    before = kernel.read_bytes()
    run = cetvm(capsys, "boot", str(kernel), "--serial", str(kernel))
    assert_one_line_error(run, 2, "--serial", "same file as IMAGE")
    assert kernel.read_bytes() == before


def test_serial_onto_the_restored_snapshot_is_refused(capsys, tmp_path, kernel):
    snap = tmp_path / "vm.snap"
    assert cetvm(capsys, "boot", str(kernel), "-m", "4M", "--save-state", str(snap), "--save-at", "100").status == 0
    before = snap.read_bytes()
    link = tmp_path / "hardlink"
    os.link(snap, link)  # same inode under another name
    run = cetvm(capsys, "boot", "--restore-state", str(snap), "--serial", str(link))
    assert_one_line_error(run, 2, "--serial", "same file as --restore-state")
    assert snap.read_bytes() == before


def test_serial_is_not_truncated_when_loading_fails(capsys, tmp_path):
    serial = tmp_path / "serial.txt"
    serial.write_text("previous run\n")
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"not a kernel")
    run = cetvm(capsys, "boot", str(bad), "--serial", str(serial))
    assert_one_line_error(run, 2, "not an elf")
    assert serial.read_text() == "previous run\n"


@pytest.mark.parametrize("option", ["--initrd", "--cpu"])
def test_serial_onto_another_input_is_refused(capsys, tmp_path, kernel, option):
    other = tmp_path / "input"
    other.write_text(json.dumps(get_model("zen4").to_json()))
    before = other.read_bytes()
    run = cetvm(capsys, "boot", str(kernel), option, str(other), "--serial", str(other))
    assert_one_line_error(run, 2, option)
    assert other.read_bytes() == before


def test_save_state_onto_the_image_is_refused(capsys, kernel):
    before = kernel.read_bytes()
    run = cetvm(capsys, "boot", str(kernel), "--save-state", str(kernel), "--save-at", "10")
    assert_one_line_error(run, 2, "--save-state", "same file as IMAGE")
    assert kernel.read_bytes() == before


@pytest.mark.parametrize("target", ["/dev/null", "fifo"])
def test_save_state_onto_a_special_file_is_refused_and_the_node_stays(capsys, kernel, fifo, target):
    target = fifo if target == "fifo" else target
    mode = os.stat(target).st_mode
    run = cetvm(capsys, "boot", str(kernel), "--save-state", target, "--save-at", "10")
    assert_one_line_error(run, 2, "--save-state", "regular file")
    assert os.stat(target).st_mode == mode


def test_machine_save_refuses_a_special_file(kernel, fifo):
    from cetvm import InputError
    from cetvm.vmm.config import MachineConfig
    from cetvm.vmm.machine import Machine

    machine = Machine.boot(kernel, MachineConfig(memory="4M"))
    with pytest.raises(InputError, match="FIFO"):
        machine.save(fifo)
    assert sorted(os.listdir(os.path.dirname(fifo))) == ["fifo", "k.elf"]


def test_save_ignores_a_stale_tmp_fifo_and_follows_a_symlink(tmp_path, kernel):
    """A FIFO where a naive writer would put PATH.tmp must not block the save; a symlink to a
    snapshot keeps being a symlink (the file it names is replaced)."""
    from cetvm.vmm.config import MachineConfig
    from cetvm.vmm.machine import Machine

    os.mkfifo(tmp_path / "vm.snap.tmp")
    (tmp_path / "real.snap").write_bytes(b"old")
    os.symlink("real.snap", tmp_path / "vm.snap")
    machine = Machine.boot(kernel, MachineConfig(memory="4M"))
    machine.run(max_instructions=50)
    machine.save(tmp_path / "vm.snap")
    assert os.path.islink(tmp_path / "vm.snap")
    assert read_snapshot(tmp_path / "real.snap")[0]["run"]["instructions"] == 50
    assert sorted(os.listdir(tmp_path)) == ["k.elf", "real.snap", "vm.snap", "vm.snap.tmp"]


def test_a_failed_save_leaves_the_old_snapshot(tmp_path, kernel, monkeypatch):
    from cetvm import InputError
    from cetvm.vmm import machine as machine_module
    from cetvm.vmm.config import MachineConfig

    snap = tmp_path / "vm.snap"
    snap.write_bytes(b"previous snapshot")
    machine = machine_module.Machine.boot(kernel, MachineConfig(memory="4M"))

    def full_disk(self, region):
        yield b"x" * 4096
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(machine_module.Machine, "_ram_chunks", full_disk)
    with pytest.raises(InputError, match="No space left"):
        machine.save(snap)
    assert snap.read_bytes() == b"previous snapshot"
    assert sorted(os.listdir(tmp_path)) == ["k.elf", "vm.snap"]


def test_save_state_may_replace_the_snapshot_it_continues(capsys, tmp_path, kernel):
    snap = tmp_path / "vm.snap"
    assert cetvm(capsys, "boot", str(kernel), "-m", "4M", "--save-state", str(snap), "--save-at", "100").status == 0
    run = cetvm(capsys, "boot", "--restore-state", str(snap), "--save-state", str(snap), "--save-at", "300")
    assert run.status == 0, run.err
    assert read_snapshot(snap)[0]["run"]["instructions"] == 300


def test_a_cpu_file_is_embedded_in_the_snapshot(capsys, tmp_path, kernel):
    """Restores after the file is deleted, from another directory; editing it changes nothing."""
    cpu = tmp_path / "my-cpu.json"
    cpu.write_text(json.dumps(get_model("zen4").to_json()))
    snap = tmp_path / "vm.snap"
    run = cetvm(capsys, "boot", str(kernel), "-m", "4M", "--cpu", str(cpu), "--save-state", str(snap),
                "--save-at", "100")
    assert run.status == 0, run.err
    manifest = read_snapshot(snap)[0]
    assert "cpu" not in manifest["machine"] and manifest["machine"]["cpu_model"]["vendor"] == "amd"
    cpu.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        run = cetvm(capsys, "boot", "--restore-state", "../vm.snap", "--max-instructions", "200", "--json")
    finally:
        os.chdir(cwd)
    assert run.status == 124 and json.loads(run.out)["instructions"] == 200


# --------------------------------------------------------------------------- hangs
@pytest.mark.parametrize("argv", [
    ["boot", "{fifo}"],
    ["boot", "{kernel}", "--cpu", "{fifo}"],
    ["boot", "{kernel}", "--initrd", "{fifo}"],
    ["boot", "--restore-state", "{fifo}"],
    ["cpuid", "{fifo}"],
    ["demo", "--image", "{fifo}"],
    ["caps", "--host", "{fifo}"],
])
def test_a_fifo_as_input_is_refused_without_blocking(capsys, kernel, fifo, argv):
    """A FIFO nobody writes to: a blocking open would wait forever (pytest's own timeout would be
    the only way out); cetvm refuses it at once."""
    argv = [a.format(fifo=fifo, kernel=kernel) for a in argv]
    run = cetvm(capsys, *argv)
    assert_one_line_error(run, 2, "FIFO", "regular file")
    assert run.out == ""


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_kernel_or_module_is_refused_before_reading(capsys, kernel, device):
    assert_one_line_error(cetvm(capsys, "boot", device), 2, "character device")
    assert_one_line_error(cetvm(capsys, "boot", str(kernel), "--initrd", device), 2, "character device")


def test_a_module_larger_than_ram_is_refused_from_its_size(capsys, tmp_path, kernel):
    big = tmp_path / "sparse.img"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: no disk, and a bounded read would take no memory either
    run = cetvm(capsys, "boot", str(kernel), "-m", "4M", "--initrd", str(big))
    assert_one_line_error(run, 2, "sparse.img", "too large", "guest RAM")


def test_a_big_non_kernel_is_refused_from_its_first_8_kib(tmp_path, monkeypatch):
    """Only the head is read to find no multiboot header and no ELF magic."""
    from cetvm import InputError
    from cetvm.files import READ_CHUNK
    from cetvm.vmm.loader import kernel as kernel_loader

    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (3 * READ_CHUNK))
    read = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real(fd, n))
    with pytest.raises(InputError, match="no multiboot header"):
        kernel_loader.load_kernel(big, 64 << 20)
    assert sum(read) <= 8192 + 64


# --------------------------------------------------------------------------- non-UTF-8 arguments
def test_non_utf8_append_reaches_the_guest_as_bytes(kernel):
    from cetvm.vmm.config import MachineConfig
    from cetvm.vmm.machine import Machine

    cmdline = os.fsdecode(b"console=\xff\xfe")
    machine = Machine.boot(kernel, MachineConfig(memory="4M", cmdline=cmdline))
    info = machine.boot_plan.info_addr
    blob = machine.vm.get_memory(info, 4096)
    assert b"console=\xff\xfe\x00" in blob


def test_non_utf8_initrd_path_boots(tmp_path, kernel):
    module = os.path.join(os.fsencode(tmp_path), b"mod\xff")
    with open(module, "wb") as f:
        f.write(b"module data")
    status = subprocess.run(CETVM + ["boot", str(kernel), "-m", "4M", "--initrd", os.fsdecode(module),
                                     "--append", os.fsdecode(b"\xff"), "--max-instructions", "100"],
                            capture_output=True, timeout=60)
    assert status.returncode == 124, status.stderr
    assert b"Traceback" not in status.stderr and b"internal error" not in status.stderr


# --------------------------------------------------------------------------- outputs that fail
def _shell(command: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, timeout=timeout)


def _cetvm_line() -> str:
    return " ".join(CETVM)


def test_stdout_full_is_one_error_line(talker):
    for argv in (f"boot {talker}", "caps"):
        done = _shell(f"{_cetvm_line()} {argv} >/dev/full")
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (argv, done.stderr)
        assert lines[0].startswith("cetvm: error:") and "No space left" in lines[0]


def test_serial_to_a_full_device_is_one_error_line(capsys, talker):
    run = cetvm(capsys, "boot", str(talker), "--serial", "/dev/full")
    assert_one_line_error(run, 2, "--serial '/dev/full'", "no space left")


def test_closed_stdout_keeps_the_guest_status(talker):
    done = _shell(f"{_cetvm_line()} boot {talker} >&-")
    assert done.returncode == 7 and b"Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("extra", ["", "--json"])
def test_a_closed_pipe_keeps_the_guest_status(talker, extra):
    done = _shell(f"{_cetvm_line()} boot {talker} {extra} | head -c1 >/dev/null; echo ${{PIPESTATUS[0]}}")
    assert done.stdout.decode().strip() == "7", done.stderr
    assert done.stderr == b""
