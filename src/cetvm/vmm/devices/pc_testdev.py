"""QEMU's ``pc-testdev`` (hw/misc/pc-testdev.c), the ISA test device kvm-unit-tests uses.

Written from the device's documented behaviour, not its code:

- ports 0xE0-0xE3 (``ioport``): a 32-bit data register. A write of ``size`` bytes at offset
  ``o`` replaces bytes ``o..o+size-1`` of the register; a read returns those bytes
  (kvm-unit-tests' emulator and realmode tests check byte, word and dword IN/OUT and string
  I/O against it).
- port 0xE4 (``flush page``, 4 bytes): a write names a guest-physical page whose host mapping
  QEMU re-protects so that KVM re-faults it. The guest sees nothing; cetvm's RAM has no host
  mapping to shake, so the write is accepted and ignored.
- MMIO 0xFF000000-0xFF00FFFF (``iomem``): 64 KiB of memory behind the MMIO path: reads return
  what was written (kvm-unit-tests' emulator test maps it as its "IORAM" to make every access
  an MMIO exit the hypervisor must emulate).
- ports 0x2000-0x2017 (``irq``): a write sets ISA IRQ line ``port - 0x2000`` to ``value != 0``
  (the ioapic test drives IOAPIC pins with it). The level goes to ``irq_line`` (the VMM's
  interrupt controller when it has one; recorded in :attr:`PcTestdev.irq_levels` otherwise).
"""

from __future__ import annotations

from typing import Callable

PC_TESTDEV_IOPORT = 0xE0
PC_TESTDEV_IOPORT_COUNT = 4
PC_TESTDEV_FLUSH_PORT = 0xE4
PC_TESTDEV_FLUSH_COUNT = 4
PC_TESTDEV_IOMEM_BASE = 0xFF00_0000
PC_TESTDEV_IOMEM_SIZE = 0x1_0000
PC_TESTDEV_IRQ_BASE = 0x2000
PC_TESTDEV_IRQ_COUNT = 24


class PcTestdevData:
    """The 32-bit data register at 0xE0-0xE3 (byte-addressable)."""

    def __init__(self) -> None:
        self.data = 0

    def pio_read(self, offset: int, size: int) -> int:
        shift = 8 * (offset & 3)
        mask = ((1 << (8 * size)) - 1) << shift
        return (self.data & mask & 0xFFFF_FFFF) >> shift

    def pio_write(self, offset: int, size: int, value: int) -> None:
        shift = 8 * (offset & 3)
        mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFF_FFFF
        self.data = (self.data & ~mask | (value << shift) & mask) & 0xFFFF_FFFF


class PcTestdevFlush:
    """Port 0xE4: the flush-page request (a no-op for cetvm, see the module docstring)."""

    def __init__(self) -> None:
        self.last_page: int | None = None

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.last_page = value & ~0xFFF


class PcTestdevIomem:
    """The 64 KiB MMIO buffer at 0xFF000000 (little-endian, any access size the bus allows)."""

    def __init__(self) -> None:
        self.buffer = bytearray(PC_TESTDEV_IOMEM_SIZE)

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.buffer[offset:offset + size].ljust(size, b"\xff"), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, PC_TESTDEV_IOMEM_SIZE)
        self.buffer[offset:end] = value.to_bytes(size, "little")[:end - offset]


class PcTestdevIrq:
    """Ports 0x2000-0x2017: ISA IRQ line levels."""

    def __init__(self, irq_line: Callable[[int, bool], None] | None = None) -> None:
        self.irq_line = irq_line
        self.irq_levels = [False] * PC_TESTDEV_IRQ_COUNT

    def pio_read(self, offset: int, size: int) -> int:
        return 0

    def pio_write(self, offset: int, size: int, value: int) -> None:
        level = value != 0
        self.irq_levels[offset] = level
        if self.irq_line is not None:
            self.irq_line(offset, level)


class PcTestdev:
    """The parts of pc-testdev, registered on the port bus (and the MMIO bus) together."""

    def __init__(self, irq_line: Callable[[int, bool], None] | None = None) -> None:
        self.ioport = PcTestdevData()
        self.flush = PcTestdevFlush()
        self.irq = PcTestdevIrq(irq_line)
        self.iomem = PcTestdevIomem()

    def register(self, pio, mmio=None) -> None:
        pio.register(PC_TESTDEV_IOPORT, PC_TESTDEV_IOPORT_COUNT, self.ioport, "pc-testdev ioport")
        pio.register(PC_TESTDEV_FLUSH_PORT, PC_TESTDEV_FLUSH_COUNT, self.flush, "pc-testdev flush")
        pio.register(PC_TESTDEV_IRQ_BASE, PC_TESTDEV_IRQ_COUNT, self.irq, "pc-testdev irq")
        if mmio is not None:
            mmio.register(PC_TESTDEV_IOMEM_BASE, PC_TESTDEV_IOMEM_SIZE, self.iomem, "pc-testdev iomem")
