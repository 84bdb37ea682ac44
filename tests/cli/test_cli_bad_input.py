"""Bad input to every command gives one precise line on stderr and exit status 2, never a
traceback (cetvm.cli.main's contract)."""

from __future__ import annotations

import errno
import json
import struct

import pytest

from cetvm.cli import boot as boot_cli
from cetvm.cpuid import model_names

from cli_support import (
    EM_386, EM_AARCH64, KERNEL_BASE, JMP_SELF, assert_one_line_error, cetvm, debug_exit, elf, elf64_kernel,
    multiboot_header,
)


@pytest.fixture
def files(tmp_path):
    """Named bad (and one good) input files."""
    made = {
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
        "text": b"hello world\n",
        "elf_truncated": elf64_kernel(JMP_SELF)[:40],
        "elf_aarch64": elf(64, EM_AARCH64, b"\x00\x00\x00\x14"),
        "elf32_no_multiboot": elf(32, EM_386, b"\xF4"),
        "elf64_relocatable": elf64_kernel(JMP_SELF, etype=1),
        "multiboot_bad_checksum": elf(32, EM_386, b"\xF4", prefix=multiboot_header(0x3, checksum=0x1234)),
        "multiboot_video": elf(32, EM_386, b"\xF4", prefix=multiboot_header(0x4)),
        # 8 MiB of bss after a kernel at 1 MiB: larger than --memory 4M
        "kernel_8m": elf64_kernel(JMP_SELF, memsz=8 << 20),
        "kernel": elf64_kernel(debug_exit(0)),
    }
    paths = {}
    for name, data in made.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths[name] = str(path)
    paths["dir"] = str(tmp_path)
    paths["missing"] = str(tmp_path / "no-such-file")
    return paths


BOOT_CASES = [
    # (argv with {placeholders}, fragments the one line must contain)
    (["boot", "{missing}"], ["no-such-file", "no such file"]),
    (["boot", "{dir}"], ["is a directory"]),
    (["boot", "{empty}"], ["empty", "not an elf"]),
    (["boot", "{garbage}"], ["garbage", "no multiboot header"]),
    (["boot", "{text}"], ["not an elf", "hell"]),
    (["boot", "{elf_truncated}"], ["truncated elf"]),
    (["boot", "{elf_aarch64}"], ["aarch64", "x86-64"]),
    (["boot", "{elf32_no_multiboot}"], ["32-bit", "multiboot"]),
    (["boot", "{elf64_relocatable}"], ["ET_REL", "ET_EXEC"]),
    (["boot", "{multiboot_bad_checksum}"], ["checksum", "0x00001234"]),
    (["boot", "{multiboot_video}"], ["video mode"]),
    (["boot", "{kernel_8m}", "--memory", "4M"], ["kernel_8m", "outside RAM", "4 MiB of RAM"]),
    (["boot", "{kernel}", "--memory", "0"], ["too small", "2 MiB"]),
    (["boot", "{kernel}", "--memory", "1K"], ["too small"]),
    (["boot", "{kernel}", "--memory", "100T"], ["larger than"]),
    (["boot", "{kernel}", "--memory", "abc"], ["'abc'", "256M"]),
    (["boot", "{kernel}", "--memory", "1.5G"], ["'1.5G'"]),
    (["boot", "{kernel}", "--timeout", "-1"], ["--timeout", "'-1'"]),
    (["boot", "{kernel}", "--timeout", "0"], ["--timeout", "positive"]),
    (["boot", "{kernel}", "--timeout", "abc"], ["--timeout", "'abc'"]),
    (["boot", "{kernel}", "--timeout", "nan"], ["--timeout", "'nan'"]),
    (["boot", "{kernel}", "--max-instructions", "0"], ["--max-instructions", "'0'"]),
    (["boot", "{kernel}", "--max-instructions", "-5"], ["--max-instructions"]),
    (["boot", "{kernel}", "--max-instructions", "1e6"], ["--max-instructions", "'1e6'"]),
    (["boot", "{kernel}", "--save-state", "{dir}/s", "--save-at", "0"], ["--save-at"]),
    (["boot", "{kernel}", "--save-at", "10"], ["--save-at needs --save-state"]),
    (["boot", "{kernel}", "--cpu", "pentium"], ["pentium", *model_names()]),
    (["boot", "{kernel}", "--cpu", "sapphire"], ["did you mean sapphire-rapids"]),
    (["boot", "{kernel}", "--cpu", "{dir}"], ["is a directory"]),
    (["boot", "{kernel}", "--cpu", "{garbage}"], ["binary file"]),
    (["boot", "{kernel}", "--cpu", "{empty}"], ["empty file"]),
    (["boot", "{kernel}", "--cet", "maybe"], ["--cet", "'maybe'", "shstk"]),
    (["boot", "{kernel}", "--serial", "{missing}/out.txt"], ["--serial", "no such file"]),
    (["boot", "{kernel}", "--serial", "{dir}"], ["--serial", "is a directory"]),
    (["boot", "{kernel}", "--initrd", "{missing}"], ["module", "no-such-file"]),
    (["boot", "{kernel}", "--initrd", "{dir}"], ["module", "is a directory"]),
    (["boot", "{kernel}", "--save-state", "{missing}/vm.snap"], ["--save-state", "does not exist"]),
    (["boot", "{kernel}", "--save-state", "{dir}"], ["--save-state", "is a directory"]),
    (["boot", "--restore-state", "{missing}"], ["snapshot", "no such file"]),
    (["boot", "--restore-state", "{dir}"], ["snapshot", "is a directory"]),
    (["boot", "--restore-state", "{empty}"], ["not a cetvm snapshot"]),
    (["boot", "--restore-state", "{garbage}"], ["not a cetvm snapshot"]),
    (["boot", "--restore-state", "{kernel}"], ["not a cetvm snapshot", "\\x7fELF"]),
    (["boot", "{kernel}", "--restore-state", "{garbage}"], ["either IMAGE or --restore-state"]),
    (["boot", "--restore-state", "{garbage}", "--memory", "16M"], ["--memory", "cannot be combined"]),
    (["boot"], ["missing IMAGE"]),
    (["boot", "{kernel}", "{kernel}"], ["unrecognized arguments"]),
    (["boot", "{kernel}", "--frobnicate"], ["--frobnicate"]),
]


@pytest.mark.parametrize("argv, fragments", BOOT_CASES, ids=[" ".join(a) for a, _ in BOOT_CASES])
def test_boot_bad_input_is_one_line_exit_2(capsys, files, argv, fragments):
    run = cetvm(capsys, *(a.format(**files) for a in argv))
    assert_one_line_error(run, 2, "cetvm: error:", *fragments)
    assert run.out == ""


def test_a_host_that_cannot_allocate_the_guest_ram_is_a_memory_error(capsys, files, monkeypatch):
    # what an anonymous mmap of --memory 60T does on a host without that much memory
    def no_memory(*_args, **_kw):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(boot_cli.Machine, "boot", no_memory)
    run = cetvm(capsys, "boot", files["kernel"], "--memory", "60T")
    assert_one_line_error(run, 2, "--memory 60T", "cannot allocate")


OTHER_CASES = [
    (["cpuid", "{missing}"], ["neither a CPU model", "sapphire-rapids"]),
    (["cpuid", "{dir}"], ["is a directory"]),
    (["cpuid", "{empty}"], ["empty file"]),
    (["cpuid", "{garbage}"], ["binary file"]),
    (["cpuid", "{text}"], ["unrecognized CPUID dump"]),
    (["cpuid"], ["cpuid", "FILE|MODEL"]),
    (["cpuid", "tiger-lake", "--json", "--export"], ["not allowed with"]),
    (["caps", "--host", "pentium"], ["pentium", "zen4"]),
    (["caps", "--host", "{garbage}"], ["binary file"]),
    (["caps", "--vmx-basic-56", "maybe"], ["--vmx-basic-56", "'maybe'"]),
    (["caps", "--virt", "hvf"], ["--virt", "'hvf'"]),
    (["caps", "--kernel-cmdline", "ibt=foo"], ["ibt=", "'foo'"]),
    (["demo", "--image", "{missing}"], ["no-such-file"]),
    (["demo", "--image", "{garbage}"], ["no multiboot header"]),
    (["demo", "--image", "{dir}"], ["is a directory"]),
    (["bench", "--iterations", "0"], ["--iterations", "0"]),
    (["bench", "--iterations", "abc"], ["--iterations", "'abc'"]),
    (["bench", "--repeats", "0"], ["--repeats", "0"]),
    (["--cet-path", "fast", "caps"], ["--cet-path", "'fast'"]),
    (["frobnicate"], ["'frobnicate'", "boot"]),
    ([], ["no COMMAND"]),
]


@pytest.mark.parametrize("argv, fragments", OTHER_CASES, ids=[" ".join(a) or "(none)" for a, _ in OTHER_CASES])
def test_other_commands_bad_input_is_one_line_exit_2(capsys, files, argv, fragments):
    run = cetvm(capsys, *(a.format(**files) for a in argv))
    assert_one_line_error(run, 2, "cetvm: error:", *fragments)


def _cpuid_json(tmp_path, entries) -> str:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"format": "cetvm-cpuid/1", "name": "bad", "entries": entries}))
    return str(path)


GOOD_ENTRY = {"leaf": "0x0", "subleaf": "0x0", "eax": "0xd", "ebx": "0x756e6547", "ecx": "0x6c65746e",
              "edx": "0x49656e69"}


@pytest.mark.parametrize("field, value", [
    ("eax", True), ("eax", []), ("eax", "zz"), ("eax", 1 << 40), ("eax", -1), ("leaf", None), ("ebx", 1.5),
])
def test_cpuid_json_with_a_wrong_type_names_the_entry_and_field(capsys, tmp_path, field, value):
    path = _cpuid_json(tmp_path, [GOOD_ENTRY, dict(GOOD_ENTRY, subleaf="0x1", **{field: value})])
    for argv in (["cpuid", path], ["caps", "--host", path], ["boot", path, "--cpu", path]):
        run = cetvm(capsys, *argv)
        assert_one_line_error(run, 2, "entries[1]", field)


@pytest.mark.parametrize("doc", [[1, 2], {"format": "cetvm-cpuid/2", "entries": []}, {"entries": []},
                                 {"format": "cetvm-cpuid/1", "entries": {}},
                                 {"format": "cetvm-cpuid/1", "entries": [[1, 2, 3]]}])
def test_cpuid_json_with_a_wrong_shape_is_one_line(capsys, tmp_path, doc):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc))
    assert_one_line_error(cetvm(capsys, "cpuid", str(path)), 2, "model.json")


def test_a_cpuid_dump_line_with_bad_hex_names_the_line(capsys, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("header\nCPUID 00000000: 0000000D-756E6547-6C65746E-49656E69\nCPUID 00000001: 0000-zz\n")
    assert_one_line_error(cetvm(capsys, "cpuid", str(path)), 2, "bad.txt line 3", "'0000-zz'")


def test_multiboot_header_cut_off_by_the_end_of_the_file(capsys, tmp_path):
    # a.out kludge flag (bit 16) but the file ends right after magic/flags/checksum
    path = tmp_path / "cut.bin"
    path.write_bytes(bytes(64) + multiboot_header(1 << 16))
    assert_one_line_error(cetvm(capsys, "boot", str(path)), 2, "truncated multiboot header")


def test_elf_with_an_absurd_program_header_count_is_one_line(capsys, tmp_path):
    data = bytearray(elf64_kernel(JMP_SELF))
    struct.pack_into("<H", data, 56, 0xFFFF)  # e_phnum
    path = tmp_path / "phnum.elf"
    path.write_bytes(bytes(data))
    assert_one_line_error(cetvm(capsys, "boot", str(path)), 2, "truncated ELF", "program header")


def test_elf_entry_outside_its_segments_is_one_line(capsys, tmp_path):
    data = bytearray(elf64_kernel(JMP_SELF))
    struct.pack_into("<Q", data, 24, KERNEL_BASE + 0x10_0000)  # e_entry past the segment
    path = tmp_path / "entry.elf"
    path.write_bytes(bytes(data))
    assert_one_line_error(cetvm(capsys, "boot", str(path)), 2, "entry point", "not inside")
