"""Helpers of the Linux guest recipe tests: tiny Debian packages made here (an ar archive of
our own writing, or dpkg-deb's), and fake downloaders that serve them."""

from __future__ import annotations

import hashlib
import io
import lzma
import gzip
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from cetvm.linux.packages import DebPackage


def tar_bytes(files: dict[str, bytes], prefix: str = "./") -> bytes:
    """An uncompressed tarball holding ``files`` (path → contents) under ``prefix``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(prefix + path)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


COMPRESSORS = {"xz": lzma.compress, "gz": lambda data: gzip.compress(data, mtime=0), "": lambda data: data}


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ar archive (ar(5)): magic, then per member a 60-byte header and the data padded to even."""
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = (f"{name:<16}" f"{0:<12}" f"{0:<6}" f"{0:<6}" f"{0o100644:<8o}" f"{len(data):<10}").encode() + b"`\n"
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def deb_bytes(files: dict[str, bytes], compression: str = "xz") -> bytes:
    """A minimal .deb whose data tarball holds ``files``."""
    suffix = f".{compression}" if compression else ""
    control = COMPRESSORS[compression](tar_bytes({"control": b"Package: fake\n"}))
    data = COMPRESSORS[compression](tar_bytes(files))
    return ar_archive([("debian-binary", b"2.0\n"), (f"control.tar{suffix}", control), (f"data.tar{suffix}", data)])


def pinned(name: str, deb: bytes, version: str = "1.0-1") -> DebPackage:
    """A DebPackage pin that matches ``deb``'s bytes."""
    return DebPackage(name=name, version=version, sha256=hashlib.sha256(deb).hexdigest(), size=len(deb))


@dataclass
class FakeApt:
    """A downloader serving prepared .deb bytes by package name, counting the downloads."""

    debs: dict[str, bytes]
    calls: list[str] = field(default_factory=list)

    def __call__(self, package: DebPackage, directory: Path) -> Path:
        self.calls.append(package.name)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{package.name}.deb"
        path.write_bytes(self.debs[package.name])
        return path
