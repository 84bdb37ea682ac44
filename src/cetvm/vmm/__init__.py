"""The cetvm machine monitor: devices, buses, kernel loaders, snapshots (and, later, the run loop).

Firecracker/rust-vmm style: small independent device modules on a port bus and an MMIO bus,
loaders that produce a :class:`~cetvm.vmm.loader.BootPlan`, and a snapshot container. This
package talks to the hypervisor only through the KVM-shaped API of :mod:`cetvm.kvm`.
"""

from cetvm.vmm.bus import BusConflictError, MmioBus, MmioDevice, PioBus, PioDevice, SnapshotDevice
from cetvm.vmm.requests import (
    GuestExitRequest,
    GuestFaultRequest,
    MachineRequest,
    PowerOffRequest,
    ResetRequest,
)

__all__ = [
    "BusConflictError", "GuestExitRequest", "GuestFaultRequest", "MachineRequest", "MmioBus",
    "MmioDevice", "PioBus", "PioDevice", "PowerOffRequest", "ResetRequest", "SnapshotDevice",
]
