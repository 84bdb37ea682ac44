"""Loading CPUID dumps: InstLatx64 text, Linux ``cpuid -r`` output, and cetvm JSON.

Every malformed input raises :class:`cetvm.InputError` whose message names the source (the
file's base name, or ``<string>``), the line number and what was expected, e.g.::

    sapphire.txt line 7: expected 4 hex words 'EAX-EBX-ECX-EDX', got '0000-zz'
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cetvm import InputError
from cetvm.files import read_input
from cetvm.cpuid.model import CpuidModel, is_subleaf_indexed

_INSTLAT_LINE = re.compile(r"^CPUID\s+(?P<leaf>\S+?):?\s+(?P<words>\S+)(?P<rest>.*)$")
_INSTLAT_SUBLEAF = re.compile(r"^\s*\[SL\s+(?P<sl>[0-9A-Fa-f]{1,8})\]")
_HEX_WORD = re.compile(r"^[0-9A-Fa-f]{1,8}$")

_RAW_LINE = re.compile(
    r"^\s*0x(?P<leaf>[0-9a-fA-F]{1,8})\s+0x(?P<sl>[0-9a-fA-F]{1,8}):"
    r"\s*eax=0x(?P<eax>[0-9a-fA-F]{1,8})\s+ebx=0x(?P<ebx>[0-9a-fA-F]{1,8})"
    r"\s+ecx=0x(?P<ecx>[0-9a-fA-F]{1,8})\s+edx=0x(?P<edx>[0-9a-fA-F]{1,8})\s*$"
)
_RAW_START = re.compile(r"^\s*0x[0-9a-fA-F]+\s+0x[0-9a-fA-F]+:")
_RAW_CPU_HEADER = re.compile(r"^CPU(?:\s+(?P<cpu>\d+))?:\s*$")

#: Maximum size of a dump file we read (real dumps are a few kB).
MAX_DUMP_BYTES = 16 * 1024 * 1024


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Seen:
    """Duplicate detection: where each (leaf, subleaf) was first defined."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple[int, int], int] = {}

    def add(self, leaf: int, subleaf: int, lineno: int) -> None:
        first = self.lines.setdefault((leaf, subleaf), lineno)
        if first != lineno:
            raise InputError(
                f"{self.source} line {lineno}: duplicate CPUID leaf 0x{leaf:08X} subleaf "
                f"0x{subleaf:X} (first defined on line {first})"
            )


def parse_instlatx64(text: str, source: str = "<string>") -> CpuidModel:
    """Parse an InstLatx64 CPUID dump (``CPUID 0000000D: EAX-EBX-ECX-EDX [SL 00] ...``).

    Rules (InstLatx64's format as found in its ``*_CPUID.txt`` files):
    - lines not starting with ``CPUID`` are comments (headers, blank lines, notes);
    - a trailing ``[SL nn]`` (hex) gives the subleaf; without it, repeated lines of the same
      leaf count up from 0 (the previous subleaf of that leaf + 1);
    - bracketed text after the registers is decoration and ignored;
    - full InstLatx64 files list every logical CPU; we take CPU #0: parsing stops when leaf 0
      appears a second time;
    - an explicitly repeated (leaf, subleaf) within one CPU is an error.
    """
    model = CpuidModel(source)
    seen = _Seen(source)
    last_subleaf: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped.startswith("CPUID"):
            continue
        m = _INSTLAT_LINE.match(stripped)
        if m is None:
            raise InputError(f"{source} line {lineno}: expected 'CPUID LLLLLLLL: EAX-EBX-ECX-EDX', "
                             f"got {_short(stripped)!r}")
        leaf_text = m["leaf"]
        if not _HEX_WORD.match(leaf_text):
            raise InputError(f"{source} line {lineno}: expected an 8-digit hex leaf after 'CPUID', "
                             f"got {_short(leaf_text)!r}")
        leaf = int(leaf_text, 16)
        words = m["words"].split("-")
        if len(words) != 4 or not all(_HEX_WORD.match(w) for w in words):
            raise InputError(f"{source} line {lineno}: expected 4 hex words 'EAX-EBX-ECX-EDX', "
                             f"got {_short(m['words'])!r}")
        sl = _INSTLAT_SUBLEAF.match(m["rest"])
        if leaf == 0 and 0 in last_subleaf:
            break  # the next logical CPU starts: keep CPU #0 only
        subleaf = int(sl["sl"], 16) if sl else last_subleaf.get(leaf, -1) + 1
        seen.add(leaf, subleaf, lineno)
        last_subleaf[leaf] = subleaf
        model.set(leaf, subleaf, *(int(w, 16) for w in words))
    if not seen.lines:
        raise InputError(f"{source}: no 'CPUID LLLLLLLL: EAX-EBX-ECX-EDX' lines found")
    return model


def parse_cpuid_raw(text: str, source: str = "<string>") -> CpuidModel:
    """Parse Linux ``cpuid -r`` output (the cpuid(1) tool by Todd Allen).

    Lines look like ``   0x0000000d 0x01: eax=0x0000001f ebx=0x00002a80 ecx=0x0000dd00
    edx=0x00000000``. Without ``-1`` the tool prints a ``CPU n:`` header before each logical
    CPU's lines; with ``-1`` a single ``CPU:`` header. We take CPU 0 (the first block) and stop
    at the next ``CPU n:`` header. Other non-register lines are ignored.
    """
    model = CpuidModel(source)
    seen = _Seen(source)
    cpu_blocks = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        header = _RAW_CPU_HEADER.match(stripped)
        if header is not None:
            cpu_blocks += 1
            if cpu_blocks > 1:
                break
            continue
        if not _RAW_START.match(stripped):
            continue
        m = _RAW_LINE.match(stripped)
        if m is None:
            raise InputError(f"{source} line {lineno}: expected '0xLEAF 0xSUB: eax=0x... ebx=0x... "
                             f"ecx=0x... edx=0x...', got {_short(stripped)!r}")
        leaf, subleaf = int(m["leaf"], 16), int(m["sl"], 16)
        if not is_subleaf_indexed(leaf) and subleaf != 0 and model.contains(leaf):
            continue  # the tool probes some leaves with several ECX values; they read the same
        seen.add(leaf, subleaf, lineno)
        model.set(leaf, subleaf, *(int(m[r], 16) for r in ("eax", "ebx", "ecx", "edx")))
    if not seen.lines:
        raise InputError(f"{source}: no '0xLEAF 0xSUB: eax=... ebx=... ecx=... edx=...' lines found")
    return model


def parse_cpuid_json(text: str, source: str = "<string>") -> CpuidModel:
    """Parse a ``cetvm-cpuid/1`` JSON document (see :mod:`cetvm.cpuid.model`)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} line {exc.lineno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # e.g. absurdly long integers or deep nesting
        raise InputError(f"{source}: invalid JSON: {exc}") from None
    model = CpuidModel.from_json(doc, source)
    if model.name == "custom":
        model.name = source
    return model


def detect_format(text: str, source: str = "<string>") -> str:
    """"instlatx64", "cpuid-raw" or "json".

    JSON if the first non-blank character is ``{``; otherwise the first line that looks like a
    register line decides (InstLatx64 files begin with free-form comment lines).
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("{"):
        return "json"
    for stripped in lines:
        if stripped.startswith("CPUID"):
            return "instlatx64"
        if _RAW_CPU_HEADER.match(stripped) or _RAW_START.match(stripped):
            return "cpuid-raw"
    raise InputError(f"{source}: unrecognized CPUID dump: expected InstLatx64 'CPUID LLLLLLLL: "
                     f"EAX-EBX-ECX-EDX' lines, 'cpuid -r' output, or {{\"format\": \"cetvm-cpuid/1\"}} JSON")


_PARSERS = {"instlatx64": parse_instlatx64, "cpuid-raw": parse_cpuid_raw, "json": parse_cpuid_json}


def parse_cpuid_text(text: str, source: str = "<string>") -> CpuidModel:
    """Parse a dump in any supported format (see :func:`detect_format`)."""
    if not text.strip():
        raise InputError(f"{source}: empty file, expected a CPUID dump")
    return _PARSERS[detect_format(text, source)](text, source)


def load_cpuid_file(path: str | Path) -> CpuidModel:
    """Load a CPUID dump file, auto-detecting InstLatx64 / ``cpuid -r`` / JSON.

    Missing, unreadable, empty, binary or oversized files raise InputError naming the file.
    The model is named after the file's stem.
    """
    p = Path(path)
    source = p.name or str(p)
    data = read_input(p, str(p), MAX_DUMP_BYTES, "a CPUID dump is a few kB")
    if not data.strip():
        raise InputError(f"{source}: empty file, expected a CPUID dump")
    if b"\x00" in data:
        raise InputError(f"{source}: binary file (contains NUL bytes), expected a text CPUID dump")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}), expected a text CPUID dump") from None
    model = parse_cpuid_text(text, source)
    if model.name == source:
        model.name = p.stem
    return model

