"""`cetvm boot` on hand-built kernels: the ELF64 entry, exit statuses, diagnoses, bad images."""

import json
import struct

import pytest

from cetvm.arch.cpuid_bits import IBT, SHSTK
from cetvm.cpuid import get_model
from cetvm.kvm.api import Kvm
from cetvm.kvm.host import Host
from cetvm.vmm.config import CetMode, MachineConfig, guest_cpuid, parse_memory_size

from boot_support import CLI_HLT, JMP_SELF, UD2, boot, debug_exit, elf64_kernel, serial_text


@pytest.fixture
def kernel(tmp_path):
    def make(code: bytes, name: str = "k.elf"):
        path = tmp_path / name
        path.write_bytes(elf64_kernel(code))
        return str(path)
    return make


def test_elf64_kernel_prints_on_com1_and_exits_through_isa_debug_exit(capsys, kernel):
    result = boot(capsys, kernel(serial_text("hello\n") + debug_exit(0x21)), "--memory", "16M")
    assert result.out == "hello\n"
    assert result.status == (0x21 << 1 | 1) & 0xFF
    assert result.err == ""


def test_serial_to_a_file_and_json_result(capsys, kernel, tmp_path):
    log = tmp_path / "serial.txt"
    result = boot(capsys, kernel(serial_text("hi") + debug_exit(0)), "--memory", "16M", "--serial", str(log), "--json")
    doc = json.loads(result.out)
    assert log.read_text() == "hi"
    assert "serial" not in doc
    assert (doc["status"], doc["reason"], doc["last_exception"]) == (1, "guest exit", None)
    # three instructions per byte, then mov; the OUT that stops the machine never completes
    assert doc["instructions"] == 2 * 3 + 1


def test_json_carries_the_serial_output_when_not_sent_to_a_file(capsys, kernel):
    result = boot(capsys, kernel(serial_text("ab") + debug_exit(0)), "--memory", "16M", "--json")
    assert json.loads(result.out)["serial"] == "ab"


def test_hlt_with_interrupts_off_stops_as_guest_halted(capsys, kernel):
    result = boot(capsys, kernel(CLI_HLT), "--memory", "16M", "--json")
    doc = json.loads(result.out)
    assert result.status == 0 and doc["reason"] == "guest halted"
    assert doc["rip"] in (0x100001, 0x100002)


def test_triple_fault_exits_125_with_a_one_line_diagnosis(capsys, kernel):
    # ud2 with the reset IDT (base 0, all zero: no present gate) -> #NP/#GP -> #DF -> shutdown
    result = boot(capsys, kernel(UD2), "--memory", "16M")
    assert result.status == 125
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "triple fault" in lines[0] and "rip=0x10000" in lines[0]


def test_wall_clock_timeout_exits_124(capsys, kernel):
    result = boot(capsys, kernel(JMP_SELF), "--memory", "16M", "--timeout", "0.3")
    assert result.status == 124 and "timeout" in result.err and "rip=0x100000" in result.err


def test_instruction_limit_counts_exactly(capsys, kernel):
    result = boot(capsys, kernel(JMP_SELF), "--memory", "16M", "--max-instructions", "5000", "--json")
    doc = json.loads(result.out)
    assert result.status == 124 and doc["reason"] == "instruction limit" and doc["instructions"] == 5000


def test_not_an_elf_is_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("just text\n")
    result = boot(capsys, str(bad))
    assert result.status == 2 and len(result.err.strip().splitlines()) == 1 and "not an ELF" in result.err


def test_elf_for_another_machine_is_one_line_exit_2(capsys, tmp_path):
    image = bytearray(elf64_kernel(JMP_SELF))
    struct.pack_into("<H", image, 18, 183)  # e_machine = AArch64
    path = tmp_path / "arm.elf"
    path.write_bytes(bytes(image))
    result = boot(capsys, str(path))
    assert result.status == 2 and "AArch64" in result.err and len(result.err.strip().splitlines()) == 1


def test_missing_image_and_bad_memory_size_are_input_errors(capsys, tmp_path):
    assert boot(capsys, str(tmp_path / "nope.elf")).status == 2
    result = boot(capsys, str(tmp_path / "nope.elf"), "--memory", "lots")
    assert result.status == 2 and "memory size" in result.err


@pytest.mark.parametrize("text, size", [("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20),
                                        ("4194304", 4 << 20)])
def test_memory_sizes(text, size):
    assert parse_memory_size(text) == size


def supported():
    return Kvm(Host(get_model("sapphire-rapids"))).get_supported_cpuid()


@pytest.mark.parametrize("mode, shstk, ibt", [("on", True, True), ("shstk", True, False), ("ibt", False, True),
                                              ("off", False, False)])
def test_guest_cpuid_shows_the_cet_features_asked_for(mode, shstk, ibt):
    model = guest_cpuid(supported(), CetMode.parse(mode))
    assert (model.has(SHSTK.name), model.has(IBT.name)) == (shstk, ibt)


def test_cet_off_also_hides_the_cet_xss_components():
    base = supported()
    cet_bits = (1 << 11) | (1 << 12)
    assert base.get(0xD, 1)[2] & cet_bits == cet_bits
    off = guest_cpuid(base, CetMode.OFF)
    assert off.get(0xD, 1)[2] & cet_bits == 0
    assert off.get(0xD, 1)[2] == base.get(0xD, 1)[2] & ~cet_bits  # other XSS components stay
    assert guest_cpuid(base, CetMode.IBT).get(0xD, 1)[2] & cet_bits == cet_bits


def test_machine_config_survives_a_manifest_round_trip():
    config = MachineConfig(cpu="zen4", memory="64M", cet="ibt", cmdline="quiet")
    again = MachineConfig.from_manifest(config.to_manifest())
    assert (again.cpu, again.memory, again.cet, again.cmdline) == ("zen4", 64 << 20, CetMode.IBT, "quiet")
