"""QEMU firmware configuration device, I/O port interface (QEMU hw/nvram/fw_cfg.c,
docs/specs/fw_cfg.rst).

Ports: 0x510 selector, 0x511 data. QEMU maps both as one 2-byte region ("comb" ops): a 16-bit
write selects an item (either port), a byte read returns the next data byte (either port), a
byte write is a legacy data write that modern QEMU ignores. Other sizes are invalid accesses; we
answer them like an undecoded port (reads all ones, writes dropped).

Selecting key ``k`` rewinds the data offset to 0. Keys above the table (bits 13:0) or with bit 15
(architecture-local items, none here) read as zeros, as do reads past an item's end.

Items (numeric values little-endian unless stated): SIGNATURE "QEMU", ID = 1 (traditional
interface only: no DMA, so guests never touch 0x514), UUID (16 zero bytes), RAM_SIZE (u64),
NOGRAPHIC (u16), NB_CPUS (u16), MAX_CPUS (u16), CMDLINE_SIZE/CMDLINE_DATA when a command line is
given, and FILE_DIR: a big-endian count then one 64-byte entry per file (be32 size, be16 select,
u16 reserved, 56-byte NUL-terminated name), files sorted by name with keys from 0x20.
"""

from __future__ import annotations

import struct
from typing import Mapping

from cetvm import InputError
from cetvm.vmm.devices.state import state_int
from cetvm.vmm.layout import guest_string_bytes

FW_CFG_IO_BASE = 0x510
FW_CFG_PORT_COUNT = 2

FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_UUID = 0x0002
FW_CFG_RAM_SIZE = 0x0003
FW_CFG_NOGRAPHIC = 0x0004
FW_CFG_NB_CPUS = 0x0005
FW_CFG_MAX_CPUS = 0x000F
FW_CFG_CMDLINE_SIZE = 0x0014
FW_CFG_CMDLINE_DATA = 0x0015
FW_CFG_FILE_DIR = 0x0019
FW_CFG_FILE_FIRST = 0x0020
#: Number of keys in each (generic / arch-local) table; QEMU's default FW_CFG_MAX_FILE_SLOTS is
#: 0x20 files after FW_CFG_FILE_FIRST.
FW_CFG_MAX_ENTRY = FW_CFG_FILE_FIRST + 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = 0x3FFF

FW_CFG_SIGNATURE_BYTES = b"QEMU"
#: FW_CFG_ID bit 0: traditional I/O interface; bit 1 (DMA) stays clear.
FW_CFG_VERSION_TRADITIONAL = 0x1
FW_CFG_MAX_FILE_PATH = 56


def file_dir_entry(size: int, select: int, name: str) -> bytes:
    """One ``FWCfgFile`` record (big-endian fields, 64 bytes)."""
    raw = name.encode()
    return struct.pack(">IHH56s", size, select, 0, raw)


def build_items(
    ram_size: int,
    nb_cpus: int = 1,
    max_cpus: int | None = None,
    nographic: bool = True,
    cmdline: str | None = None,
    files: Mapping[str, bytes] | None = None,
) -> dict[int, bytes]:
    """The fw_cfg item table QEMU's x86 machines publish (fw_cfg_common_init, fw_cfg_arch_create)."""
    max_cpus = nb_cpus if max_cpus is None else max_cpus
    if not 1 <= nb_cpus <= max_cpus <= 0xFFFF:
        raise InputError(f"fw_cfg: need 1 <= CPUs ({nb_cpus}) <= max CPUs ({max_cpus}) <= 65535")
    items = {
        FW_CFG_SIGNATURE: FW_CFG_SIGNATURE_BYTES,
        FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION_TRADITIONAL),
        FW_CFG_UUID: bytes(16),
        FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
        FW_CFG_NOGRAPHIC: struct.pack("<H", int(nographic)),
        FW_CFG_NB_CPUS: struct.pack("<H", nb_cpus),
        FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus),
    }
    if cmdline is not None:
        data = guest_string_bytes(cmdline) + b"\0"
        items[FW_CFG_CMDLINE_SIZE] = struct.pack("<I", len(data))
        items[FW_CFG_CMDLINE_DATA] = data
    names = sorted(files or {})
    if len(names) > FW_CFG_MAX_ENTRY - FW_CFG_FILE_FIRST:
        raise InputError(f"fw_cfg: {len(names)} files, at most {FW_CFG_MAX_ENTRY - FW_CFG_FILE_FIRST}")
    directory = [struct.pack(">I", len(names))]
    for index, name in enumerate(names):
        if not name or len(name.encode()) >= FW_CFG_MAX_FILE_PATH:
            raise InputError(f"fw_cfg file name {name!r} must be 1..{FW_CFG_MAX_FILE_PATH - 1} bytes")
        data = bytes(files[name])  # type: ignore[index]
        select = FW_CFG_FILE_FIRST + index
        items[select] = data
        directory.append(file_dir_entry(len(data), select, name))
    items[FW_CFG_FILE_DIR] = b"".join(directory)
    return items


class FwCfg:
    """fw_cfg on the port bus at 0x510 (register 2 ports)."""

    def __init__(
        self,
        ram_size: int,
        nb_cpus: int = 1,
        max_cpus: int | None = None,
        nographic: bool = True,
        cmdline: str | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        self._items = build_items(ram_size, nb_cpus, max_cpus, nographic, cmdline, files)
        self.selector = FW_CFG_SIGNATURE
        self.offset = 0

    def item(self, key: int) -> bytes | None:
        """The current bytes of item ``key`` (None for an invalid key)."""
        if key & FW_CFG_ARCH_LOCAL or key & FW_CFG_ENTRY_MASK >= FW_CFG_MAX_ENTRY:
            return None
        return self._items.get(key & FW_CFG_ENTRY_MASK)

    def select(self, key: int) -> None:
        """fw_cfg_select: remember the key, rewind to offset 0."""
        self.selector = key & 0xFFFF
        self.offset = 0

    def read_data_byte(self) -> int:
        """fw_cfg_read: next byte of the selected item, 0 past the end or for invalid keys."""
        data = self.item(self.selector)
        if data is None or self.offset >= len(data):
            return 0
        byte = data[self.offset]
        self.offset += 1
        return byte

    def pio_read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1
        return self.read_data_byte()

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if size == 2:
            self.select(value)
        # size 1: legacy data write, ignored since QEMU 2.4; other sizes invalid.

    def get_state(self) -> dict:
        return {"selector": self.selector, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        selector = state_int(state, "selector", "fw_cfg", 16)
        offset = state_int(state, "offset", "fw_cfg", 32)
        self.selector, self.offset = selector, offset
