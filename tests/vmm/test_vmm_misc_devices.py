"""isa-debug-exit, the Bochs shutdown port, fw_cfg: as a guest drives them through the port bus."""

import struct

import pytest

from cetvm import InputError
from cetvm.vmm.bus import PioBus
from cetvm.vmm.devices import BochsShutdownPort, FwCfg, IsaDebugExit
from cetvm.vmm.devices.apm import ApmPorts
from cetvm.vmm.requests import GuestExitRequest, PowerOffRequest


@pytest.mark.parametrize("size,value,status", [(1, 0, 1), (1, 0x10, 0x21), (2, 0x1234, 0x2469), (4, 0x7FFF_FFFF, 0xFFFF_FFFF)])
def test_debug_exit_status_is_value_shifted_left_plus_one(size, value, status):
    bus = PioBus()
    bus.register(0xF4, 1, IsaDebugExit())
    with pytest.raises(GuestExitRequest) as exc:
        bus.write(0xF4, size, value)
    assert exc.value.status == status
    assert bus.read(0xF4, 1) == 0


def _outsb(bus, text):
    for ch in text:
        bus.write(0x8900, 1, ch)


def test_shutdown_port_powers_off_after_the_whole_word():
    bus = PioBus()
    bus.register(0x8900, 1, BochsShutdownPort())
    _outsb(bus, b"Shutdow")
    with pytest.raises(PowerOffRequest):
        _outsb(bus, b"n")


def test_shutdown_port_mismatch_restarts_the_match():
    bus, port = PioBus(), BochsShutdownPort()
    bus.register(0x8900, 1, port)
    _outsb(bus, b"ShutXdown")  # broken word: nothing happens
    _outsb(bus, b"SShutdown"[:1])
    assert port.matched == 1
    with pytest.raises(PowerOffRequest):
        _outsb(bus, b"hutdown")
    assert port.matched == 0


def fw_read(bus, key, length):
    bus.write(0x510, 2, key)
    return bytes(bus.read(0x511, 1) for _ in range(length))


@pytest.fixture
def fwbus():
    bus = PioBus()
    dev = FwCfg(ram_size=128 << 20, nb_cpus=2, max_cpus=4, cmdline="console=ttyS0",
                files={"opt/cetvm/b": b"BBB", "etc/a": b"hello"})
    bus.register(0x510, 2, dev)
    return bus, dev


def test_fw_cfg_signature_id_and_numbers(fwbus):
    bus, _ = fwbus
    assert fw_read(bus, 0x0000, 4) == b"QEMU"
    assert struct.unpack("<I", fw_read(bus, 0x0001, 4))[0] & 0b11 == 0b01  # traditional, no DMA
    assert struct.unpack("<Q", fw_read(bus, 0x0003, 8))[0] == 128 << 20
    assert struct.unpack("<H", fw_read(bus, 0x0005, 2))[0] == 2
    assert struct.unpack("<H", fw_read(bus, 0x000F, 2))[0] == 4
    assert struct.unpack("<H", fw_read(bus, 0x0004, 2))[0] == 1
    assert struct.unpack("<I", fw_read(bus, 0x0014, 4))[0] == len("console=ttyS0") + 1
    assert fw_read(bus, 0x0015, 14) == b"console=ttyS0\0"


def test_fw_cfg_reads_past_the_end_and_unknown_keys_are_zero(fwbus):
    bus, _ = fwbus
    assert fw_read(bus, 0x0000, 6) == b"QEMU\0\0"
    assert fw_read(bus, 0x0010, 4) == b"\0\0\0\0"
    assert fw_read(bus, 0x8000, 4) == b"\0\0\0\0"  # arch-local: none


def test_fw_cfg_selecting_rewinds_and_byte_reads_work_on_either_port(fwbus):
    bus, _ = fwbus
    bus.write(0x510, 2, 0)
    assert bytes([bus.read(0x510, 1), bus.read(0x511, 1)]) == b"QE"
    bus.write(0x511, 2, 0)
    assert bus.read(0x511, 1) == ord("Q")
    bus.write(0x510, 1, 5)  # byte write to the selector port is a data write: no reselect
    assert bus.read(0x511, 1) == ord("E")
    assert bus.read(0x511, 2) == 0xFFFF  # 16-bit reads are not valid accesses


def test_fw_cfg_file_directory_is_big_endian_and_sorted(fwbus):
    bus, _ = fwbus
    count = struct.unpack(">I", fw_read(bus, 0x0019, 4))[0]
    raw = fw_read(bus, 0x0019, 4 + 64 * count)[4:]
    files = {}
    for i in range(count):
        size, select, _res, name = struct.unpack(">IHH56s", raw[64 * i : 64 * (i + 1)])
        files[name.rstrip(b"\0").decode()] = (size, select)
    assert list(files) == ["etc/a", "opt/cetvm/b"]
    assert fw_read(bus, files["etc/a"][1], files["etc/a"][0]) == b"hello"
    assert fw_read(bus, files["opt/cetvm/b"][1], 3) == b"BBB"


def test_fw_cfg_without_files_has_an_empty_directory():
    bus = PioBus()
    bus.register(0x510, 2, FwCfg(ram_size=1 << 20))
    assert fw_read(bus, 0x0019, 4) == b"\0\0\0\0"


def test_fw_cfg_rejects_bad_configuration():
    with pytest.raises(InputError, match="1..55 bytes"):
        FwCfg(ram_size=1 << 20, files={"x" * 56: b""})
    with pytest.raises(InputError, match="max CPUs"):
        FwCfg(ram_size=1 << 20, nb_cpus=4, max_cpus=2)


def test_fw_cfg_state_round_trip_keeps_the_read_position(fwbus):
    bus, dev = fwbus
    bus.write(0x510, 2, 0)
    bus.read(0x511, 1)
    other = FwCfg(ram_size=128 << 20)
    other.set_state(dev.get_state())
    assert other.pio_read(1, 1) == ord("E")
    with pytest.raises(InputError, match="fw_cfg state has no 'offset'"):
        other.set_state({"selector": 0})


def test_apm_control_port_raises_an_smi_per_write_and_keeps_the_byte():
    """APM_CNT (0xB2): each write raises an SMI (KVM_SMI on the writer) and reads back; APM_STS
    (0xB3) is a scratch byte; a 16-bit write to 0xB2 writes both."""
    smis: list[int] = []
    apm = ApmPorts(lambda: smis.append(1))
    bus = PioBus()
    bus.register(0xB2, 2, apm)
    bus.write(0xB2, 1, 0x5A)
    assert smis == [1] and bus.read(0xB2, 1) == 0x5A
    bus.write(0xB3, 1, 0x77)
    assert smis == [1] and bus.read(0xB3, 1) == 0x77
    bus.write(0xB2, 2, 0x1234)
    assert smis == [1, 1] and bus.read(0xB2, 2) == 0x1234
    restored = ApmPorts()
    restored.set_state(apm.get_state())
    assert (restored.control, restored.status) == (0x34, 0x12)
    with pytest.raises(InputError):
        restored.set_state({"control": 0x100, "status": 0})
