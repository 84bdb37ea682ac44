"""The file boundary: how cetvm reads the files a user names and writes the files it produces.

One rule set for every command (kernel images, multiboot modules, CPUID dumps, snapshots,
``--serial``, ``--save-state``, ``--cet-report``); every refusal is an :class:`~cetvm.InputError`
naming the file (exit status 2 on the command line).

Inputs (:func:`read_input`, :func:`read_input_head`)
    - opened ``O_NONBLOCK``, so a FIFO with no writer never blocks the open; then ``fstat``: only
      a regular file is accepted. A FIFO, socket, character or block device (``/dev/zero``,
      ``/dev/stdin`` on a terminal) is refused with one line; nothing waits on it, so no input
      can hang a command (``--timeout`` need not cover loading).
    - read with a size limit the caller states (guest RAM for kernels and modules, 16 MiB for
      CPUID dumps, ...): a file larger than the limit is refused from its ``st_size`` before a
      byte is read, and the read itself stops at the limit (a file growing meanwhile cannot
      push memory past it).

Outputs (:func:`check_output_path`, :func:`write_atomically`, :func:`open_output_stream`)
    - a regular file (or a path that does not exist yet) is written to a new temporary file
      beside it (``.NAME.XXXX.tmp``, created exclusively) and renamed over PATH, so a crash or a
      refused run never leaves half a file under PATH; a symlink is followed (the file it points
      to is replaced, the link stays).
    - decision: any other existing file type (a device node such as ``/dev/null``, a FIFO, a
      socket) is *refused* with one line for ``--save-state`` and ``--cet-report``: renaming
      would replace the node by a regular file, and writing a snapshot into a device is never
      what a user wants. ``--serial`` is a stream, not a document: it is opened in place
      (``/dev/null``, a FIFO with a reader, a terminal all work), never renamed.
    - no output may be the same file as an input of the same run (:func:`check_distinct`):
      ``cetvm boot k.elf --serial k.elf`` is refused before anything is opened for writing.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from typing import BinaryIO, Callable, Iterable

from cetvm import InputError

#: Bytes per read when a whole input file is read.
READ_CHUNK = 1 << 20


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words ("a FIFO", "a character device", ...)."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def _os_problem(exc: OSError) -> str:
    """An OSError as the words a user reads ("no such file", "permission denied", ...)."""
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return exc.strerror or str(exc)


def _open_regular(path: str | os.PathLike, label: str) -> int:
    """A descriptor of ``path`` opened for reading, refused unless it is a regular file. The open
    is non-blocking (a FIFO without a writer would block a plain open forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise InputError(f"{label}: {_os_problem(exc)}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{label}: is a directory")
        if not stat.S_ISREG(mode):
            raise InputError(f"{label}: is {file_kind(mode)}, not a regular file (cetvm reads inputs "
                             "only from regular files)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_bounded(fd: int, limit: int, label: str, expected: int = 0) -> bytearray:
    """At most ``limit`` + 1 bytes from ``fd`` (one more than allowed tells the caller the file
    is too large), read into one buffer sized from ``expected`` (the file's size): a 500 MB
    snapshot costs 500 MB, not a list of chunks plus their join."""
    buffer = bytearray(min(max(expected, 0), limit) + 1)
    got = 0
    with open(fd, "rb", buffering=0, closefd=False) as stream:
        while got <= limit:
            if got == len(buffer):  # the file grew past its size: read on, still bounded
                buffer.extend(bytes(min(READ_CHUNK, limit + 1 - got)))
            try:
                with memoryview(buffer) as view:
                    count = stream.readinto(view[got:])
            except OSError as exc:
                raise InputError(f"{label}: cannot read: {_os_problem(exc)}") from None
            if not count:
                break
            got += count
    del buffer[got:]
    return buffer


def read_input(path: str | os.PathLike, label: str, limit: int, why: str = "") -> bytearray:
    """The whole content of regular file ``path``, refused (InputError ``label: ...``) when it is
    not a regular file or holds more than ``limit`` bytes (``why`` says where the limit comes
    from, e.g. "the guest RAM")."""
    fd = _open_regular(path, label)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise InputError(too_large(label, size, limit, why))
        data = _read_bounded(fd, limit, label, size)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(too_large(label, len(data), limit, why))
    return data


def read_input_head(path: str | os.PathLike, label: str, size: int) -> bytes:
    """The first ``size`` bytes (or fewer) of regular file ``path``."""
    fd = _open_regular(path, label)
    try:
        return bytes(_read_bounded(fd, size - 1, label, size)[:size]) if size > 0 else b""
    finally:
        os.close(fd)


def input_size(path: str | os.PathLike, label: str) -> int:
    """``st_size`` of regular file ``path`` (refused like :func:`read_input`)."""
    fd = _open_regular(path, label)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def too_large(label: str, size: int, limit: int, why: str = "") -> str:
    because = f" ({why})" if why else ""
    return f"{label}: {size} bytes is too large: the limit is {limit} bytes{because}"


# --------------------------------------------------------------------------- outputs
def _existing_mode(path: str | os.PathLike) -> int | None:
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            return None  # the open/rename reports it
        raise


def _output_mode(path: str | os.PathLike, target: str | os.PathLike, label: str) -> int | None:
    """st_mode of an output's existing ``target`` (None when it does not exist yet); a directory
    or an unreadable path is an InputError naming ``path``."""
    try:
        mode = _existing_mode(target)
    except OSError as exc:
        raise InputError(f"{label} '{os.fspath(path)}': {_os_problem(exc)}") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"{label} '{os.fspath(path)}': is a directory")
    return mode


def check_output_path(path: str | os.PathLike, label: str) -> None:
    """Refuse, before anything runs, an output path that :func:`write_atomically` cannot write:
    a directory, an existing special file (module docstring), a missing or unwritable
    directory."""
    target = os.path.realpath(path)
    mode = _output_mode(path, target, label)
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"{label} '{os.fspath(path)}': is {file_kind(mode)}; cetvm writes {label} only to a "
                         "regular file (it would be replaced by one)")
    parent = os.path.dirname(target) or "."
    if not os.path.isdir(parent):
        raise InputError(f"{label} '{os.fspath(path)}': directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{label} '{os.fspath(path)}': directory '{parent}' is not writable")


def write_atomically(path: str | os.PathLike, label: str, write: Callable[[BinaryIO], None]) -> None:
    """Create a new temporary file beside PATH (of the file a symlink points to), let
    ``write(file)`` fill it (the file is seekable), rename it over PATH. Refused like
    :func:`check_output_path`; on any failure the temporary file is removed and PATH is
    untouched. The temporary file is created exclusively (``mkstemp``): a stale ``PATH.tmp``
    that is a FIFO or a symlink can neither block nor redirect the write."""
    check_output_path(path, label)
    target = os.path.realpath(path)
    directory, name = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    except OSError as exc:
        raise InputError(f"{label} '{os.fspath(path)}': cannot write: {_os_problem(exc)}") from None
    try:
        os.fchmod(fd, _new_file_mode(target))
        with open(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except OSError as exc:
        _remove_quietly(tmp)
        raise InputError(f"{label} '{os.fspath(path)}': cannot write: {_os_problem(exc)}") from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _new_file_mode(target: str) -> int:
    """The mode the replaced file had, or what ``open`` would create under the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def open_output_stream(path: str | os.PathLike, label: str) -> BinaryIO:
    """An unbuffered stream to ``path``, written in place (``--serial``): a regular file is
    created or truncated; a device, FIFO or terminal is written as it is."""
    mode = _output_mode(path, path, label)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    if mode is None or stat.S_ISREG(mode):
        flags |= os.O_TRUNC
    try:
        fd = os.open(path, flags | (os.O_NONBLOCK if mode is not None and stat.S_ISFIFO(mode) else 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise InputError(f"{label} '{os.fspath(path)}': a FIFO with no reader") from None
        raise InputError(f"{label} '{os.fspath(path)}': {_os_problem(exc)}") from None
    os.set_blocking(fd, True)
    return open(fd, "wb", buffering=0)


# --------------------------------------------------------------------------- inputs vs outputs
def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``a`` and ``b`` name one existing file (same st_dev and st_ino; hard links and symlinks
    included). False when either does not exist."""
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_distinct(outputs: Iterable[tuple[str, str | os.PathLike]],
                   inputs: Iterable[tuple[str, str | os.PathLike]]) -> None:
    """Refuse a run whose output (option, path) is the same file as one of its inputs (or as
    another output): the output would be truncated or replaced before or while the input is
    read. Only regular files count (``--serial /dev/stdout`` next to ``/dev/stdin`` is fine)."""
    outputs, inputs = list(outputs), list(inputs)
    for i, (out_label, out_path) in enumerate(outputs):
        if not _is_regular(out_path):
            continue
        others = inputs + outputs[i + 1:]
        for in_label, in_path in others:
            if same_file(out_path, in_path):
                raise InputError(f"{out_label} '{os.fspath(out_path)}' is the same file as {in_label} "
                                 f"'{os.fspath(in_path)}': it would be overwritten; choose another file")


def _is_regular(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
