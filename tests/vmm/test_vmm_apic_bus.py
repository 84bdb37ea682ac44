"""The APIC bus: IPI destinations (shorthands, physical, logical flat/cluster, x2APIC), delivery
modes (fixed, lowest priority, INIT, SIPI, SMI, NMI dropped) [SDM Vol. 3 §11.6; KVM lapic.c]; the
per-CPU xAPIC page; the SMP guest CPUID topology and fw_cfg's CPU count."""

from __future__ import annotations

import struct

import pytest

from cetvm.cpuid import get_model
from cetvm.kvm import Host
from cetvm.kvm.api import Kvm
from cetvm.vmm.config import CetMode, guest_cpuid
from cetvm.vmm.devices import LocalApic
from cetvm.vmm.devices.apic_bus import ApicBus
from cetvm.vmm.devices.fw_cfg import FW_CFG_MAX_CPUS, FW_CFG_NB_CPUS
from cetvm.vmm.devices.pc import PcDevices

BASE = 0xFEE0_0000
ICR, ICR2, EOI, SVR, LDR, DFR = 0x300, 0x310, 0xB0, 0xF0, 0xD0, 0xE0
FIXED, LOWEST, SMI, NMI, INIT, STARTUP = 0 << 8, 1 << 8, 2 << 8, 4 << 8, 5 << 8, 6 << 8
LOGICAL, ASSERT, LEVEL = 1 << 11, 1 << 14, 1 << 15
SELF, ALL, ALL_BUT_SELF = 1 << 18, 2 << 18, 3 << 18


class Machine4:
    """Four APICs on a bus, software-enabled, with the INIT/SIPI calls recorded."""

    def __init__(self) -> None:
        self.apics = [LocalApic(apic_id=i, bsp=i == 0) for i in range(4)]
        self.calls: list[tuple] = []
        self.bus = ApicBus(self.apics, init=lambda i: self.calls.append(("init", i)),
                           sipi=lambda i, v: self.calls.append(("sipi", i, v)),
                           smi=lambda i: self.calls.append(("smi", i)), nmi=lambda i: self.calls.append(("nmi", i)))
        for apic in self.apics:
            apic.mmio_write(SVR, 4, 0x1FF)

    def send(self, src: int, icr: int, dest: int = 0) -> None:
        self.apics[src].mmio_write(ICR2, 4, dest << 24)
        self.apics[src].mmio_write(ICR, 4, icr)

    def irr(self, vector: int) -> list[int]:
        return [i for i, apic in enumerate(self.apics) if apic.irr >> vector & 1]


@pytest.fixture
def m() -> Machine4:
    return Machine4()


def test_fixed_physical_and_shorthands(m):
    m.send(0, FIXED | 0x40, dest=2)
    assert m.irr(0x40) == [2] and m.bus.take_kick() and not m.bus.take_kick()
    m.send(1, SELF | FIXED | 0x41)
    assert m.irr(0x41) == [1] and not m.bus.take_kick()   # a self-IPI kicks nobody
    m.send(1, ALL | FIXED | 0x42)
    assert m.irr(0x42) == [0, 1, 2, 3]
    m.send(1, ALL_BUT_SELF | FIXED | 0x43)
    assert m.irr(0x43) == [0, 2, 3]
    m.send(3, FIXED | 0x44, dest=0xFF)                    # physical broadcast
    assert m.irr(0x44) == [0, 1, 2, 3]
    m.send(0, FIXED | 0x45, dest=7)                       # nobody has APIC ID 7
    assert m.irr(0x45) == []


def test_fixed_ipi_needs_an_enabled_apic_and_a_legal_vector(m):
    m.apics[2].mmio_write(SVR, 4, 0xFF)                   # software-disabled: dropped (KVM)
    m.send(0, ALL_BUT_SELF | FIXED | 0x50)
    assert m.irr(0x50) == [1, 3]
    m.send(0, ALL_BUT_SELF | FIXED | 0x0F)                # vectors 0-15 are illegal
    assert m.irr(0x0F) == []
    assert m.apics[1].pending_vector() == 0x50
    m.apics[3].write_apic_base(m.apics[3].apic_base & ~(1 << 11))  # hardware-disabled: no IPI at all
    m.send(0, ALL_BUT_SELF | INIT | ASSERT)
    assert m.calls == [("init", 1), ("init", 2)]


def test_logical_destinations(m):
    for i, apic in enumerate(m.apics):                    # flat model: one bit per CPU
        apic.mmio_write(LDR, 4, (1 << i) << 24)
    m.send(0, LOGICAL | FIXED | 0x60, dest=0b1010)
    assert m.irr(0x60) == [1, 3]
    for i, apic in enumerate(m.apics):                    # cluster model: cluster i//2, member bit
        apic.mmio_write(DFR, 4, 0x0FFF_FFFF)
        apic.mmio_write(LDR, 4, ((i // 2) << 4 | 1 << (i % 2)) << 24)
    m.send(0, LOGICAL | FIXED | 0x61, dest=0x13)          # cluster 1, members 0 and 1
    assert m.irr(0x61) == [2, 3]


def test_lowest_priority_picks_one_target(m):
    m.send(0, ALL_BUT_SELF | LOWEST | 0x70)
    assert m.irr(0x70) == [1]


def test_x2apic_destination_and_self_ipi_register(m):
    for apic in m.apics:
        apic.write_apic_base(apic.apic_base | (1 << 10))  # x2APIC mode
    m.apics[0].msr_write(0x830, (3 << 32) | FIXED | 0x80)
    assert m.irr(0x80) == [3]
    m.apics[0].msr_write(0x830, (0x0001_0004 << 32) | LOGICAL | FIXED | 0x81)  # cluster 1: nobody
    assert m.irr(0x81) == []
    m.apics[0].msr_write(0x830, (0x0000_0006 << 32) | LOGICAL | FIXED | 0x82)  # cluster 0, IDs 1, 2
    assert m.irr(0x82) == [1, 2]
    m.apics[2].msr_write(0x83F, 0x83)                     # SELF_IPI register
    assert m.irr(0x83) == [2]


def test_init_resets_the_target_apic_and_reaches_the_vcpu(m):
    m.apics[1].mmio_write(0x80, 4, 0x20)                  # TPR
    m.send(0, INIT | ASSERT, dest=1)
    assert m.calls == [("init", 1)] and m.apics[1].tpr == 0 and m.apics[1].svr == 0xFF
    assert m.apics[1].apic_id == 1 and m.apics[1].read_register(0x20) == 1 << 24
    m.send(0, INIT | LEVEL, dest=1)                       # INIT level de-assert: ignored
    assert m.calls == [("init", 1)]
    m.send(0, ALL_BUT_SELF | STARTUP | 0x08)
    assert m.calls[1:] == [("sipi", 1, 8), ("sipi", 2, 8), ("sipi", 3, 8)]


def test_smi_ipis_reach_the_addressed_vcpus(m):
    m.send(0, SMI, dest=2)
    assert m.calls == [("smi", 2)] and m.bus.take_kick()
    m.send(1, ALL | SMI)
    assert m.calls[1:] == [("smi", 0), ("smi", 1), ("smi", 2), ("smi", 3)]
    assert m.bus.dropped == 0


def test_nmi_ipis_reach_the_addressed_vcpus_as_kvm_nmi(m):
    """ICR delivery mode NMI: the target vCPUs get KVM_NMI (the vector field is ignored, nothing
    goes into an IRR); physical, self and all-but-self destinations, another CPU kicked."""
    m.send(0, NMI | 0x33, dest=1)
    assert m.calls == [("nmi", 1)] and m.irr(0x33) == [] and m.irr(2) == [] and m.bus.take_kick()
    m.send(2, SELF | NMI)
    assert m.calls[1:] == [("nmi", 2)] and not m.bus.take_kick()
    m.send(3, ALL_BUT_SELF | NMI)
    assert m.calls[2:] == [("nmi", 0), ("nmi", 1), ("nmi", 2)] and m.bus.dropped == 0


def test_the_xapic_page_reaches_the_running_vcpus_apic():
    devices = PcDevices.create(16 << 20, nb_cpus=3)
    page = devices.apic_page
    for cpu in range(3):
        page.current = cpu
        assert page.mmio_read(0x20, 4) == cpu << 24
    page.current = 2
    page.mmio_write(0x80, 4, 0x30)
    assert [apic.tpr for apic in devices.lapics] == [0, 0, 0x30]
    assert struct.unpack("<H", devices.fw_cfg.item(FW_CFG_NB_CPUS))[0] == 3
    assert struct.unpack("<H", devices.fw_cfg.item(FW_CFG_MAX_CPUS))[0] >= 3


@pytest.mark.parametrize("nr_cpus, apic_id", [(1, 0), (4, 2), (8, 7), (3, 1)])
def test_guest_cpuid_topology(nr_cpus, apic_id):
    supported = Kvm(Host(get_model("sapphire-rapids"))).get_supported_cpuid()
    cpuid = guest_cpuid(supported, CetMode.ON, apic_id=apic_id, nr_cpus=nr_cpus)
    _, ebx, _, edx = cpuid.get(1, 0)
    assert ebx >> 24 == apic_id
    assert (ebx >> 16 & 0xFF, edx >> 28 & 1) == ((nr_cpus, 1) if nr_cpus > 1 else (0, 0))
    for leaf in (0xB, 0x1F):
        smt, core, end = (cpuid.get(leaf, i) for i in range(3))
        assert smt == (0, 1, 0x100, apic_id)
        assert core == ((nr_cpus - 1).bit_length(), nr_cpus, 0x201, apic_id)
        assert end[2] & 0xFF00 == 0 and end[3] == apic_id
        assert (nr_cpus - 1) >> core[0] == 0          # the shift numbers every core


def test_cpuid_leaf_4_cores_per_package():
    """KVM's supported table has no leaf 4 here; a table that has one (the raw model) gets
    EAX[31:26] = cores - 1 on every cache sub-leaf, the rest kept."""
    model = get_model("sapphire-rapids")
    cpuid = guest_cpuid(model, CetMode.ON, apic_id=1, nr_cpus=3)
    for sub in range(4):
        assert cpuid.get(4, sub)[0] >> 26 == 2
        assert cpuid.get(4, sub)[0] & 0x03FF_FFFF == model.get(4, sub)[0] & 0x03FF_FFFF
