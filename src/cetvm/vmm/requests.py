"""Requests a device raises to the VMM run loop (power off, exit with a status, reset, inject #GP).

A device cannot stop the machine by itself: it raises one of these from its register handler and
the run loop (which owns the vCPUs) acts on it, the way QEMU devices call
``qemu_system_shutdown_request()`` or ``exit()`` and Firecracker devices signal an exit event.
They are exceptions so that a handler deep inside an access unwinds at once; they are dataclasses
so that the run loop can read what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch import Vector


class MachineRequest(Exception):
    """Base class: something a device asks the run loop to do instead of resuming the guest."""


@dataclass(eq=False)
class GuestExitRequest(MachineRequest):
    """The guest asked to exit with ``status`` (isa-debug-exit: ``(value << 1) | 1``).

    ``status`` is the full value; a host process can only return ``status & 0xFF``.
    """

    status: int

    def __str__(self) -> str:
        return f"guest requested exit with status {self.status}"


@dataclass(eq=False)
class PowerOffRequest(MachineRequest):
    """The guest powered the machine off (Bochs/QEMU shutdown port, ACPI...)."""

    source: str = "guest"

    def __str__(self) -> str:
        return f"power off requested by {self.source}"


@dataclass(eq=False)
class ResetRequest(MachineRequest):
    """The guest asked for a system reset."""

    source: str = "guest"

    def __str__(self) -> str:
        return f"reset requested by {self.source}"


@dataclass(eq=False)
class GuestFaultRequest(MachineRequest):
    """The access is architecturally invalid: the hypervisor must inject ``vector`` (with
    ``error_code``) into the vCPU that made it, e.g. #GP(0) for a bad x2APIC RDMSR/WRMSR."""

    vector: Vector
    error_code: int = 0
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.vector.name}({self.error_code}): {self.reason}"
