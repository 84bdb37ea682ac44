"""The legacy PC devices a bare-metal test kernel expects, created and wired in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cetvm import InputError
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_COUNT, IsaDebugExit
from cetvm.vmm.devices.fw_cfg import FW_CFG_IO_BASE, FW_CFG_PORT_COUNT, FwCfg
from cetvm.vmm.devices.lapic import APIC_MMIO_SIZE, LocalApic
from cetvm.vmm.devices.pic import PicPair
from cetvm.vmm.devices.rtc import RTC_PORT, RTC_PORT_COUNT, CmosRtc
from cetvm.vmm.devices.serial import COM1_PORT, UART_PORT_COUNT, Serial16550
from cetvm.vmm.devices.shutdown_port import SHUTDOWN_PORT, BochsShutdownPort


class PerCpuApicPage:
    """The xAPIC MMIO page as the running vCPU sees it: every vCPU reaches its own local APIC at
    the same guest-physical address [SDM Vol. 3 §11.4.1]. The run loop sets :attr:`current`
    (the vCPU index) before each KVM_RUN (the MMIO bus itself does not know the accessing CPU)."""

    def __init__(self, apics: list[LocalApic]) -> None:
        self.apics = apics
        self.current = 0

    def mmio_read(self, offset: int, size: int) -> int:
        return self.apics[self.current].mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.apics[self.current].mmio_write(offset, size, value)


@dataclass
class PcDevices:
    """COM1, isa-debug-exit, the shutdown port, fw_cfg, the PIC pair, the CMOS RTC and one APIC
    per vCPU."""

    serial: Serial16550
    debug_exit: IsaDebugExit
    shutdown: BochsShutdownPort
    fw_cfg: FwCfg
    pic: PicPair
    lapics: list[LocalApic] = field(default_factory=list)
    rtc: CmosRtc = field(default_factory=CmosRtc)

    def __post_init__(self) -> None:
        self.apic_page = PerCpuApicPage(self.lapics)

    @classmethod
    def create(cls, ram_size: int, nb_cpus: int = 1, sink: Callable[[bytes], None] | None = None,
               serial_input: bytes = b"", cmdline: str | None = None, x2apic_supported: bool = True,
               maxphyaddr: int = 46, realtime_base_ns: int = 0) -> "PcDevices":
        """The devices; the APICs take x2APIC support and MAXPHYADDR from the guest CPUID, the
        RTC the real time at guest time 0 (its clock and the APICs' are set by the machine)."""
        return cls(
            serial=Serial16550(sink, serial_input),
            debug_exit=IsaDebugExit(),
            shutdown=BochsShutdownPort(),
            fw_cfg=FwCfg(ram_size, nb_cpus=nb_cpus, cmdline=cmdline),
            pic=PicPair.create(),
            lapics=[LocalApic(apic_id=i, bsp=(i == 0), maxphyaddr=maxphyaddr, x2apic_supported=x2apic_supported)
                    for i in range(nb_cpus)],
            rtc=CmosRtc(ram_size, realtime_base_ns),
        )

    def register(self, pio: PioBus, mmio: MmioBus) -> None:
        """Claim the standard ports, and the xAPIC page (:class:`PerCpuApicPage`; at vCPU 0's
        base: relocating the page is not supported)."""
        pio.register(COM1_PORT, UART_PORT_COUNT, self.serial, "serial COM1")
        pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_COUNT, self.debug_exit, "isa-debug-exit")
        pio.register(SHUTDOWN_PORT, 1, self.shutdown, "shutdown port")
        pio.register(FW_CFG_IO_BASE, FW_CFG_PORT_COUNT, self.fw_cfg, "fw_cfg")
        self.pic.register(pio)
        pio.register(RTC_PORT, RTC_PORT_COUNT, self.rtc, "CMOS RTC")
        if self.lapics:
            mmio.register(self.lapics[0].mmio_base, APIC_MMIO_SIZE, self.apic_page, "local APIC")

    def get_state(self) -> dict:
        return {
            "serial": self.serial.get_state(),
            "shutdown": self.shutdown.get_state(),
            "fw_cfg": self.fw_cfg.get_state(),
            "pic": self.pic.get_state(),
            "lapics": [apic.get_state() for apic in self.lapics],
            "rtc": self.rtc.get_state(),
        }

    def set_state(self, state: dict) -> None:
        for key in ("serial", "shutdown", "fw_cfg", "pic", "lapics"):
            if not isinstance(state, dict) or key not in state:
                raise InputError(f"device state has no '{key}'")
        if not isinstance(state["lapics"], list) or len(state["lapics"]) != len(self.lapics):
            raise InputError(f"device state has {len(state['lapics']) if isinstance(state['lapics'], list) else 'no'} "
                             f"local APICs, the machine has {len(self.lapics)}")
        self.serial.set_state(state["serial"])
        self.shutdown.set_state(state["shutdown"])
        self.fw_cfg.set_state(state["fw_cfg"])
        self.pic.set_state(state["pic"])
        for apic, apic_state in zip(self.lapics, state["lapics"]):
            apic.set_state(apic_state)
        if "rtc" in state:  # (snapshots from before the RTC have none)
            self.rtc.set_state(state["rtc"])
