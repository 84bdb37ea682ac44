"""Reading back what the multiboot loader wrote, from the spec (independent of the loader's own
structures). The ELF and multiboot images themselves come from :mod:`spec_images`."""

import struct


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
