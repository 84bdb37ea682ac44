"""The PC devices a bare-metal test kernel and Linux expect, created and wired in one place.

Interrupt wiring (:mod:`cetvm.vmm.devices.irq_lines`): the PIT's channel 0 on ISA IRQ 0, COM1 on
IRQ 4, the ACPI SCI on IRQ 9, each to the 8259 pair and the I/O APIC (IRQ 0 on its pin 2); the
I/O APIC sends its messages over the APIC bus (:meth:`PcDevices.connect`) and the local APICs
broadcast level-triggered EOIs back to it. Ports: COM1 0x3F8, PIT 0x40-0x43, port B 0x61, PICs
0x20/0xA0 and ELCR 0x4D0, ACPI PM1 0x600-0x605 and PM timer 0x608, isa-debug-exit 0xF4, the
shutdown port 0x8900, fw_cfg 0x510, the APM ports 0xB2-0xB3 (a write to 0xB2 raises an SMI on the
writing vCPU, :mod:`cetvm.vmm.devices.apm`); MMIO: the I/O APIC at 0xFEC00000, the xAPIC page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from cetvm import InputError
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.arch.apic import InterruptMessage
from cetvm.vmm.devices.apm import APM_CNT_PORT, APM_PORT_COUNT, ApmPorts
from cetvm.vmm.devices.acpi_pm import PM1_EVT_BLK, PM1_PORT_COUNT, SCI_IRQ, AcpiPm1
from cetvm.vmm.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_COUNT, IsaDebugExit
from cetvm.vmm.devices.fw_cfg import FW_CFG_IO_BASE, FW_CFG_PORT_COUNT, FwCfg
from cetvm.vmm.devices.ioapic import IOAPIC_MMIO_SIZE, IoApic
from cetvm.vmm.devices.irq_lines import IrqRouter
from cetvm.vmm.devices.lapic import APIC_MMIO_SIZE, LocalApic
from cetvm.vmm.devices.pic import PicPair
from cetvm.vmm.devices.pit import PIT_PORT, PIT_PORT_COUNT, SYSTEM_CONTROL_PORT_B, Pit, SystemControlPortB
from cetvm.vmm.devices.pm_timer import PM_TIMER_PORT, PM_TIMER_PORT_COUNT, PmTimer
from cetvm.vmm.devices.rtc import RTC_PORT, RTC_PORT_COUNT, CmosRtc
from cetvm.vmm.devices.serial import COM1_IRQ, COM1_PORT, UART_PORT_COUNT, Serial16550
from cetvm.vmm.devices.shutdown_port import SHUTDOWN_PORT, BochsShutdownPort

#: ISA IRQ of the PIT's channel 0.
PIT_IRQ = 0


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


class DeviceClock(Protocol):
    """The machine's guest clock as devices use it (:class:`cetvm.vmm.irq.GuestClock`): the
    time in ns."""

    def __call__(self) -> int: ...


def _time_zero() -> int:
    """Guest time of devices no machine has connected yet."""
    return 0


@dataclass
class PcDevices:
    """COM1, isa-debug-exit, the shutdown port, fw_cfg, the PIC pair, the I/O APIC, the PIT, the
    CMOS RTC, the ACPI PM1 registers and PM timer, and one local APIC per vCPU, with their IRQ lines."""

    serial: Serial16550
    debug_exit: IsaDebugExit
    shutdown: BochsShutdownPort
    fw_cfg: FwCfg
    pic: PicPair
    lapics: list[LocalApic] = field(default_factory=list)
    ioapic: IoApic = field(default_factory=IoApic)
    pit: Pit = field(default_factory=lambda: Pit(_time_zero))
    pm1: AcpiPm1 = field(default_factory=AcpiPm1)
    pm_timer: PmTimer = field(default_factory=lambda: PmTimer(_time_zero))
    rtc: CmosRtc = field(default_factory=CmosRtc)
    apm: ApmPorts = field(default_factory=ApmPorts)

    def __post_init__(self) -> None:
        self.apic_page = PerCpuApicPage(self.lapics)
        self.irq = IrqRouter(self.pic, self.ioapic)
        self.serial.irq = self.irq.line(COM1_IRQ).set
        self.pit.irq0 = self.irq.line(PIT_IRQ).pulse
        self.pm1.sci = self.irq.line(SCI_IRQ).set
        self.port_b = SystemControlPortB(self.pit)
        for apic in self.lapics:
            apic.eoi_sink = self.ioapic.eoi

    def connect(self, clock: DeviceClock, deliver: Callable[[InterruptMessage], bool]) -> None:
        """Give the timers the machine's guest clock (ns) and the I/O APIC the APIC bus."""
        for apic in self.lapics:
            apic.clock = clock
        self.pit.clock_ns = clock
        self.pm_timer.clock_ns = clock
        self.rtc.clock = clock
        self.ioapic.deliver = deliver

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
        """Claim the standard ports, the I/O APIC and the xAPIC page (:class:`PerCpuApicPage`;
        at vCPU 0's base: relocating the page is not supported)."""
        pio.register(COM1_PORT, UART_PORT_COUNT, self.serial, "serial COM1")
        pio.register(PIT_PORT, PIT_PORT_COUNT, self.pit, "pit 8254")
        pio.register(SYSTEM_CONTROL_PORT_B, 1, self.port_b, "port B (0x61)")
        pio.register(PM1_EVT_BLK, PM1_PORT_COUNT, self.pm1, "ACPI PM1")
        pio.register(PM_TIMER_PORT, PM_TIMER_PORT_COUNT, self.pm_timer, "ACPI PM timer")
        mmio.register(self.ioapic.base, IOAPIC_MMIO_SIZE, self.ioapic, "I/O APIC")
        pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT_COUNT, self.debug_exit, "isa-debug-exit")
        pio.register(SHUTDOWN_PORT, 1, self.shutdown, "shutdown port")
        pio.register(FW_CFG_IO_BASE, FW_CFG_PORT_COUNT, self.fw_cfg, "fw_cfg")
        pio.register(APM_CNT_PORT, APM_PORT_COUNT, self.apm, "APM control/status")
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
            "ioapic": self.ioapic.get_state(),
            "pit": self.pit.get_state(),
            "pm1": self.pm1.get_state(),
            "irq_lines": self.irq.get_state(),
            "apm": self.apm.get_state(),
        }

    #: Devices added after the first snapshot format: a snapshot without them (an older cetvm,
    #: whose guests could not have used them) restores them in their reset state.
    NEWER_DEVICES = ("rtc", "ioapic", "pit", "pm1", "irq_lines", "apm")

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
        newer = {"rtc": self.rtc, "ioapic": self.ioapic, "pit": self.pit, "pm1": self.pm1, "irq_lines": self.irq,
                 "apm": self.apm}
        for key in self.NEWER_DEVICES:
            if key in state:
                newer[key].set_state(state[key])
