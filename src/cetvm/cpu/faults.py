"""Guest-visible faults raised by instruction and event semantics.

Semantics code (``cetvm.cpu.cet`` and the rest of ``cetvm.cpu``) raises :class:`GuestFault`; the
engine catches it and delivers the exception through the guest IDT (or exits to the hypervisor
when the exception bitmap says so). Faults are architectural results, not errors of cetvm.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm import CetvmError
from cetvm.arch import CpError, PfErr, Vector


@dataclass
class GuestFault(Exception):
    """An exception to deliver to the guest: vector, optional error code, CR2 for #PF."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None

    def __str__(self) -> str:
        name = Vector(self.vector).name if self.vector in Vector._value2member_map_ else str(self.vector)
        ec = "" if self.error_code is None else f"({self.error_code:#x})"
        cr2 = "" if self.cr2 is None else f" at {self.cr2:#x}"
        return f"#{name}{ec}{cr2}"


class NoRamAccess(CetvmError):
    """A memory access the CPU makes on its own (event delivery, an emulated IRET/far transfer,
    a shadow-stack access) reached guest-physical memory without RAM: a device page or nothing.
    Under KVM such an access is an EPT misconfiguration that KVM cannot complete: during event
    delivery KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_DELIVERY_EV (__vmx_handle_exit with
    valid IDT-vectoring information), in an emulated instruction an emulation failure."""

    def __init__(self, gpa: int, size: int, what: str = "access") -> None:
        super().__init__(f"{what} of {size} bytes at guest-physical {gpa:#x}, which has no RAM")
        self.gpa, self.size = gpa, size


def gp(error_code: int = 0) -> GuestFault:
    """#GP(error_code), by default #GP(0)."""
    return GuestFault(Vector.GP, error_code)


def ud() -> GuestFault:
    """#UD (no error code)."""
    return GuestFault(Vector.UD)


def cp(code: CpError) -> GuestFault:
    """#CP with the given CET error code (vector 21)."""
    return GuestFault(Vector.CP, int(code))


def page_fault(linear: int, error: PfErr) -> GuestFault:
    """#PF with CR2 = the faulting linear address."""
    return GuestFault(Vector.PF, int(error), cr2=linear)


class HardwareRefused(CetvmError):
    """The engine refused a host-side request: an MSR the processor does not implement (a
    host-initiated RDMSR/WRMSR, KVM's rdmsr_safe() failing), or guest RAM it cannot map. The
    engine's own exception never leaves :mod:`cetvm.cpu`."""
