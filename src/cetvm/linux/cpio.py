"""The initramfs archive format: cpio "newc" (SVR4 without CRC), as the Linux kernel unpacks it.

Format (the Linux kernel's "initramfs buffer format" document): per entry a
110-byte ASCII header — magic ``070701`` and 13 fields of 8 hex digits: ino, mode, uid, gid,
nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize (with the NUL),
check (0) — then the name and its NUL padded to a multiple of 4, then the data padded to a
multiple of 4. A symlink's data is its target. The archive ends with the entry
``TRAILER!!!``. The kernel creates entries in archive order, so a directory precedes what it
holds (:func:`with_parents` adds missing ones).

Archives are written by Python, not by the host's cpio: device nodes (``/dev/console``) need
no root, and with every time stamp 0 the same inputs give the same bytes.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Iterable

from cetvm.linux.errors import RecipeError

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
               "rdevmajor", "rdevminor", "namesize", "check")
TRAILER = "TRAILER!!!"


class CpioFormatError(RecipeError):
    """A newc archive that cannot be parsed (truncated, bad magic, bad field)."""


@dataclass(frozen=True)
class CpioEntry:
    """One file of an initramfs: ``path`` relative to / (no leading slash), ``mode`` with its
    file type bits (``stat.S_IFREG | 0o755``), the contents (a symlink's target), and for a
    device node its major and minor numbers."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    @staticmethod
    def directory(path: str, perm: int = 0o755) -> "CpioEntry":
        return CpioEntry(path, stat.S_IFDIR | perm)

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> "CpioEntry":
        return CpioEntry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(path: str, target: str) -> "CpioEntry":
        return CpioEntry(path, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> "CpioEntry":
        return CpioEntry(path, stat.S_IFCHR | perm, b"", major, minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_header(ino: int, entry: CpioEntry, name_size: int) -> bytes:
    """The 110-byte newc header of one entry (uid/gid 0, mtime 0, one link)."""
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    values = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, entry.rdev_major, entry.rdev_minor,
              name_size, 0)
    for name, value in zip(NEWC_FIELDS, values):
        if not 0 <= value <= 0xFFFFFFFF:
            raise CpioFormatError(f"{entry.path}: {name} {value} does not fit a newc header")
    return NEWC_MAGIC + b"".join(b"%08X" % v for v in values)


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise CpioFormatError(f"bad initramfs path {path!r}: relative, no empty, '.' or '..' parts")


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """The newc archive of ``entries``, in order, with the trailer."""
    out = bytearray()
    ino = 0
    for ino, entry in enumerate(list(entries) + [CpioEntry(TRAILER, 0)], start=1):
        if entry.path != TRAILER:
            _check_path(entry.path)
        name = entry.path.encode() + b"\0"
        out += newc_header(0 if entry.path == TRAILER else ino, entry, len(name))
        out += name + _pad4(NEWC_HEADER_SIZE + len(name))
        out += entry.data + _pad4(len(entry.data))
    return bytes(out)


def with_parents(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """``entries`` with a directory entry (0755) added before the first entry under each
    directory that the list does not create itself."""
    result: list[CpioEntry] = []
    made: set[str] = set()
    for entry in entries:
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made:
                result.append(CpioEntry.directory(parent))
                made.add(parent)
        if stat.S_ISDIR(entry.mode):
            if entry.path in made:
                continue
            made.add(entry.path)
        result.append(entry)
    return result


def _field(header: bytes, index: int, offset: int) -> int:
    text = header[6 + 8 * index: 14 + 8 * index]
    try:
        return int(text, 16)
    except ValueError:
        raise CpioFormatError(f"offset {offset}: newc field {NEWC_FIELDS[index]} is not hex: {text!r}") from None


def read_newc(archive: bytes) -> list[CpioEntry]:
    """Parse a newc archive (up to its trailer) back into entries: the inverse of
    :func:`write_newc`, used to check what an initramfs holds."""
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        header = archive[offset: offset + NEWC_HEADER_SIZE]
        if len(header) < NEWC_HEADER_SIZE:
            raise CpioFormatError(f"offset {offset}: archive truncated (no trailer)")
        if header[:6] != NEWC_MAGIC:
            raise CpioFormatError(f"offset {offset}: bad magic {header[:6]!r} (want {NEWC_MAGIC!r})")
        fields = {name: _field(header, i, offset) for i, name in enumerate(NEWC_FIELDS)}
        name_start = offset + NEWC_HEADER_SIZE
        name_end = name_start + fields["namesize"]
        data_start = name_end + len(_pad4(NEWC_HEADER_SIZE + fields["namesize"]))
        data_end = data_start + fields["filesize"]
        if fields["namesize"] == 0 or data_end > len(archive):
            raise CpioFormatError(f"offset {offset}: entry runs past the end of the archive")
        name = archive[name_start: name_end - 1].decode("utf-8", "surrogateescape")
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, fields["mode"], archive[data_start:data_end],
                                 fields["rdevmajor"], fields["rdevminor"]))
        offset = data_end + len(_pad4(fields["filesize"]))
