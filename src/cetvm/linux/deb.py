"""Reading Debian packages without dpkg or root: the ``ar`` container and its data tarball.

A ``.deb`` is an ``ar`` archive (deb(5)): ``debian-binary`` ("2.0\\n"), ``control.tar.*`` and
``data.tar.*`` where ``*`` is ``xz``, ``gz``, ``bz2``, ``zst`` or nothing. The ar format
(ar(5), the common System V / GNU variant): the magic ``!<arch>\\n``, then per member a 60-byte
header — name (16), mtime (12), uid (6), gid (6), mode (8), size (10, decimal), ``\\x60\\n`` —
followed by the data, padded to an even offset.

Files are taken out of the data tarball by exact member name and streamed (``tarfile`` mode
``r|``), so a 150 MB package never sits in memory and a member name never becomes a path on
this machine (no traversal, no links followed). Python's standard library reads xz, gzip and
bzip2; zstd (Ubuntu's packages) goes through ``dpkg-deb --fsys-tarfile`` or ``zstd -dc`` when
one of them is installed.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

from cetvm.linux.errors import RecipeError

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60
AR_HEADER_END = b"`\n"
DEB_BINARY_MEMBER = "debian-binary"
#: Decompressors of the standard library by the data tarball's suffix.
STDLIB_DECOMPRESSORS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
#: What a corrupt compressed or tar stream raises inside the standard library.
STREAM_ERRORS = (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError, tarfile.TarError)
COPY_CHUNK = 1 << 20


class DebFormatError(RecipeError):
    """The file is not a well-formed Debian package (or lacks what the recipe needs)."""


@dataclass(frozen=True)
class ArMember:
    """One member of an ar archive: its name and where its data lies in the file."""

    name: str
    offset: int
    size: int


def parse_ar_header(header: bytes, where: str) -> tuple[str, int]:
    """(name, size) of one 60-byte ar member header; GNU's trailing ``/`` is dropped."""
    if len(header) != AR_HEADER_SIZE or header[58:60] != AR_HEADER_END:
        raise DebFormatError(f"{where}: malformed ar member header")
    name = header[0:16].decode("ascii", "replace").rstrip(" ").removesuffix("/")
    size_field = header[48:58].strip()
    if not size_field.isdigit():
        raise DebFormatError(f"{where}: ar member {name!r} has a bad size field {size_field!r}")
    return name, int(size_field)


def ar_members(f: BinaryIO, where: str) -> list[ArMember]:
    """Every member of the ar archive open as ``f`` (seekable); refuses a truncated archive."""
    f.seek(0, io.SEEK_END)
    length = f.tell()
    f.seek(0)
    if f.read(len(AR_MAGIC)) != AR_MAGIC:
        raise DebFormatError(f"{where}: not a Debian package (no ar archive magic)")
    members: list[ArMember] = []
    offset = len(AR_MAGIC)
    while offset < length:
        f.seek(offset)
        name, size = parse_ar_header(f.read(AR_HEADER_SIZE), where)
        data = offset + AR_HEADER_SIZE
        if data + size > length:
            raise DebFormatError(f"{where}: ar member {name!r} is truncated ({size} bytes declared, "
                                 f"{length - data} present)")
        members.append(ArMember(name, data, size))
        offset = data + size + (size & 1)
    return members


class MemberReader(io.RawIOBase):
    """A read-only stream of one ar member's bytes (a window on the open archive)."""

    def __init__(self, f: BinaryIO, member: ArMember) -> None:
        self.file, self.start, self.remaining = f, member.offset, member.size
        f.seek(member.offset)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        count = min(len(buffer), self.remaining)
        if count <= 0:
            return 0
        data = self.file.read(count)
        buffer[:len(data)] = data
        self.remaining -= len(data)
        return len(data)


def data_member(members: list[ArMember], where: str) -> ArMember:
    """The ``data.tar*`` member of a package (after checking ``debian-binary`` is there)."""
    names = [m.name for m in members]
    if DEB_BINARY_MEMBER not in names:
        raise DebFormatError(f"{where}: not a Debian package (no {DEB_BINARY_MEMBER} member; has {names})")
    for member in members:
        if member.name == "data.tar" or member.name.startswith("data.tar."):
            return member
    raise DebFormatError(f"{where}: the package has no data.tar member (has {names})")


@contextlib.contextmanager
def _external_tar_stream(deb: Path, member: ArMember, f: BinaryIO) -> Iterator[BinaryIO]:
    """The uncompressed data tarball of a zstd package, through dpkg-deb or zstd."""
    if shutil.which("dpkg-deb"):
        command = ["dpkg-deb", "--fsys-tarfile", str(deb)]
        stdin = None
    elif shutil.which("zstd"):
        command, stdin = ["zstd", "-dc"], subprocess.PIPE
    else:
        raise DebFormatError(f"{deb}: its data tarball is zstd-compressed; install dpkg-deb or zstd to read it")
    proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if stdin is not None:
            assert proc.stdin is not None
            shutil.copyfileobj(MemberReader(f, member), proc.stdin, COPY_CHUNK)
            proc.stdin.close()
        assert proc.stdout is not None
        yield proc.stdout
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def open_data_tar(deb: Path) -> Iterator[tarfile.TarFile]:
    """The data tarball of ``deb`` as a streaming :class:`tarfile.TarFile` (mode ``r|``)."""
    try:
        f = open(deb, "rb")
    except OSError as exc:
        raise DebFormatError(f"{deb}: cannot open: {exc.strerror or exc}") from None
    with f:
        member = data_member(ar_members(f, str(deb)), str(deb))
        suffix = member.name[len("data.tar"):]
        raw = io.BufferedReader(MemberReader(f, member), COPY_CHUNK)
        if suffix == ".zst":
            context = _external_tar_stream(deb, member, f)
        elif suffix in STDLIB_DECOMPRESSORS:
            context = contextlib.nullcontext(STDLIB_DECOMPRESSORS[suffix](raw))
        elif suffix == "":
            context = contextlib.nullcontext(raw)
        else:
            raise DebFormatError(f"{deb}: unknown data tarball compression {member.name!r}")
        with context as stream:
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    yield tar
            except STREAM_ERRORS as exc:
                raise DebFormatError(f"{deb}: corrupt data tarball {member.name}: {exc}") from None


def member_path(name: str) -> str:
    """A tar member name without the leading ``./`` Debian's tarballs use."""
    return name.removeprefix("./")


def stream_selected(tar: tarfile.TarFile, wanted: Mapping[str, Path], where: str) -> dict[str, Path]:
    """Write each regular-file member named in ``wanted`` (member path → destination) to its
    destination; stops reading as soon as all are found. Returns what was written; a wanted
    name that is absent, or not a regular file, is an error naming it."""
    written: dict[str, Path] = {}
    try:
        for info in tar:
            name = member_path(info.name)
            if name not in wanted or name in written:
                continue
            if not info.isfile():
                raise DebFormatError(f"{where}: {name} is not a regular file in the package")
            source = tar.extractfile(info)
            assert source is not None
            write_stream(source, wanted[name])
            written[name] = wanted[name]
            if len(written) == len(wanted):
                break
    except STREAM_ERRORS as exc:
        raise DebFormatError(f"{where}: corrupt archive: {exc}") from None
    missing = sorted(set(wanted) - set(written))
    if missing:
        raise DebFormatError(f"{where}: the package has no {', '.join(missing)}")
    return written


def write_stream(source: BinaryIO, target: Path) -> None:
    """Copy a stream to ``target`` through a temporary file renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") as out:
            shutil.copyfileobj(source, out, COPY_CHUNK)
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise RecipeError(f"cannot write {target}: {exc.strerror or exc}") from None


def extract_files(deb: Path, wanted: Mapping[str, Path]) -> dict[str, Path]:
    """Extract the named files (data tarball member path → destination) from a package."""
    with open_data_tar(deb) as tar:
        return stream_selected(tar, wanted, str(deb))


def extract_from_inner_tarball(deb: Path, tarball: str, wanted: Mapping[str, Path]) -> dict[str, Path]:
    """Extract files from a compressed tarball *inside* a package (``linux-source-6.12`` ships
    ``usr/src/linux-source-6.12.tar.xz``), streaming both levels: nothing but the wanted files
    is written. ``wanted`` names are paths inside the inner tarball."""
    where = f"{deb}:{tarball}"
    with open_data_tar(deb) as tar:
        try:
            for info in tar:
                if member_path(info.name) != tarball:
                    continue
                if not info.isfile():
                    raise DebFormatError(f"{where}: not a regular file in the package")
                inner = tar.extractfile(info)
                assert inner is not None
                opener = STDLIB_DECOMPRESSORS.get(Path(tarball).suffix)
                if opener is None:
                    raise DebFormatError(f"{where}: unknown tarball compression")
                with tarfile.open(fileobj=opener(inner), mode="r|") as inner_tar:
                    return stream_selected(inner_tar, wanted, where)
        except STREAM_ERRORS as exc:
            raise DebFormatError(f"{where}: corrupt archive: {exc}") from None
    raise DebFormatError(f"{deb}: the package has no {tarball}")
