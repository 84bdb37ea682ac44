"""Local APIC: xAPIC MMIO and x2APIC MSR register behaviour, IA32_APIC_BASE transitions."""

import pytest

from cetvm import InputError
from cetvm.arch import Vector
from cetvm.vmm.bus import MmioBus
from cetvm.vmm.devices import LocalApic
from cetvm.vmm.requests import GuestFaultRequest

BASE = 0xFEE0_0000


@pytest.fixture
def xapic():
    apic, bus = LocalApic(apic_id=3), MmioBus()
    bus.register(BASE, 0x1000, apic)
    return apic, bus


def to_x2apic(apic):
    apic.write_apic_base(0xFEE0_0000 | (1 << 11) | (1 << 10) | (1 << 8))


def gp(fn, *args):
    with pytest.raises(GuestFaultRequest) as exc:
        fn(*args)
    assert exc.value.vector == Vector.GP and exc.value.error_code == 0
    return str(exc.value)


def test_reset_values(xapic):
    apic, bus = xapic
    assert apic.apic_base == 0xFEE0_0900  # BSP + enabled, xAPIC mode
    assert bus.read(BASE + 0x20, 4) == 3 << 24
    ver = bus.read(BASE + 0x30, 4)
    assert ver & 0xFF == 0x14 and (ver >> 16) & 0xFF == 5  # 6 LVT entries
    assert bus.read(BASE + 0xF0, 4) == 0xFF  # software-disabled
    assert bus.read(BASE + 0xE0, 4) == 0xFFFF_FFFF
    for lvt in range(0x320, 0x380, 0x10):
        # the BSP's LINT0 is ExtINT, unmasked (KVM kvm_lapic_reset): the 8259 reaches the BSP
        assert bus.read(BASE + lvt, 4) == (0x700 if lvt == 0x350 else 0x10000)
    assert apic.accepts_pic_interrupt


def test_an_application_processor_resets_with_every_lvt_masked():
    ap = LocalApic(apic_id=1, bsp=False)
    assert all(ap.read_register(lvt) == 0x10000 for lvt in range(0x320, 0x380, 0x10))
    assert not ap.accepts_pic_interrupt


def test_tpr_svr_ldr_dfr_registers(xapic):
    apic, bus = xapic
    bus.write(BASE + 0x80, 4, 0x1FF)
    assert bus.read(BASE + 0x80, 4) == 0xFF and bus.read(BASE + 0xA0, 4) == 0xFF  # PPR follows TPR
    bus.write(BASE + 0xF0, 4, 0x1FF)
    assert apic.software_enabled and bus.read(BASE + 0xF0, 4) == 0x1FF
    bus.write(BASE + 0xD0, 4, 0x0123_4567)
    assert bus.read(BASE + 0xD0, 4) == 0x0100_0000
    bus.write(BASE + 0xE0, 4, 0x0)
    assert bus.read(BASE + 0xE0, 4) == 0x0FFF_FFFF


def test_isr_tmr_irr_read_zero_and_eoi_is_harmless(xapic):
    _, bus = xapic
    bus.write(BASE + 0xB0, 4, 0)
    for reg in range(0x100, 0x280, 0x10):
        assert bus.read(BASE + reg, 4) == 0


def test_lvt_stays_masked_while_software_disabled(xapic):
    _, bus = xapic
    bus.write(BASE + 0x350, 4, 0x700)  # LINT0 ExtINT, unmasked
    assert bus.read(BASE + 0x350, 4) == 0x10700
    bus.write(BASE + 0xF0, 4, 0x1FF)
    bus.write(BASE + 0x350, 4, 0x700)
    assert bus.read(BASE + 0x350, 4) == 0x700
    bus.write(BASE + 0x320, 4, 0xFFFF_FFFF)  # timer: vector, mask, mode only
    assert bus.read(BASE + 0x320, 4) == 0x700FF
    bus.write(BASE + 0xF0, 4, 0xFF)  # software disable masks every LVT
    assert bus.read(BASE + 0x350, 4) == 0x10700


def test_timer_registers_store_and_count_stands_still_without_a_clock(xapic):
    _, bus = xapic
    bus.write(BASE + 0x3E0, 4, 0xF)
    bus.write(BASE + 0x380, 4, 1_000_000)
    assert bus.read(BASE + 0x3E0, 4) == 0xB
    assert bus.read(BASE + 0x380, 4) == 1_000_000
    assert bus.read(BASE + 0x390, 4) == 1_000_000  # no machine drives guest time: no counting


def test_icr_to_absent_cpu_is_recorded_and_idle(xapic):
    apic, bus = xapic
    bus.write(BASE + 0x310, 4, 0x0500_0000)
    bus.write(BASE + 0x300, 4, 0x4500 | (1 << 12))  # INIT to APIC 5, busy bit is read-only
    assert apic.ipis_sent == 1 and apic.last_icr == (0x0500_0000 << 32) | 0x4500
    assert bus.read(BASE + 0x300, 4) & (1 << 12) == 0
    assert bus.read(BASE + 0x310, 4) == 0x0500_0000
    bus.write(BASE + 0x300, 4, 0x40041)  # self-IPI shorthand: ignored
    assert apic.self_ipis_ignored == 1


def test_xapic_mmio_partial_reads_and_misaligned_writes(xapic):
    _, bus = xapic
    bus.write(BASE + 0x80, 4, 0xAB)
    assert bus.read(BASE + 0x80, 1) == 0xAB and bus.read(BASE + 0x81, 1) == 0
    assert bus.read(BASE + 0x80, 8) == 0  # wider than the register
    bus.write(BASE + 0x80, 2, 0x11)  # only aligned 32-bit writes count
    bus.write(BASE + 0x84, 4, 0x11)
    assert bus.read(BASE + 0x80, 4) == 0xAB


def test_x2apic_msrs_need_x2apic_mode(xapic):
    apic, _ = xapic
    assert "x2APIC mode is off" in gp(apic.msr_read, 0x802)


def test_x2apic_id_ldr_and_mmio_hole():
    apic = LocalApic(apic_id=0x23)
    bus = MmioBus()
    bus.register(BASE, 0x1000, apic)
    to_x2apic(apic)
    assert apic.msr_read(0x802) == 0x23
    assert apic.msr_read(0x80D) == (2 << 16) | (1 << 3)
    assert apic.msr_read(0x803) == 0x50014
    assert bus.read(BASE + 0x20, 4) == 0xFFFF_FFFF  # MMIO page is gone in x2APIC mode
    bus.write(BASE + 0x80, 4, 0x55)
    assert apic.msr_read(0x808) == 0


@pytest.mark.parametrize("index", [0x800, 0x801, 0x809, 0x80E, 0x831, 0x82F, 0x840, 0x8FF])
def test_x2apic_reads_of_non_registers_fault(index):
    apic = LocalApic()
    to_x2apic(apic)
    gp(apic.msr_read, index)


@pytest.mark.parametrize("index", [0x80B, 0x83F])
def test_x2apic_write_only_registers_fault_on_read(index):
    apic = LocalApic()
    to_x2apic(apic)
    gp(apic.msr_read, index)


@pytest.mark.parametrize("index", [0x802, 0x803, 0x80A, 0x80D, 0x810, 0x820, 0x839])
def test_x2apic_read_only_registers_fault_on_write(index):
    apic = LocalApic()
    to_x2apic(apic)
    gp(apic.msr_write, index, 0)


def test_x2apic_write_rules():
    apic = LocalApic()
    to_x2apic(apic)
    apic.msr_write(0x808, 0x20)
    assert apic.msr_read(0x808) == 0x20
    assert "bits 63:32" in gp(apic.msr_write, 0x808, 1 << 32)
    assert "must write 0" in gp(apic.msr_write, 0x828, 1)
    assert "must write 0" in gp(apic.msr_write, 0x80B, 1)
    apic.msr_write(0x80B, 0)
    apic.msr_write(0x828, 0)
    apic.msr_write(0x830, (7 << 32) | 0x4030)  # fixed IPI vector 0x30 to x2APIC ID 7
    assert apic.msr_read(0x830) == (7 << 32) | 0x4030 and apic.ipis_sent == 1
    assert "reserved bits" in gp(apic.msr_write, 0x830, 1 << 13)
    apic.msr_write(0x83F, 0x40)  # SELF_IPI: ignored
    assert apic.self_ipis_ignored == 1


def test_apic_base_transitions():
    apic = LocalApic()
    assert "reserved" in gp(apic.write_apic_base, 0xFEE0_0900 | (1 << 9))
    assert "reserved" in gp(apic.write_apic_base, 0xFEE0_0900 | (1 << 50))
    assert "without APIC enable" in gp(apic.write_apic_base, 0xFEE0_0500)
    to_x2apic(apic)
    assert "only be left by disabling" in gp(apic.write_apic_base, 0xFEE0_0900)
    apic.write_apic_base(0xFEE0_0100)  # disable
    assert "must enter xAPIC mode" in gp(apic.write_apic_base, 0xFEE0_0D00)
    apic.write_apic_base(0xFEE0_0900)
    assert apic.read_register(0x20) == 0  # xAPIC ID restored (id 0 << 24)
    apic.write_apic_base(0xFEE0_0D00, host_initiated=False)
    apic.write_apic_base(0xFEE0_0900, host_initiated=True)  # userspace may do it
    nox2 = LocalApic(x2apic_supported=False)
    assert "reserved" in gp(nox2.write_apic_base, 0xFEE0_0D00)


def test_relocated_base_is_reported_and_disabled_apic_reads_ones(xapic):
    apic, bus = xapic
    apic.write_apic_base(0xFEC0_0900)
    assert apic.mmio_base == 0xFEC0_0000
    apic.write_apic_base(0xFEE0_0100)
    assert bus.read(BASE + 0x30, 4) == 0xFFFF_FFFF


def test_cmci_lvt_exists_only_with_seven_entries():
    apic = LocalApic(nr_lvt=7)
    assert (apic.read_register(0x30) >> 16) & 0xFF == 6
    to_x2apic(apic)
    assert apic.msr_read(0x82F) == 0x10000


def test_state_round_trip_and_validation(xapic):
    apic, bus = xapic
    bus.write(BASE + 0xF0, 4, 0x1FF)
    bus.write(BASE + 0x80, 4, 0x40)
    bus.write(BASE + 0x350, 4, 0x700)
    other = LocalApic(apic_id=3)
    other.set_state(apic.get_state())
    assert other.get_state() == apic.get_state()
    assert other.read_register(0x350) == 0x700
    bad = apic.get_state() | {"apic_base": 0xFEE0_0500}
    with pytest.raises(InputError, match="invalid mode"):
        other.set_state(bad)
