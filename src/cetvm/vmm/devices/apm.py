"""The chipset's Advanced Power Management ports: APM_CNT 0xB2 and APM_STS 0xB3 (Intel ICH9
LPC / PIIX4 power management; QEMU hw/isa/apm.c), the way firmware and operating systems
trigger a software SMI.

A byte written to APM_CNT is latched and raises an SMI; APM_STS is a scratch byte for passing a
value to the SMI handler. QEMU's ICH9 (``ich9_apm_ctrl_changed``) raises the SMI on the CPU that
wrote the port (on every CPU when the firmware negotiated "SMI broadcast"); with KVM that is a
KVM_SMI ioctl on the vCPU, which enters SMM at its next KVM_RUN — after the OUT retired, so the
saved RIP is the next instruction.

Decisions: the SMI goes to the vCPU that wrote the port (no broadcast); ICH9's SMI_EN.APMC_EN
gate (PMBASE + 0x30, set by SeaBIOS/OVMF before they expect SMIs) is not modelled — the port is
always armed; reads of APM_CNT return the last byte written, as QEMU's apm does.
"""

from __future__ import annotations

from typing import Callable

from cetvm.vmm.devices.state import state_int

#: APM control (write: raise an SMI) and status (scratch) ports.
APM_CNT_PORT = 0xB2
APM_PORT_COUNT = 2


def _no_smi() -> None:
    """An APM device no machine has connected yet."""


class ApmPorts:
    """APM_CNT / APM_STS; ``smi`` raises an SMI on the vCPU that wrote APM_CNT (the machine
    connects it to KVM_SMI)."""

    def __init__(self, smi: Callable[[], None] = _no_smi) -> None:
        self.smi = smi
        self.control = 0
        self.status = 0

    def pio_read(self, offset: int, size: int) -> int:
        regs = (self.control, self.status)
        return sum(regs[offset + i] << (8 * i) if offset + i < APM_PORT_COUNT else 0xFF << (8 * i)
                   for i in range(size))

    def pio_write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            if offset + i == 0:
                self.control = byte
                self.smi()
            elif offset + i == 1:
                self.status = byte

    def get_state(self) -> dict:
        return {"control": self.control, "status": self.status}

    def set_state(self, state: dict) -> None:
        self.control = state_int(state, "control", "APM ports", 8)
        self.status = state_int(state, "status", "APM ports", 8)
