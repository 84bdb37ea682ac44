"""The initramfs writer (cetvm.linux.cpio): newc archives the kernel and GNU cpio can read."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess

import pytest

from cetvm.linux.cpio import CpioEntry, CpioFormatError, read_newc, with_parents, write_newc

ENTRIES = [
    CpioEntry.directory("bin"),
    CpioEntry.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
    CpioEntry.file("empty", b""),
    CpioEntry.file("odd", b"abc"),
    CpioEntry.symlink("bin/sh", "busybox"),
    CpioEntry.directory("dev"),
    CpioEntry.char_device("dev/console", 5, 1),
]


def test_round_trip_keeps_every_field_and_alignment():
    archive = write_newc(ENTRIES)
    assert len(archive) % 4 == 0
    assert read_newc(archive) == ENTRIES


def test_archive_is_deterministic():
    assert write_newc(ENTRIES) == write_newc(list(ENTRIES))


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed (the Python parser covers the format)")
def test_gnu_cpio_lists_and_extracts_it(tmp_path):
    archive = write_newc(ENTRIES)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True)
    assert listing.stdout.decode().split() == [e.path for e in ENTRIES]
    verbose = subprocess.run(["cpio", "-tv", "--quiet"], input=archive, capture_output=True, check=True).stdout.decode()
    console = next(line for line in verbose.splitlines() if line.endswith("dev/console"))
    assert re.match(r"crw------- .* 5,\s+1 ", console), console
    hello = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "bin/hello"], input=archive,
                           capture_output=True, check=True, cwd=tmp_path)
    assert hello.stdout == b"#!/bin/sh\necho hi\n"


def test_with_parents_adds_missing_directories_first():
    entries = with_parents([CpioEntry.file("opt/cetvm/tests/t", b"x"), CpioEntry.directory("opt"),
                            CpioEntry.file("init", b"y")])
    assert [e.path for e in entries] == ["opt", "opt/cetvm", "opt/cetvm/tests", "opt/cetvm/tests/t", "init"]
    assert all(stat.S_ISDIR(e.mode) for e in entries[:3])


@pytest.mark.parametrize("path", ["/init", "a/../b", "a//b", "", "./x", "a/b/"])
def test_bad_paths_are_refused(path):
    with pytest.raises(CpioFormatError, match="bad initramfs path"):
        write_newc([CpioEntry.file(path, b"")])


def test_malformed_archives_are_one_error_each():
    archive = write_newc(ENTRIES)
    with pytest.raises(CpioFormatError, match="truncated"):
        read_newc(archive[:-120])
    with pytest.raises(CpioFormatError, match="bad magic"):
        read_newc(b"070707" + archive[6:])
    with pytest.raises(CpioFormatError, match="not hex"):
        read_newc(archive[:6] + b"XYZ" + archive[9:])
    with pytest.raises(CpioFormatError, match="past the end"):
        read_newc(archive[:archive.index(b"echo hi")])
