"""pc-testdev, the ACPI PM timer and the ACPI tables, as a guest reaches them through the buses."""


from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.devices.pc_testdev import PcTestdev
from cetvm.vmm.devices.pm_timer import PM_TIMER_PORT, PmTimer


def _testdev():
    pio, mmio, dev = PioBus(), MmioBus(), PcTestdev()
    dev.register(pio, mmio)
    return pio, mmio, dev


def test_pc_testdev_data_register_is_byte_addressable():
    pio, _, _ = _testdev()
    pio.write(0xE0, 4, 0x11223344)
    assert pio.read(0xE0, 4) == 0x11223344
    assert pio.read(0xE0, 1) == 0x44 and pio.read(0xE1, 1) == 0x33 and pio.read(0xE2, 2) == 0x1122
    pio.write(0xE1, 1, 0xAA)
    assert pio.read(0xE0, 4) == 0x1122AA44
    pio.write(0xE0, 2, 0x9999)
    assert pio.read(0xE0, 4) == 0x11229999


def test_pc_testdev_iomem_reads_back_what_was_written():
    _, mmio, _ = _testdev()
    mmio.write(0xFF00_0000, 8, 0x0123_4567_89AB_CDEF)
    assert mmio.read(0xFF00_0000, 4) == 0x89AB_CDEF and mmio.read(0xFF00_0004, 2) == 0x4567
    mmio.write(0xFF00_FFFF, 1, 0x5A)
    assert mmio.read(0xFF00_FFFF, 1) == 0x5A


def test_pc_testdev_irq_lines_and_flush_port():
    levels = []
    pio, dev = PioBus(), PcTestdev(lambda line, level: levels.append((line, level)))
    dev.register(pio)
    pio.write(0x2000 + 4, 1, 1)
    pio.write(0x2000 + 4, 1, 0)
    assert levels == [(4, True), (4, False)]
    pio.write(0xE4, 4, 0x12345678)
    assert dev.flush.last_page == 0x12345000


def test_pm_timer_counts_at_3_579545_mhz_in_24_bits():
    now = [0]
    pio = PioBus()
    pio.register(PM_TIMER_PORT, 4, PmTimer(lambda: now[0]))
    assert pio.read(PM_TIMER_PORT, 4) == 0
    now[0] = 1_000_000_000  # one second of guest time
    assert pio.read(PM_TIMER_PORT, 4) == 3_579_545
    now[0] = 10_000_000_000
    assert pio.read(PM_TIMER_PORT, 4) == 35_795_450 & 0xFF_FFFF


def test_x2apic_self_ipi_reserved_bits_are_gp():
    """kvm-unit-tests msr: "Expected #GP on WRMSR(x2APIC Self-IPI, 0x100 / 0xff00 / 0xff000000)"."""
    import pytest

    from cetvm.vmm.devices import LocalApic
    from cetvm.vmm.requests import GuestFaultRequest

    apic = LocalApic(apic_id=0)
    apic.apic_base = apic.apic_base | (1 << 10)  # EXTD: x2APIC mode
    for value in (0x100, 0xFF00, 0xFF00_0000):
        with pytest.raises(GuestFaultRequest):
            apic.msr_write(0x83F, value)
    apic.msr_write(0x83F, 0x40)  # a vector alone is fine
