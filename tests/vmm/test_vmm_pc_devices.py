"""The standard PC device set wired on both buses, and its state through a snapshot file."""

import pytest

from cetvm import InputError
from cetvm.vmm.bus import MmioBus, PioBus
from cetvm.vmm.devices import PcDevices
from cetvm.vmm.requests import GuestExitRequest, PowerOffRequest
from cetvm.vmm.snapshot import read_snapshot, write_snapshot


def machine(**kwargs):
    out = bytearray()
    devices = PcDevices.create(ram_size=64 << 20, sink=out.extend, **kwargs)
    pio, mmio = PioBus(), MmioBus()
    devices.register(pio, mmio)
    return devices, pio, mmio, out


def test_standard_ports_and_apic_page_answer():
    devices, pio, mmio, out = machine(nb_cpus=2)
    pio.write(0x3F8, 1, ord("A"))
    assert out == b"A"
    pio.write(0x510, 2, 0x0005)
    assert pio.read(0x511, 1) == 2
    pio.write(0x21, 1, 0xFF)
    assert pio.read(0x21, 1) == 0xFF
    assert mmio.read(0xFEE0_0020, 4) == 0  # vCPU 0's APIC ID
    assert [apic.apic_id for apic in devices.lapics] == [0, 1]
    assert pio.read(0x2F8, 1) == 0xFF  # no COM2
    with pytest.raises(GuestExitRequest):
        pio.write(0xF4, 1, 0)
    with pytest.raises(PowerOffRequest):
        for ch in b"Shutdown":
            pio.write(0x8900, 1, ch)


def test_device_state_survives_a_snapshot_file(tmp_path):
    devices, pio, mmio, _ = machine()
    pio.write(0x3FB, 1, 0x03)
    pio.write(0x3FF, 1, 0x5A)
    pio.write(0x21, 1, 0xFB)
    pio.write(0x510, 2, 0)
    pio.read(0x511, 1)
    mmio.write(0xFEE0_00F0, 4, 0x1FF)
    write_snapshot(tmp_path / "s", {"devices": devices.get_state()}, {})
    manifest, _ = read_snapshot(tmp_path / "s")
    restored, pio2, mmio2, _ = machine()
    restored.set_state(manifest["devices"])
    assert pio2.read(0x3FB, 1) == 0x03 and pio2.read(0x3FF, 1) == 0x5A
    assert pio2.read(0x21, 1) == 0xFB
    assert pio2.read(0x511, 1) == ord("E")
    assert mmio2.read(0xFEE0_00F0, 4) == 0x1FF


def test_restoring_into_a_different_machine_is_refused():
    devices, *_ = machine(nb_cpus=2)
    state = devices.get_state()
    other, *_ = machine(nb_cpus=1)
    with pytest.raises(InputError, match="device state has 2 local APICs, the machine has 1"):
        other.set_state(state)
    del state["pic"]
    with pytest.raises(InputError, match="device state has no 'pic'"):
        devices.set_state(state)
