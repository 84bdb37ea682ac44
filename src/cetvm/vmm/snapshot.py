"""Machine snapshot container: one file holding a JSON manifest and named binary sections.

Format version 1 (all integers little-endian)::

    header, 32 bytes
      0   8  magic b"CETVMSNP"
      8   4  format version (1)
      12  4  number of sections N
      16  8  manifest length M
      24  4  CRC32 of the manifest bytes
      28  4  CRC32 of header bytes 0..27
    manifest, M bytes: a UTF-8 JSON object (machine config, vCPU state, device state; its
      content is the caller's, e.g. {"machine": {...}, "vcpus": [...], "devices": {...}})
    N sections, each
      2   name length L, then L bytes of UTF-8 name (unique; e.g. "ram@0x0", "xsave/vcpu0")
      1   encoding: 0 stored, 1 zlib
      8   stored length S
      8   raw length R
      4   CRC32 of the raw bytes
      4   CRC32 of the S stored bytes
      4   CRC32 of this descriptor (name length field through the stored-bytes CRC)
      S   stored bytes
    trailer: b"CETVMEND", then end of file

Every inconsistency found on reading (wrong magic, unknown version, bad CRC, short file, extra
bytes, bad JSON, duplicate section) is an :class:`~cetvm.InputError` naming the offset and the
field. Files are written to a temporary file beside PATH and renamed, so a crash never leaves half a snapshot
under the final name; only onto a regular file (or a new path): a device node, FIFO or socket
at PATH is refused (:mod:`cetvm.files`). Writing streams each section (memory: one 16 MiB chunk
of guest RAM at a time). Reading bounds every section by what the manifest says it must hold
before inflating it (a zlib bomb is refused after producing at most that many bytes), and the
manifest by :data:`MAX_MANIFEST_BYTES` and JSON nesting.

:func:`check_required_state` lets a consumer refuse a snapshot that lacks state it needs, e.g.
KVM-style "IA32_XSS must be saved when the guest uses CET user state".
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from types import MappingProxyType
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

from cetvm import CetvmError, InputError
from cetvm.files import read_input, write_atomically

SNAPSHOT_MAGIC = b"CETVMSNP"
SNAPSHOT_TRAILER = b"CETVMEND"
SNAPSHOT_VERSION = 1
HEADER = struct.Struct("<8sIIQI")  # without the header CRC
HEADER_SIZE = HEADER.size + 4
SECTION_FIXED = struct.Struct("<BQQII")
ENCODING_STORED = 0
ENCODING_ZLIB = 1
ENCODING_NAMES: Mapping[int, str] = MappingProxyType({ENCODING_STORED: "stored", ENCODING_ZLIB: "zlib"})
MAX_NAME_BYTES = 0xFFFF


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFF_FFFF


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    if not isinstance(manifest, Mapping):
        raise CetvmError(f"snapshot manifest must be a mapping, got {type(manifest).__name__}")
    try:
        return json.dumps(manifest, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise CetvmError(f"snapshot manifest is not JSON-serializable: {exc}") from None


#: What a section holds when writing: bytes, or a function returning its chunks (streamed: a
#: RAM section is read from the guest 16 MiB at a time, never held whole).
SectionData = bytes | bytearray | memoryview | Callable[[], Iterable[bytes]]
#: zlib's largest expansion ratio (deflate's maximum, about 1032:1).
ZLIB_MAX_RATIO = 1032
#: Longest manifest read back (a real one is a few kB: registers, MSRs, device state).
MAX_MANIFEST_BYTES = 16 << 20


def _chunks(data: SectionData) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (bytes(data),)
    return data()


def _section_descriptor(name_bytes: bytes, encoding: int, stored_len: int, raw_len: int, raw_crc: int,
                        stored_crc: int) -> bytes:
    descriptor = (struct.pack("<H", len(name_bytes)) + name_bytes
                  + SECTION_FIXED.pack(encoding, stored_len, raw_len, raw_crc, stored_crc))
    return descriptor + struct.pack("<I", _crc(descriptor))


def _section_name_bytes(name: str) -> bytes:
    name_bytes = str(name).encode()
    if not name_bytes or len(name_bytes) > MAX_NAME_BYTES:
        raise CetvmError(f"snapshot section name {name!r} must be 1..{MAX_NAME_BYTES} bytes")
    return name_bytes


def _write_section(out: BinaryIO, name: str, data: SectionData, compress: bool) -> None:
    """One section, streamed: a placeholder descriptor, the (compressed) chunks as they come, then
    the real descriptor written back over the placeholder (``out`` must be seekable)."""
    name_bytes = _section_name_bytes(name)
    encoding = ENCODING_ZLIB if compress else ENCODING_STORED
    start = out.tell()
    out.write(_section_descriptor(name_bytes, encoding, 0, 0, 0, 0))
    compressor = zlib.compressobj(1) if compress else None
    raw_len = stored_len = raw_crc = stored_crc = 0

    def put(stored: bytes) -> None:
        nonlocal stored_len, stored_crc
        if stored:
            stored_crc = zlib.crc32(stored, stored_crc)
            stored_len += len(stored)
            out.write(stored)

    for chunk in _chunks(data):
        raw_crc = zlib.crc32(chunk, raw_crc)
        raw_len += len(chunk)
        put(compressor.compress(chunk) if compressor else chunk)
    if compressor:
        put(compressor.flush())
    end = out.tell()
    out.seek(start)
    out.write(_section_descriptor(name_bytes, encoding, stored_len, raw_len, raw_crc & 0xFFFF_FFFF,
                                  stored_crc & 0xFFFF_FFFF))
    out.seek(end)


def write_snapshot_stream(out: BinaryIO, manifest: Mapping[str, Any], blobs: Mapping[str, SectionData],
                          compress: bool = True) -> None:
    """Write a snapshot to the seekable stream ``out`` (see the module docstring for the layout);
    memory use is one chunk of a section at a time, whatever the sections' sizes."""
    manifest_bytes = encode_manifest(manifest)
    header = HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, len(blobs), len(manifest_bytes), _crc(manifest_bytes))
    out.write(header + struct.pack("<I", _crc(header)) + manifest_bytes)
    for name, data in blobs.items():
        _write_section(out, name, data, compress)
    out.write(SNAPSHOT_TRAILER)


def encode_snapshot(manifest: Mapping[str, Any], blobs: Mapping[str, SectionData], compress: bool = True) -> bytes:
    """The bytes of a snapshot file (see the module docstring for the layout)."""
    out = io.BytesIO()
    write_snapshot_stream(out, manifest, blobs, compress)
    return out.getvalue()


def write_snapshot(path: str | os.PathLike, manifest: Mapping[str, Any], blobs: Mapping[str, SectionData],
                   compress: bool = True) -> None:
    """Write a snapshot atomically and streamed (:func:`cetvm.files.write_atomically`: a temporary
    file, then rename; a device node, FIFO or other special file at PATH is refused, never replaced)."""
    encode_manifest(manifest)  # refuse an unserializable manifest before creating any file
    write_atomically(path, "snapshot", lambda out: write_snapshot_stream(out, manifest, blobs, compress))


class _Reader:
    """Bounds-checked cursor over the file bytes."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name, self.pos = data, name, 0

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > len(self.data):
            raise InputError(f"{self.name}: truncated snapshot: {what} at offset {self.pos:#x} needs "
                             f"{size} bytes, only {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def take_view(self, size: int, what: str) -> memoryview:
        """Like :meth:`take`, without copying (a section's data can be as large as the RAM)."""
        start = self.pos
        if start + size > len(self.data):
            self.take(size, what)  # raises the truncation error
        self.pos += size
        return memoryview(self.data)[start : start + size]


def _read_header(r: _Reader) -> tuple[int, int, int]:
    prefix = r.data[: len(SNAPSHOT_MAGIC)]
    if not prefix or not SNAPSHOT_MAGIC.startswith(prefix):
        raise InputError(f"{r.name}: not a cetvm snapshot (starts with {prefix!r}, expected {SNAPSHOT_MAGIC!r})")
    head = r.take(HEADER.size, "header")
    _magic, version, count, manifest_len, manifest_crc = HEADER.unpack(head)
    if version != SNAPSHOT_VERSION:
        newer = " (newer than this cetvm)" if version > SNAPSHOT_VERSION else ""
        raise InputError(f"{r.name}: snapshot format version {version}{newer} is not supported; "
                         f"this cetvm reads version {SNAPSHOT_VERSION}")
    (header_crc,) = struct.unpack("<I", r.take(4, "header CRC"))
    if header_crc != _crc(head):
        raise InputError(f"{r.name}: snapshot header CRC mismatch ({header_crc:#010x} stored, "
                         f"{_crc(head):#010x} computed): the header is corrupt")
    return count, manifest_len, manifest_crc


def _read_manifest(r: _Reader, length: int, crc: int) -> dict:
    if length > MAX_MANIFEST_BYTES:
        raise InputError(f"{r.name}: snapshot manifest of {length} bytes is larger than {MAX_MANIFEST_BYTES}")
    start = r.pos
    raw = r.take(length, "manifest")
    if _crc(raw) != crc:
        raise InputError(f"{r.name}: snapshot manifest at offset {start:#x} is corrupt (CRC {_crc(raw):#010x}, "
                         f"expected {crc:#010x})")
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{r.name}: snapshot manifest is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{r.name}: snapshot manifest is nested too deeply") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{r.name}: snapshot manifest must be a JSON object, got {type(manifest).__name__}")
    return manifest


#: ``limit(manifest, section name)``: the most bytes a section may hold once decoded (None: the
#: section is not expected at all). Checked before a section is inflated.
SectionLimit = Callable[[Mapping[str, Any], str], "int | None"]


#: Bytes of decoded section data handed to a streaming consumer at a time.
STREAM_CHUNK = 1 << 20
#: Bytes of stored (compressed) section data given to zlib at a time.
STREAM_INPUT = 256 << 10
#: ``consumer(section name)``: a function taking the section's decoded bytes chunk by chunk (the
#: section is streamed, not returned), or None to get the section back as bytes.
SectionConsumer = Callable[[str], "Callable[[bytes], None] | None"]


def _decoded_chunks(stored: memoryview, encoding: int, raw_len: int, r: _Reader, name: str) -> Iterator[bytes]:
    """The decoded bytes of a section, STREAM_CHUNK at a time; never more than ``raw_len`` + 1
    bytes are produced in all, whatever a zlib stream would expand to."""
    if encoding == ENCODING_STORED:
        for start in range(0, len(stored), STREAM_CHUNK):
            yield bytes(stored[start : start + STREAM_CHUNK])
        return
    inflater, produced = zlib.decompressobj(), 0
    # input is fed a slice at a time: zlib's unconsumed_tail is a copy of what is left of its input
    for start in range(0, len(stored), STREAM_INPUT):
        pending: bytes | memoryview = stored[start : start + STREAM_INPUT]
        while pending and not inflater.eof:
            try:
                chunk = inflater.decompress(pending, min(STREAM_CHUNK, raw_len + 1 - produced))
            except zlib.error as exc:
                raise InputError(f"{r.name}: section '{name}' does not decompress: {exc}") from None
            produced += len(chunk)
            if produced > raw_len:
                raise InputError(f"{r.name}: section '{name}' inflates to more than the {raw_len} bytes its "
                                 "descriptor says")
            pending = inflater.unconsumed_tail
            if chunk:
                yield chunk
        if inflater.eof:
            break
    while not inflater.eof:  # all input given: what zlib still holds back
        chunk = inflater.decompress(b"", min(STREAM_CHUNK, raw_len + 1 - produced))
        if not chunk:
            raise InputError(f"{r.name}: section '{name}' does not decompress: incomplete zlib stream")
        produced += len(chunk)
        if produced > raw_len:
            raise InputError(f"{r.name}: section '{name}' inflates to more than the {raw_len} bytes its "
                             "descriptor says")
        yield chunk


def _decode_section(stored: memoryview, encoding: int, raw_len: int, raw_crc: int, r: _Reader, name: str,
                    sink: Callable[[bytes], None]) -> None:
    """Decode a section into ``sink`` chunk by chunk, then check its length and content CRC."""
    produced = crc = 0
    for chunk in _decoded_chunks(stored, encoding, raw_len, r, name):
        produced += len(chunk)
        crc = zlib.crc32(chunk, crc)
        sink(chunk)
    if produced != raw_len:
        raise InputError(f"{r.name}: section '{name}' holds {produced} bytes, its descriptor says {raw_len}")
    if crc & 0xFFFF_FFFF != raw_crc:
        raise InputError(f"{r.name}: section '{name}' content CRC mismatch after decoding")


def _read_section(r: _Reader, index: int, limit: Callable[[str], "int | None"],
                  consumer: SectionConsumer | None = None) -> tuple[str, bytes | None]:
    """One section: (name, its bytes), or (name, None) when ``consumer`` took them as a stream."""
    descriptor_start = r.pos
    name_len_field = r.take(2, f"section {index} name length")
    (name_len,) = struct.unpack("<H", name_len_field)
    name_bytes = r.take(name_len, f"section {index} name")
    fixed = r.take(SECTION_FIXED.size, f"section {index} descriptor")
    (descriptor_crc,) = struct.unpack("<I", r.take(4, f"section {index} descriptor CRC"))
    if _crc(name_len_field + name_bytes + fixed) != descriptor_crc:
        raise InputError(f"{r.name}: section {index} descriptor at offset {descriptor_start:#x} is corrupt "
                         "(CRC mismatch)")
    try:
        name = name_bytes.decode()
    except UnicodeDecodeError:
        raise InputError(f"{r.name}: section {index} name is not UTF-8") from None
    encoding, stored_len, raw_len, raw_crc, stored_crc = SECTION_FIXED.unpack(fixed)
    if encoding not in ENCODING_NAMES:
        raise InputError(f"{r.name}: section '{name}' has unknown encoding {encoding}")
    most = limit(name)
    if most is None:
        raise InputError(f"{r.name}: unexpected section '{name}' (the manifest does not describe it)")
    if raw_len > most:
        raise InputError(f"{r.name}: section '{name}' says it holds {raw_len} bytes, the manifest allows at "
                         f"most {most}")
    start = r.pos
    stored = r.take_view(stored_len, f"section '{name}' data")
    if _crc(stored) != stored_crc:
        raise InputError(f"{r.name}: section '{name}' at offset {start:#x} is corrupt (CRC mismatch)")
    sink = consumer(name) if consumer is not None else None
    if sink is not None:
        _decode_section(stored, encoding, raw_len, raw_crc, r, name, sink)
        return name, None
    parts: list[bytes] = []
    _decode_section(stored, encoding, raw_len, raw_crc, r, name, parts.append)
    return name, b"".join(parts)


class SnapshotDecoder:
    """Reading a snapshot in two steps: the manifest (checked by ``check_manifest``, a schema
    check raising InputError) when constructed, then the sections (:meth:`sections`), so a
    consumer can build what the manifest describes and stream large sections straight into it."""

    def __init__(self, data: bytes, name: str = "snapshot",
                 check_manifest: Callable[[dict], None] | None = None) -> None:
        self.name = name
        self._data = data
        self._reader = _Reader(data, name)
        self._count, manifest_len, manifest_crc = _read_header(self._reader)
        self.manifest = _read_manifest(self._reader, manifest_len, manifest_crc)
        if check_manifest is not None:
            try:
                check_manifest(self.manifest)
            except InputError as exc:
                raise InputError(f"{name}: {exc}") from None

    def sections(self, section_limit: SectionLimit | None = None,
                 consumer: SectionConsumer | None = None) -> dict[str, bytes]:
        """Every section, verified: the ones ``consumer`` does not stream, as bytes. Each is
        bounded by ``section_limit`` (default: zlib's largest ratio, 1032:1, for the file's
        size; a machine snapshot passes the sizes its manifest implies) before it is decoded."""
        r, name = self._reader, self.name
        blobs: dict[str, bytes] = {}
        seen: set[str] = set()
        for index in range(self._count):
            section, raw = _read_section(r, index, lambda s: (section_limit(self.manifest, s) if section_limit
                                                              else ZLIB_MAX_RATIO * len(self._data)), consumer)
            if section in seen:
                raise InputError(f"{name}: section '{section}' appears twice")
            seen.add(section)
            if raw is not None:
                blobs[section] = raw
        trailer = r.take(len(SNAPSHOT_TRAILER), "end marker")
        if trailer != SNAPSHOT_TRAILER:
            raise InputError(f"{name}: snapshot end marker missing at offset {r.pos - len(trailer):#x} "
                             f"(found {trailer!r}): section count or lengths are wrong")
        if r.pos != len(self._data):
            raise InputError(f"{name}: {len(self._data) - r.pos} unexpected bytes after the end marker")
        return blobs


def decode_snapshot(data: bytes, name: str = "snapshot", section_limit: SectionLimit | None = None,
                    check_manifest: Callable[[dict], None] | None = None) -> tuple[dict, dict[str, bytes]]:
    """Parse and verify snapshot bytes -> (manifest, sections) (see :class:`SnapshotDecoder`)."""
    decoder = SnapshotDecoder(data, name, check_manifest)
    return decoder.manifest, decoder.sections(section_limit)


#: Largest snapshot file read (the largest guest RAM stored uncompressed, plus room for the rest).
MAX_SNAPSHOT_FILE_BYTES = (1 << 46) + (1 << 30)


def open_snapshot(path: str | os.PathLike, check_manifest: Callable[[dict], None] | None = None) -> SnapshotDecoder:
    """A :class:`SnapshotDecoder` of a snapshot file (only a regular file is read:
    :func:`cetvm.files.read_input`)."""
    data = read_input(path, f"snapshot '{os.fspath(path)}'", MAX_SNAPSHOT_FILE_BYTES)
    return SnapshotDecoder(data, os.fspath(path), check_manifest)


def read_snapshot(path: str | os.PathLike, section_limit: SectionLimit | None = None,
                  check_manifest: Callable[[dict], None] | None = None) -> tuple[dict, dict[str, bytes]]:
    """Read and verify a snapshot file -> (manifest, {section name: bytes})."""
    decoder = open_snapshot(path, check_manifest)
    return decoder.manifest, decoder.sections(section_limit)


# --- required-state checks --------------------------------------------------------------------

@dataclass(frozen=True)
class StateRequirement:
    """Section ``section`` must contain ``key`` when ``when(scope)`` is true (always if None).

    ``section`` is a dotted path into the manifest; ``*`` stands for every element of a list
    (or value of an object), e.g. ``"vcpus.*.msrs"``. ``scope`` is the element the last ``*``
    matched (one vCPU), or the whole manifest when the path has no ``*``, so a condition can look
    at sibling sections: ``when=lambda vcpu: vcpu["xcrs"]["xss"] & CET_U``.
    """

    section: str
    key: str
    when: Callable[[Any], bool] | None = None
    reason: str = ""


def _expand(node: Any, parts: list[str], label: str, scope: Any):
    """Yield (label, section or None, scope) for every concrete path."""
    if not parts:
        yield label, node, scope
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(node, list):
            for i, item in enumerate(node):
                yield from _expand(item, rest, f"{label}[{i}]", item)
        elif isinstance(node, dict):
            for k, item in node.items():
                yield from _expand(item, rest, f"{label}[{k!r}]", item)
        else:
            yield label, None, scope
        return
    child_label = f"{label}.{head}" if label else head
    if isinstance(node, dict) and head in node:
        yield from _expand(node[head], rest, child_label, scope)
    elif isinstance(node, list) and re.fullmatch(r"\d+", head) and int(head) < len(node):
        yield from _expand(node[int(head)], rest, f"{label}[{head}]", node[int(head)])
    else:
        yield child_label, None, scope


def missing_state(manifest: Mapping[str, Any], requirements: list[StateRequirement] | tuple) -> list[str]:
    """One message per unmet requirement (empty list: the snapshot has what is needed)."""
    problems = []
    for req in requirements:
        for label, section, scope in _expand(manifest, req.section.split("."), "", manifest):
            why = f" ({req.reason})" if req.reason else ""
            if req.when is not None:
                try:
                    needed = bool(req.when(scope))
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
                    # a malformed section (a string where an object or number belongs) is reported,
                    # never raised: the caller gets every problem in one line
                    problems.append(f"cannot tell whether {label}.{req.key} is required{why}: "
                                    f"{type(exc).__name__} {exc}")
                    continue
                if not needed:
                    continue
            if not isinstance(section, Mapping):
                problems.append(f"snapshot has no section {label}{why}")
            elif req.key not in section:
                problems.append(f"snapshot is missing {label}.{req.key}{why}")
    return problems


def check_required_state(manifest: Mapping[str, Any], requirements: list[StateRequirement] | tuple) -> None:
    """Raise InputError (one line listing every problem) if a requirement is not met."""
    problems = missing_state(manifest, requirements)
    if problems:
        raise InputError("; ".join(problems))
