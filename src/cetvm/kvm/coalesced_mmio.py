"""Coalesced MMIO and PIO: writes KVM keeps in a ring instead of exiting [K coalesced_mmio.c].

KVM_REGISTER_COALESCED_MMIO registers a zone (``addr``, ``size``, ``pio``: port I/O when 1);
a guest write that falls entirely inside a zone is appended to the VM's ring — physical
address or port, length, the data — and the vCPU goes on without exiting to userspace, while
the ring has room (coalesced_mmio_has_room: 169 of its 170 slots; a write that finds it full
exits as usual). Reads always exit. Userspace empties the ring after every KVM_RUN, before it
handles the exit (QEMU's kvm_flush_coalesced_mmio_buffer), so the device sees the writes in the
order the guest made them. KVM_UNREGISTER_COALESCED_MMIO removes the zones of the same kind
that contain the given range.

cetvm's VMM coalesces the UART's transmit register: a Linux serial console then exits once
per character (the line-status read) instead of twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.cpu.exits import Direction, VmExit
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.ioctl_args import check_u32, check_u64

#: Entries of the ring page: (4096 - 8-byte header) / 24-byte entry [K KVM_COALESCED_MMIO_MAX];
#: one slot always stays free (coalesced_mmio_has_room).
KVM_COALESCED_MMIO_MAX = (4096 - 8) // 24
#: Devices on one KVM I/O bus [K NR_IOBUS_DEVS]: a zone is one device.
NR_IOBUS_DEVS = 1000


@dataclass(frozen=True)
class CoalescedZone:
    """struct kvm_coalesced_mmio_zone."""

    addr: int
    size: int
    pio: int = 0

    def contains(self, addr: int, length: int) -> bool:
        """coalesced_mmio_in_range(): [addr, addr + length) lies inside the zone."""
        return length >= 0 and addr + length >= addr and addr >= self.addr and addr + length <= self.addr + self.size


@dataclass(frozen=True)
class CoalescedWrite:
    """struct kvm_coalesced_mmio: one guest write kept in the ring."""

    phys_addr: int
    len: int
    data: int
    pio: int


class CoalescedMmio:
    """A VM's coalesced zones and its ring."""

    def __init__(self) -> None:
        self.zones: list[CoalescedZone] = []
        self._ring: list[CoalescedWrite] = []
        #: bumped whenever the zones change (the vCPUs' native port I/O follows them)
        self.generation = 0

    def register(self, zone: CoalescedZone) -> None:
        """KVM_REGISTER_COALESCED_MMIO: -EINVAL for ``pio`` other than 0 or 1, -ENOSPC past
        :data:`NR_IOBUS_DEVS` zones."""
        if not isinstance(zone, CoalescedZone):
            raise KvmInvalidArgument(f"KVM_REGISTER_COALESCED_MMIO: expected a CoalescedZone, got {type(zone).__name__}")
        check_u64("KVM_REGISTER_COALESCED_MMIO: addr", zone.addr)
        check_u32("KVM_REGISTER_COALESCED_MMIO: size", zone.size)
        if zone.pio not in (0, 1):
            raise KvmInvalidArgument(f"KVM_REGISTER_COALESCED_MMIO: pio must be 0 or 1, got {zone.pio}")
        if len(self.zones) >= NR_IOBUS_DEVS:
            raise KvmInvalidArgument("KVM_REGISTER_COALESCED_MMIO: -ENOSPC, the I/O bus is full")
        self.zones.append(zone)
        self.generation += 1

    def unregister(self, zone: CoalescedZone) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: drop the zones of the same kind containing the range."""
        if not isinstance(zone, CoalescedZone):
            raise KvmInvalidArgument(f"KVM_UNREGISTER_COALESCED_MMIO: expected a CoalescedZone, got {type(zone).__name__}")
        self.zones = [z for z in self.zones if not (z.pio == zone.pio and z.contains(zone.addr, zone.size))]
        self.generation += 1

    @property
    def pio_ports(self) -> list[tuple[int, int]]:
        """The PIO zones as [first, end) port ranges."""
        return [(z.addr, z.addr + z.size) for z in self.zones if z.pio]

    @property
    def room(self) -> int:
        """Writes the ring can still take (coalesced_mmio_has_room)."""
        return KVM_COALESCED_MMIO_MAX - 1 - len(self._ring)

    def append_pio_bytes(self, writes: list[tuple[int, int]]) -> None:
        """Byte OUTs (port, data) the CPU kept for a PIO zone without exiting (cetfast_run: the
        same coalesced_mmio_write, done next to the engine; it takes no more than :attr:`room`)."""
        self._ring.extend(CoalescedWrite(port, 1, data, 1) for port, data in writes)

    def absorbs(self, exit_: VmExit) -> bool:
        """coalesced_mmio_write(): keep a guest write in the ring instead of exiting (True)."""
        if not self.zones or len(self._ring) >= KVM_COALESCED_MMIO_MAX - 1:
            return False
        if exit_.io is not None and exit_.io.direction is Direction.OUT:
            addr, length, data, pio = exit_.io.port, exit_.io.size, exit_.io.data, 1
        elif exit_.mmio is not None and exit_.mmio.direction is Direction.OUT:
            addr, length, data, pio = exit_.mmio.address, exit_.mmio.size, exit_.mmio.data, 0
        else:
            return False
        if not any(z.pio == pio and z.contains(addr, length) for z in self.zones):
            return False
        self._ring.append(CoalescedWrite(addr, length, data, pio))
        return True

    def take(self) -> list[CoalescedWrite]:
        """Userspace empties the ring (reads every entry and advances ``first``)."""
        ring, self._ring = self._ring, []
        return ring
