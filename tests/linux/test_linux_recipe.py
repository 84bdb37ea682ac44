"""The recipe's cache logic (cetvm.linux.recipe) with a fake apt: download once, check the pinned
SHA-256, extract, reuse; offline runs; the initramfs it writes."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
import stat
import subprocess

import pytest

from cetvm.linux import NotCached, RecipeError, linux_guest
from cetvm.linux import packages as pins
from cetvm.linux.cpio import read_newc
from cetvm.linux.init_script import TESTS_DIR
from cetvm.linux.recipe import default_cache_dir, our_test_programs, package_files
from linux_support import FakeApt, deb_bytes, pinned, tar_bytes

KERNEL_BYTES = b"MZ fake bzImage"
BUSYBOX_BYTES = b"\x7fELF fake busybox"
SELFTEST_C = b'#include <stdio.h>\nint main(void) { puts("[SKIP]\\tfake selftest"); return 1; }\n'


@pytest.fixture
def fake_packages(monkeypatch):
    """Pins that match tiny packages laid out like the real ones, and an apt that serves them."""
    debs = {
        "kernel": deb_bytes({member: KERNEL_BYTES if "vmlinuz" in member else b"CONFIG_X86_KERNEL_IBT=y\n"
                             for member in pins.KERNEL_FILES}),
        "busybox": deb_bytes({"bin/busybox": BUSYBOX_BYTES}),
        "dbg": deb_bytes({member: b"ffffffff81000000 T _text\n" for member in pins.KERNEL_DBG_FILES}),
        "source": deb_bytes({pins.LINUX_SOURCE_TARBALL: lzma.compress(tar_bytes({pins.SELFTEST_SOURCE: SELFTEST_C},
                                                                                prefix=""))}),
    }
    for attr, key in (("KERNEL", "kernel"), ("BUSYBOX", "busybox"), ("KERNEL_DBG", "dbg"), ("LINUX_SOURCE", "source")):
        monkeypatch.setattr(pins, attr, pinned(f"fake-{key}", debs[key]))
    return FakeApt({f"fake-{k}": v for k, v in debs.items()})


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "prog" / "shstk_fake"
    path.parent.mkdir()
    path.write_bytes(b"\x7fELF fake test")
    return path


def test_downloads_once_then_reuses_the_cache(tmp_path, fake_packages, program):
    cache = tmp_path / "cache"
    guest = linux_guest(cache, test_programs=[program], downloader=fake_packages)
    assert fake_packages.calls == ["fake-kernel", "fake-busybox"]
    assert guest.kernel.read_bytes() == KERNEL_BYTES
    assert guest.tests == ("shstk_fake",)
    assert guest.system_map is None and guest.selftest is None
    assert not list((cache / "downloads").glob("*.deb")), "downloaded packages are deleted after extraction"
    again = linux_guest(cache, test_programs=[program], downloader=fake_packages, download=False)
    assert fake_packages.calls == ["fake-kernel", "fake-busybox"]
    assert again == guest


def test_the_stamp_records_the_checked_sha256(tmp_path, fake_packages):
    files = package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    stamp = json.loads((files["busybox"].parent / "complete.json").read_text())
    assert stamp["sha256"] == pins.BUSYBOX.sha256 and stamp["version"] == pins.BUSYBOX.version
    assert stamp["files"] == {"busybox": hashlib.sha256(BUSYBOX_BYTES).hexdigest()}


def test_a_new_pin_or_a_lost_or_damaged_file_downloads_again(tmp_path, fake_packages, monkeypatch):
    files = package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    files["busybox"].unlink()
    package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    assert fake_packages.calls == ["fake-busybox", "fake-busybox"]
    files["busybox"].write_bytes(BUSYBOX_BYTES[:-1])
    package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    assert files["busybox"].read_bytes() == BUSYBOX_BYTES
    fake_packages.calls.remove("fake-busybox")
    stamp = files["busybox"].parent / "complete.json"
    stamp.write_text(stamp.read_text().replace(pins.BUSYBOX.sha256, "0" * 64))
    package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    assert len(fake_packages.calls) == 3


def test_a_download_that_does_not_match_the_pin_is_refused_and_deleted(tmp_path, fake_packages, monkeypatch):
    fake_packages.debs["fake-busybox"] = deb_bytes({"bin/busybox": b"tampered"})
    with pytest.raises(RecipeError, match="corrupt or not the pinned package"):
        package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    assert not list(tmp_path.rglob("*.deb"))
    assert not list(tmp_path.rglob("complete.json"))


def test_offline_with_an_empty_cache_says_what_is_missing(tmp_path, fake_packages, program):
    with pytest.raises(NotCached, match="fake-kernel 1.0-1 is not in the cache"):
        linux_guest(tmp_path, test_programs=[program], downloader=fake_packages, download=False)
    assert fake_packages.calls == []


def test_initramfs_contents(tmp_path, fake_packages, program):
    guest = linux_guest(tmp_path, test_programs=[program], downloader=fake_packages)
    entries = {e.path: e for e in read_newc(gzip.decompress(guest.initrd.read_bytes()))}
    assert entries["bin/busybox"].data == BUSYBOX_BYTES and entries["bin/busybox"].mode & 0o111
    assert entries["init"].data.startswith(b"#!/bin/busybox sh\n") and entries["init"].mode & 0o111
    assert entries[f"{TESTS_DIR}/shstk_fake"].data == program.read_bytes()
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    for directory in ("proc", "sys", "dev", "opt/cetvm/tests"):
        assert stat.S_ISDIR(entries[directory].mode)


def test_initramfs_is_rewritten_only_when_it_changes(tmp_path, fake_packages, program):
    first = linux_guest(tmp_path, test_programs=[program], downloader=fake_packages)
    before = first.initrd.stat().st_mtime_ns
    linux_guest(tmp_path, test_programs=[program], downloader=fake_packages)
    assert first.initrd.stat().st_mtime_ns == before
    program.write_bytes(b"\x7fELF changed")
    second = linux_guest(tmp_path, test_programs=[program], downloader=fake_packages)
    entries = {e.path: e for e in read_newc(gzip.decompress(second.initrd.read_bytes()))}
    assert entries[f"{TESTS_DIR}/shstk_fake"].data == b"\x7fELF changed"


def test_symbols_come_from_the_dbg_package(tmp_path, fake_packages, program):
    guest = linux_guest(tmp_path, test_programs=[program], downloader=fake_packages, with_symbols=True)
    assert guest.system_map.read_text().startswith("ffffffff81000000 T _text")
    assert "fake-dbg" in fake_packages.calls


def _static_gcc() -> bool:
    if shutil.which("gcc") is None:
        return False
    libc = subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    return libc.startswith("/")


@pytest.mark.skipif(not _static_gcc(), reason="needs gcc and glibc's static libc.a (Debian's libc6-dev)")
def test_selftest_is_extracted_from_the_nested_tarball_and_built_static(tmp_path, fake_packages, program):
    guest = linux_guest(tmp_path, test_programs=[program], downloader=fake_packages, with_selftest=True)
    assert guest.selftest is not None and guest.tests == ("shstk_fake", pins.SELFTEST_BINARY)
    run = subprocess.run([str(guest.selftest)], capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (1, "[SKIP]\tfake selftest\n")
    assert guest.initrd.name.startswith("initrd-selftest-custom-")
    built = guest.selftest.stat().st_mtime_ns
    linux_guest(tmp_path, test_programs=[program], downloader=fake_packages, with_selftest=True)
    assert guest.selftest.stat().st_mtime_ns == built, "a cached selftest is not rebuilt"


def test_a_selftest_that_does_not_compile_is_one_error(tmp_path, fake_packages, program):
    with pytest.raises(RecipeError, match="building test_shadow_stack_64 failed"):
        linux_guest(tmp_path, test_programs=[program], downloader=fake_packages, with_selftest=True,
                    compiler="false")


def test_cmdline_for_checks_the_names(tmp_path, fake_packages, program):
    guest = linux_guest(tmp_path, test_programs=[program], downloader=fake_packages)
    assert guest.cmdline_for(["shstk_fake"], "shell").split()[2:] == ["cetvm.tests=shstk_fake", "cetvm.mode=shell"]
    with pytest.raises(RecipeError, match="no test program nope"):
        guest.cmdline_for(["nope"])
    with pytest.raises(RecipeError, match="unknown mode"):
        guest.cmdline_for("all", "debug")


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "cetvm" / "linux"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cetvm" / "linux"


def test_an_unwritable_cache_is_one_error(tmp_path, fake_packages, program):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RecipeError, match="cannot create the cache directory"):
        linux_guest(blocker / "cache", test_programs=[program], downloader=fake_packages)


def test_without_a_checkout_our_programs_cannot_be_found(tmp_path):
    with pytest.raises(RecipeError, match="guests/linux of a cetvm checkout"):
        our_test_programs(tmp_path)


def test_a_package_without_the_expected_files_is_one_error_and_not_kept(tmp_path, fake_packages, monkeypatch):
    wrong = deb_bytes({"bin/sh": b"not busybox"})
    monkeypatch.setattr(pins, "BUSYBOX", pinned("fake-busybox", wrong))
    fake_packages.debs["fake-busybox"] = wrong
    with pytest.raises(RecipeError, match="has no bin/busybox"):
        package_files(tmp_path, pins.BUSYBOX, pins.BUSYBOX_FILES, downloader=fake_packages)
    assert not list(tmp_path.rglob("*.deb")) and not list(tmp_path.rglob("complete.json"))
