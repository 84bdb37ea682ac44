"""Reading Debian packages without dpkg (cetvm.linux.deb): the ar container, the streamed data
tarball, nested tarballs, and one precise error for each kind of bad package."""

from __future__ import annotations

import io
import lzma
import shutil
import subprocess
import tarfile

import pytest

from cetvm.linux.deb import DebFormatError, extract_files, extract_from_inner_tarball
from linux_support import ar_archive, deb_bytes, tar_bytes

FILES = {"boot/vmlinuz": b"\x4d\x5a kernel bytes" * 100, "bin/busybox": b"\x7fELF busybox", "usr/share/doc/x": b"doc"}


@pytest.mark.parametrize("compression", ["xz", "gz", ""])
def test_extracts_only_the_named_files(tmp_path, compression):
    deb = tmp_path / "p.deb"
    deb.write_bytes(deb_bytes(FILES, compression))
    out = tmp_path / "out"
    written = extract_files(deb, {"boot/vmlinuz": out / "vmlinuz", "bin/busybox": out / "bb"})
    assert (out / "vmlinuz").read_bytes() == FILES["boot/vmlinuz"]
    assert (out / "bb").read_bytes() == FILES["bin/busybox"]
    assert sorted(p.name for p in out.iterdir()) == ["bb", "vmlinuz"]
    assert set(written) == {"boot/vmlinuz", "bin/busybox"}


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed (our own ar writer covers the format)")
@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd"])
def test_reads_what_dpkg_deb_builds(tmp_path, compression):
    if compression == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    root = tmp_path / "root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: tiny\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: t <t@example.org>\nDescription: tiny\n")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz").write_bytes(FILES["boot/vmlinuz"])
    deb = tmp_path / "tiny.deb"
    proc = subprocess.run(["dpkg-deb", f"-Z{compression}", "--root-owner-group", "--build", str(root), str(deb)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"dpkg-deb cannot build with {compression}: {proc.stderr.strip()}")
    extract_files(deb, {"boot/vmlinuz": tmp_path / "k"})
    assert (tmp_path / "k").read_bytes() == FILES["boot/vmlinuz"]


def test_nested_tarball_is_streamed(tmp_path):
    inner = lzma.compress(tar_bytes({"src/a.c": b"int a;", "src/tools/t.c": b"int main;"}, prefix="linux/"))
    deb = tmp_path / "src.deb"
    deb.write_bytes(deb_bytes({"usr/src/linux.tar.xz": inner}))
    extract_from_inner_tarball(deb, "usr/src/linux.tar.xz", {"linux/src/tools/t.c": tmp_path / "t.c"})
    assert (tmp_path / "t.c").read_bytes() == b"int main;"
    with pytest.raises(DebFormatError, match="has no linux/missing.c"):
        extract_from_inner_tarball(deb, "usr/src/linux.tar.xz", {"linux/missing.c": tmp_path / "m.c"})
    with pytest.raises(DebFormatError, match="has no usr/src/other.tar.xz"):
        extract_from_inner_tarball(deb, "usr/src/other.tar.xz", {"x": tmp_path / "x"})


def _bad(tmp_path, data: bytes):
    deb = tmp_path / "bad.deb"
    deb.write_bytes(data)
    return lambda: extract_files(deb, {"boot/vmlinuz": tmp_path / "k"})


@pytest.mark.parametrize("data, message", [
    (b"", "no ar archive magic"),
    (b"PK\x03\x04 a zip file", "no ar archive magic"),
    (b"!<arch>\ndebian-binary   0           0     0     100644  4         XX2.0\n", "malformed ar member header"),
    (b"!<arch>\ndebian-binary   0           0     0     100644  4x        `\n2.0\n", "bad size field"),
    (ar_archive([("debian-binary", b"2.0\n")]), "no data.tar member"),
    (ar_archive([("data.tar.xz", b"")]), "no debian-binary member"),
    (ar_archive([("debian-binary", b"2.0\n"), ("data.tar.lz4", b"xx")]), "unknown data tarball compression"),
    (ar_archive([("debian-binary", b"2.0\n"), ("data.tar.xz", b"not xz at all")]), "corrupt"),
    (ar_archive([("debian-binary", b"2.0\n"), ("data.tar.gz", b"\x1f\x8b garbage")]), "corrupt"),
    (ar_archive([("debian-binary", b"2.0\n"), ("data.tar.xz", lzma.compress(tar_bytes({"other": b"x"})))]),
     "has no boot/vmlinuz"),
])
def test_bad_packages_are_one_precise_error(tmp_path, data, message):
    with pytest.raises(DebFormatError, match=message):
        _bad(tmp_path, data)()


def test_truncated_package_is_refused(tmp_path):
    whole = deb_bytes(FILES)
    with pytest.raises(DebFormatError, match="truncated"):
        _bad(tmp_path, whole[: len(whole) // 2])()
    assert not (tmp_path / "k").exists()


def test_truncated_compressed_stream_is_corrupt(tmp_path):
    data = lzma.compress(tar_bytes(FILES))
    with pytest.raises(DebFormatError, match="corrupt"):
        _bad(tmp_path, ar_archive([("debian-binary", b"2.0\n"), ("data.tar.xz", data[: len(data) // 2])]))()


def test_a_directory_or_link_member_is_not_taken_as_a_file(tmp_path):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        directory = tarfile.TarInfo("./boot")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        link = tarfile.TarInfo("./boot/vmlinuz")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    deb = tmp_path / "p.deb"
    deb.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("data.tar.xz", lzma.compress(out.getvalue()))]))
    for member in ("boot", "boot/vmlinuz"):
        with pytest.raises(DebFormatError, match=f"{member} is not a regular file"):
            extract_files(deb, {member: tmp_path / "k"})
    assert not (tmp_path / "k").exists()
