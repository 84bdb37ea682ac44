"""Devices of the cetvm machine, one module each (QEMU-compatible behaviour, cited per module)."""

from cetvm.vmm.devices.apic_bus import ApicBus
from cetvm.vmm.devices.debug_exit import DEBUG_EXIT_PORT, IsaDebugExit, debug_exit_status
from cetvm.vmm.devices.fw_cfg import FW_CFG_IO_BASE, FwCfg
from cetvm.vmm.devices.lapic import APIC_DEFAULT_PHYS_BASE, ApicMode, LocalApic
from cetvm.vmm.devices.pc import PcDevices
from cetvm.vmm.devices.pic import Pic8259, PicPair
from cetvm.vmm.devices.serial import COM1_PORT, Serial16550
from cetvm.vmm.devices.shutdown_port import SHUTDOWN_PORT, BochsShutdownPort

__all__ = [
    "APIC_DEFAULT_PHYS_BASE", "ApicBus", "ApicMode", "BochsShutdownPort", "COM1_PORT", "DEBUG_EXIT_PORT",
    "FW_CFG_IO_BASE", "FwCfg", "IsaDebugExit", "LocalApic", "PcDevices", "Pic8259", "PicPair",
    "SHUTDOWN_PORT", "Serial16550", "debug_exit_status",
]
