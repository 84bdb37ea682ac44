"""Recording the guest's CET violations from userspace (``cetvm boot --cet-report``).

The VMM intercepts #CP with the KVM API's exception intercepts
(:meth:`cetvm.kvm.api.KvmVcpu.set_exception_intercepts`); at each KVM_EXIT_EXCEPTION it reads
the top of the data stack and of the shadow stack (KVM_TRANSLATE + the VM's memory), or for
ENDBRANCH the bytes at the target, records a :class:`cetvm.report.CetViolation`, and the run
loop re-injects the exception unchanged (KVM_SET_VCPU_EVENTS) so the guest sees what it would
have without the report. Shadow-stack entries are 8 bytes in 64-bit mode and 4 outside it
(SDM Vol. 1 §18.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cetvm import InputError
from cetvm.arch import Vector
from cetvm.kvm.api import KvmExceptionExit, KvmVcpu, Vm
from cetvm.report import CetViolation
from cetvm.report.violation import violation_kind

PAGE = 0x1000
#: Bytes of an ENDBRANCH target recorded (ENDBR64 is 4; the rest shows what is there instead).
TARGET_BYTES = 8


def read_guest_linear(vcpu: KvmVcpu, vm: Vm, linear: int, size: int) -> bytes | None:
    """``size`` bytes at a guest linear address, page by page (None if any page is unmapped)."""
    out = bytearray()
    addr, left = linear, size
    while left:
        chunk = min(left, PAGE - (addr & (PAGE - 1)))
        gpa = vcpu.translate(addr & (1 << 64) - 1)
        if gpa is None:
            return None
        try:
            out += vm.get_memory(gpa, chunk)
        except InputError:  # not RAM (MMIO or a hole)
            return None
        addr, left = addr + chunk, left - chunk
    return bytes(out)


def _read_uint(vcpu: KvmVcpu, vm: Vm, linear: int, size: int) -> int | None:
    data = read_guest_linear(vcpu, vm, linear, size)
    return None if data is None else int.from_bytes(data, "little")


@dataclass
class CetViolationRecorder:
    """Collects the #CP exits of a machine's vCPUs (see the module docstring)."""

    vcpu: KvmVcpu
    vm: Vm
    violations: list[CetViolation] = field(default_factory=list)

    @staticmethod
    def vectors() -> set[int]:
        return {int(Vector.CP)}

    def record(self, exc: KvmExceptionExit, instructions: int, vcpu: KvmVcpu | None = None) -> CetViolation | None:
        """Record an intercepted #CP (other vectors are ignored); ``vcpu``: the vCPU that took
        it when the machine has several (default: the recorder's)."""
        if exc.vector != Vector.CP or exc.error_code is None:
            return None
        vcpu = vcpu or self.vcpu
        entry = 8 if vcpu.get_sregs().cs.long else 4
        target = None
        if violation_kind(exc.error_code) == "endbranch":
            target = read_guest_linear(vcpu, self.vm, exc.rip, TARGET_BYTES)
        violation = CetViolation(exc.error_code, exc.rip, exc.cpl, exc.rsp, exc.ssp, instructions,
                                 _read_uint(vcpu, self.vm, exc.rsp, entry),
                                 _read_uint(vcpu, self.vm, exc.ssp, entry), target)
        self.violations.append(violation)
        return violation
