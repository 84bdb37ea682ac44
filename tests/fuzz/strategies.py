"""hypothesis strategies for the four input areas (see :mod:`tests.fuzz`)."""

from __future__ import annotations

import copy
import json
import struct
import zlib
from typing import Any

from hypothesis import strategies as st

from cetvm.cpuid import get_model, model_names
from spec_images import EM_386, EM_X86_64, KERNEL_BASE, elf, mb_header

# --------------------------------------------------------------------------- numbers
U32_EDGES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x1000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF]
u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 0xFFFF_FFFF))
#: Integers a JSON field may hold, biased to widths' edges.
json_ints = st.one_of(
    st.sampled_from([0, 1, -1, 2**16, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, 2**70, -(2**63)]),
    st.integers(-(2**80), 2**80))
json_scalars = st.one_of(json_ints, st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)

# --------------------------------------------------------------------------- CPUID files
LEAVES = [0, 1, 4, 6, 7, 0xB, 0xD, 0x14, 0x1F, 0x8000_0000, 0x8000_0001, 0x8000_0008, 0x4000_0000]


@st.composite
def cpuid_tables(draw) -> list[tuple[int, int, int, int, int, int]]:
    """(leaf, subleaf, eax, ebx, ecx, edx) rows: a built-in model with registers rewritten (most
    of all leaf 0xD, the XSAVE layout), or rows made up from scratch."""
    if draw(st.booleans()):
        model = get_model(draw(st.sampled_from([m for m in model_names() if m != "host"])))
        rows = [(e.leaf, e.subleaf, *e.regs) for e in model.entries()]
        for _ in range(draw(st.integers(1, 6))):
            leaf = draw(st.sampled_from([0xD, 0xD, 0xD, 7, 1, 0]))
            subleaf = draw(st.integers(0, 63)) if leaf == 0xD else 0
            regs = tuple(draw(u32) for _ in range(4))
            rows = [r for r in rows if (r[0], r[1]) != (leaf, subleaf)] + [(leaf, subleaf, *regs)]
        return rows
    rows = {}
    for _ in range(draw(st.integers(0, 24))):
        leaf = draw(st.one_of(st.sampled_from(LEAVES), u32))
        subleaf = draw(st.integers(0, 70)) if leaf in (4, 7, 0xB, 0xD, 0x14, 0x1F) else 0
        rows[(leaf, subleaf)] = tuple(draw(u32) for _ in range(4))
    return [(leaf, subleaf, *regs) for (leaf, subleaf), regs in rows.items()]


def render_instlatx64(rows) -> str:
    return "InstLatx64 fuzz\n" + "".join(
        f"CPUID {leaf:08X}: {a:08X}-{b:08X}-{c:08X}-{d:08X} [SL {sub:02X}]\n" for leaf, sub, a, b, c, d in rows)


def render_cpuid_raw(rows) -> str:
    return "CPU 0:\n" + "".join(
        f"   0x{leaf:08x} 0x{sub:02x}: eax=0x{a:08x} ebx=0x{b:08x} ecx=0x{c:08x} edx=0x{d:08x}\n"
        for leaf, sub, a, b, c, d in rows)


def render_json(rows) -> str:
    return json.dumps({"format": "cetvm-cpuid/1", "name": "fuzz", "entries": [
        {"leaf": f"0x{leaf:08x}", "subleaf": f"0x{sub:x}", "eax": f"0x{a:08x}", "ebx": f"0x{b:08x}",
         "ecx": f"0x{c:08x}", "edx": f"0x{d:08x}"} for leaf, sub, a, b, c, d in rows]})


@st.composite
def text_mutations(draw, text: str) -> str:
    """Up to three edits: a character replaced, a slice deleted, a junk line inserted."""
    for _ in range(draw(st.integers(0, 3))):
        if not text:
            break
        at = draw(st.integers(0, len(text) - 1))
        kind = draw(st.sampled_from(["replace", "delete", "insert"]))
        if kind == "replace":
            text = text[:at] + draw(st.characters(codec="utf-8")) + text[at + 1:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        else:
            text = text[:at] + draw(st.text(max_size=30)) + "\n" + text[at:]
    return text


@st.composite
def cpuid_files(draw) -> bytes:
    rows = draw(cpuid_tables())
    render = draw(st.sampled_from([render_instlatx64, render_cpuid_raw, render_json]))
    text = draw(text_mutations(render(rows)))
    return text.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- boot images
#: Segment contents: HLT everywhere, so whatever entry point a mutation picks, the guest stops.
HLT = b"\xF4"


@st.composite
def addresses(draw) -> int:
    return draw(st.one_of(st.sampled_from([0, 0x1000, 0x8000, KERNEL_BASE, KERNEL_BASE + 0x10, 0x3F_F000,
                                           0x40_0000, 0xFEE0_0000, 0xFFFF_F000, 2**32, 2**47, 2**64 - 4096]),
                          st.integers(0, 2**33)))


@st.composite
def segments(draw, bits: int) -> list[tuple[int, int, bytes, int]]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        paddr = draw(addresses())
        vaddr = paddr if draw(st.booleans()) else draw(addresses())
        data = HLT * draw(st.integers(0, 64))
        memsz = len(data) + draw(st.sampled_from([0, 0, 1, 0x1000, 0x10_0000, 2**31]))
        out.append((paddr & (2**bits - 1), vaddr & (2**bits - 1), data, memsz & (2**bits - 1)))
    return out


@st.composite
def elf_images(draw) -> bytes:
    """Half valid kernels (one HLT segment at 1 MiB, the right machine, ET_EXEC) with a few
    fields changed, half made up from the field strategies; then header bytes edited and the
    file sometimes truncated."""
    kind = draw(st.sampled_from(["elf64", "multiboot-elf32", "aout-kludge"]))
    bits = 64 if kind == "elf64" else 32
    machine = EM_X86_64 if bits == 64 else EM_386
    if draw(st.booleans()):
        size = draw(st.integers(1, 64))
        segs = [(KERNEL_BASE, KERNEL_BASE, HLT * size, size + draw(st.sampled_from([0, 0x1000, 0x20_0000])))]
        entry, etype = KERNEL_BASE, 2
    else:
        segs = draw(segments(bits))
        entry = segs[0][1] if segs and draw(st.booleans()) else draw(addresses()) & (2**bits - 1)
        etype = draw(st.sampled_from([2, 2, 2, 1, 3, 4]))
        machine = draw(st.sampled_from([machine, machine, machine, 0, 183]))
    extra = b""
    if kind == "multiboot-elf32":
        extra = mb_header(draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, 7])))
    elif kind == "aout-kludge":
        header_addr = KERNEL_BASE + 0x40  # where elf() puts ``extra`` when segments start at 1 MiB
        load = draw(st.sampled_from([KERNEL_BASE, KERNEL_BASE - 0x1000, 0])) if draw(st.booleans()) else draw(addresses())
        load_end = load + draw(st.sampled_from([0, 0x2000, 0x1_0000])) if draw(st.booleans()) else draw(u32)
        bss_end = load_end + draw(st.sampled_from([0, 0x1000])) if draw(st.booleans()) else draw(u32)
        kludge_entry = load + draw(st.integers(0, 0x1FFF)) if draw(st.booleans()) else draw(u32)
        fields = tuple(v & 0xFFFF_FFFF for v in (header_addr, load, load_end, bss_end, kludge_entry))
        extra = mb_header(0x10003, kludge=fields)
    image = bytearray(elf(bits, machine, entry, segs, etype=etype, extra=extra))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 4]))):  # header-region byte edits
        at = draw(st.integers(0, min(len(image), 0x140) - 1))
        image[at] = draw(st.integers(0, 255))
    if draw(st.integers(0, 9)) == 0:
        del image[draw(st.integers(0, len(image))):]
    return bytes(image)


# --------------------------------------------------------------------------- snapshots
def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path in a JSON document (objects by key, lists by index), the root excluded."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append(path + (key,))
            found += _paths(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append(path + (index,))
            found += _paths(value, path + (index,))
    return found


def _parent(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def manifest_mutations(draw, manifest: dict) -> dict:
    """1-3 edits of a real manifest: a value replaced (by a number at a width's edge, a string, a
    list, an object...), a key or element removed, an unknown key added."""
    doc = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
        if kind == "replace":
            parent[path[-1]] = draw(json_values)
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
    return doc


@st.composite
def section_mutations(draw, data: bytes) -> bytes:
    """Bytes of a snapshot file changed: bit flips, a truncation, or a header/section length
    rewritten with the header CRC recomputed (so the length itself is what is tested)."""
    image = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "count", "manifest_length"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(image) - 1))
            image[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del image[draw(st.integers(0, len(image) - 1)):]
    else:
        offset, fmt = (12, "<I") if kind == "count" else (16, "<Q")
        struct.pack_into(fmt, image, offset, draw(st.one_of(st.sampled_from([0, 1, 2, 3, 2**32 - 1]),
                                                            st.integers(0, 2**32 - 1))))
        struct.pack_into("<I", image, 28, zlib.crc32(bytes(image[:28])) & 0xFFFF_FFFF)
    return bytes(image)


# --------------------------------------------------------------------------- hostile guests
#: Register values that reach the edges of the machine: RAM start/end (a 4 MiB guest), a page with
#: no RAM, the xAPIC page, pc-testdev's I/O memory, the top of the 4 GiB identity map,
#: non-canonical and kernel-half addresses, small numbers.
EDGE_VALUES = (0, 1, 0xFFF, 0x1000, 0x10_0000, 0x3F_F000, 0x3F_FFF8, 0x40_0000, 0xD000_0000, 0xFEE0_0000,
               0xFEE0_0300, 0xFF00_0000, 0xFFFF_F000, 0x1_0000_0000, 0x8000_0000_0000, 0xFFFF_8000_0000_0000,
               0xFFFF_FFFF_FFFF_FFF8, 0x20, 0xFFFF)
#: Instructions a hostile kernel is made of (64-bit encodings): string operations, control
#: transfers and privilege changes, descriptor-table and control-register loads, MSRs, port I/O,
#: memory operands through RAX, CET instructions, KVM's force-emulation prefix.
SNIPPETS = tuple(bytes.fromhex(h) for h in (
    "f3a4", "f348a5", "ac", "48ad", "aa", "f3aa", "a6", "f3a6", "ae", "f2ae", "fd", "fc", "f3ab",
    "cd80", "cd0e", "cc", "0f0b", "48cf", "0f05", "0f07", "cb", "48cb", "c3", "ffe0", "ffd0", "ff28",
    "f4", "0f0118", "0f0110", "0f22d8", "0f22e0", "0f22c0", "0f30", "0f32", "0fa2", "e680", "ec", "ee",
    "488b00", "488900", "480100", "48870a", "0f01c1", "0f01d9", "f30f1efa", "f3480f1ec8", "f30f01e8",
    "0f00d8", "9c", "9d", "50", "58", "0f0b6b766d", "0fae00", "0fae08", "0fc708", "fa", "fb",
    "0f20e0", "0f20c0", "48cf", "0f01f8", "0f35", "0f34", "cf", "6c", "6e", "f36c", "f36e", "666d",
    "f3666f", "0f01f0", "0f0130",
))
_REG_LOADS = (0xB8, 0xB9, 0xBA, 0xBB, 0xBC, 0xBE, 0xBF)  # mov r64, imm64 for RAX RCX RDX RBX RSP RSI RDI


@st.composite
def hostile_guest_code(draw) -> bytes:
    """A kernel body of register loads with edge values, hostile instructions and noise."""
    code = bytearray()
    for _ in range(draw(st.integers(1, 24))):
        choice = draw(st.integers(0, 9))
        if choice < 4:
            value = draw(st.sampled_from(EDGE_VALUES)) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
            code += bytes([0x48, draw(st.sampled_from(_REG_LOADS))]) + value.to_bytes(8, "little")
        elif choice < 9:
            code += draw(st.sampled_from(SNIPPETS))
        else:
            code += draw(st.binary(min_size=1, max_size=6))
    return bytes(code)
