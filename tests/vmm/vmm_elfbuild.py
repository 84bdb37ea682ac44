"""Hand-built ELF and multiboot images for loader tests (written from the specs, independent of
the loader's own parser)."""

import struct

MB_MAGIC = 0x1BADB002


def mb_header(flags, kludge=None, checksum=None):
    if checksum is None:
        checksum = -(MB_MAGIC + flags) & 0xFFFFFFFF
    head = struct.pack("<III", MB_MAGIC, flags, checksum)
    if kludge is not None:
        head += struct.pack("<5I", *kludge)
    return head


def elf(bits, machine, entry, segments, etype=2, extra=b"", extra_offset=None):
    """segments: list of (paddr, vaddr, data, memsz). Data is placed at 0x1000-aligned offsets.
    ``extra`` is put at ``extra_offset`` in the file (e.g. a multiboot header)."""
    is64 = bits == 64
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    phoff = ehsize
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    if is64:
        header = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, ehsize,
                                     phentsize, len(segments), 0, 0, 0)
    else:
        header = ident + struct.pack("<HHIIIIIHHHHHH", etype, machine, 1, entry, phoff, 0, 0, ehsize,
                                     phentsize, len(segments), 0, 0, 0)
    body = bytearray(header)
    offset = 0x1000
    blobs = []
    phdrs = b""
    for paddr, vaddr, data, memsz in segments:
        if is64:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(data), memsz, 0x1000)
        else:
            phdrs += struct.pack("<IIIIIIII", 1, offset, vaddr, paddr, len(data), memsz, 7, 0x1000)
        blobs.append((offset, data))
        offset += (len(data) + 0xFFF) & ~0xFFF or 0x1000
    body += phdrs
    total = max([o + len(d) for o, d in blobs] + [len(body)])
    image = bytearray(total)
    image[: len(body)] = body
    for o, d in blobs:
        image[o : o + len(d)] = d
    if extra:
        where = extra_offset if extra_offset is not None else len(body)
        image[where : where + len(extra)] = extra
    return bytes(image)


def parse_info(ram, addr):
    """Read a multiboot information structure out of guest RAM (spec §3.3)."""
    u32 = lambda a: struct.unpack_from("<I", ram, a)[0]

    def cstr(a):
        return bytes(ram[a : ram.index(b"\0", a)]).decode()

    info = {"flags": u32(addr), "mem_lower": u32(addr + 4), "mem_upper": u32(addr + 8),
            "cmdline": cstr(u32(addr + 16)), "boot_loader_name": cstr(u32(addr + 64))}
    mods = []
    for i in range(u32(addr + 20)):
        start, end, string, _ = struct.unpack_from("<IIII", ram, u32(addr + 24) + 16 * i)
        mods.append((start, end, cstr(string)))
    info["mods"] = mods
    mmap, a, end = [], u32(addr + 48), u32(addr + 48) + u32(addr + 44)
    while a < end:
        size, base, length, typ = struct.unpack_from("<IQQI", ram, a)
        mmap.append((base, length, typ))
        a += size + 4
    info["mmap"] = mmap
    return info
