"""ACPI tables (read back with our parser and disassembled by iasl), the AML encoder, and the PM1
registers' power-off."""

import shutil
import struct
import subprocess

import pytest

from cetvm.vmm.acpi import ACPI_BASE, acpi_tables, aml
from cetvm.vmm.acpi.parse import AcpiError, dsdt_s5, parse_madt, read_tables
from cetvm.vmm.devices.acpi_pm import SLP_TYP_S5, AcpiPm1
from cetvm.vmm.requests import PowerOffRequest


def memory_of(tables):
    """A read(address, size) over guest memory holding ``tables`` (zeros elsewhere)."""
    image = bytearray(0x10_0000)
    for address, data in tables.items():
        image[address:address + len(data)] = data

    def read(address, size):
        return bytes(image[address:address + size])
    return read, image


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_tables_parse_with_valid_checksums_and_describe_the_machine(cpus):
    read, _ = memory_of(acpi_tables(cpus))
    found = read_tables(read)
    assert set(found) == {b"RSDT", b"XSDT", b"FACP", b"APIC", b"DSDT", b"FACS"}
    madt = parse_madt(found[b"APIC"])
    assert madt.lapic_address == 0xFEE0_0000 and madt.flags & 1
    assert madt.apic_ids == list(range(cpus))
    assert madt.ioapics == [(0, 0xFEC0_0000, 0)]
    assert madt.overrides == {0: (2, 0), 9: (9, 0x0D)}
    assert madt.nmis == [(0xFF, 0x05, 1)]
    fadt = found[b"FACP"]
    assert fadt[8] == 6 and len(fadt) == 276
    sci, smi_cmd = struct.unpack_from("<HI", fadt, 46)
    pm1a_evt, _, pm1a_cnt, _, _, pm_tmr = struct.unpack_from("<6I", fadt, 56)
    assert (sci, smi_cmd, pm1a_evt, pm1a_cnt, pm_tmr) == (9, 0, 0x600, 0x604, 0x608)
    assert struct.unpack_from("<Q", fadt, 140)[0] == struct.unpack_from("<I", fadt, 40)[0]  # X_DSDT
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 0, 0x604)  # X_PM1a_CNT_BLK
    assert dsdt_s5(found[b"DSDT"]) == SLP_TYP_S5


def test_parser_refuses_a_bad_checksum_and_a_missing_rsdp():
    tables = acpi_tables(1)
    read, image = memory_of(tables)
    madt_at = next(a for a, t in tables.items() if t[:4] == b"APIC")
    image[madt_at + 40] ^= 1
    with pytest.raises(AcpiError, match="checksum"):
        read_tables(read)
    image[ACPI_BASE:ACPI_BASE + 8] = bytes(8)
    with pytest.raises(AcpiError, match="no RSDP"):
        read_tables(read)


@pytest.fixture(scope="module")
def iasl():
    path = shutil.which("iasl")
    if path is None:
        pytest.skip("iasl not installed (Debian package acpica-tools; `make debs` installs it as root)")
    return path


def test_iasl_disassembles_every_table_without_errors_or_warnings(iasl, tmp_path):
    for data in acpi_tables(2).values():
        if data[:8] == b"RSD PTR ":
            continue  # iasl -d takes tables with a header; the RSDP is checked by our parser
        name = data[:4].decode()
        (tmp_path / f"{name}.dat").write_bytes(data)
        proc = subprocess.run([iasl, "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Warning" not in proc.stdout + proc.stderr and "Error" not in proc.stdout + proc.stderr, proc.stdout
        assert (tmp_path / f"{name}.dsl").is_file()
    dsl = (tmp_path / "DSDT.dsl").read_text()
    assert "Name (\\_S5, Package (0x04)" in dsl and "0x05," in dsl
    assert 'EisaId ("PNP0501")' in dsl and "0x03F8" in dsl and "{4}" in dsl
    madt = (tmp_path / "APIC.dsl").read_text()
    assert madt.count("[Processor Local APIC]") == 2 and "[I/O APIC]" in madt
    assert madt.count("[Interrupt Source Override]") == 2
    fadt = (tmp_path / "FACP.dsl").read_text()
    assert "SCI Interrupt : 0009" in fadt and "PM1A Control Block Address : 00000604" in fadt


def test_iasl_recompiles_the_disassembled_dsdt_to_the_same_aml(iasl, tmp_path):
    dsdt = next(t for t in acpi_tables(1).values() if t[:4] == b"DSDT")
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    subprocess.run([iasl, "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, timeout=60, check=True)
    proc = subprocess.run([iasl, "-oa", "-p", "re", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "re.aml").read_bytes()[36:] == dsdt[36:]


@pytest.mark.parametrize("length,encoded", [(0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"),
                                            (4093, b"\x4f\xff"), (4094, b"\x81\x00\x01")])
def test_pkg_length_counts_itself(length, encoded):
    assert aml.pkg_length(length) == encoded


def test_aml_terms():
    assert aml.integer(0) == b"\x00" and aml.integer(1) == b"\x01" and aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0x1234) == b"\x0b\x34\x12" and aml.integer(1 << 40)[0] == 0x0E
    assert aml.eisa_id("PNP0501") == b"\x0c" + struct.pack("<I", 0x0105D041)
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    for bad in (lambda: aml.name_seg("1ABC"), lambda: aml.name_seg("TOOLONG"), lambda: aml.integer(-1),
                lambda: aml.eisa_id("pnp0501"), lambda: aml.irq_no_flags(16)):
        with pytest.raises(aml.AmlError):
            bad()


def test_pm1_power_off_status_enable_and_sci():
    levels = []
    pm = AcpiPm1(sci=levels.append)
    assert pm.pio_read(4, 2) & 1  # SCI_EN: always in ACPI mode
    pm.pio_write(2, 2, 0x0100)  # PWRBTN_EN
    pm.press_power_button()
    assert pm.pio_read(0, 2) & 0x0100 and levels[-1] is True
    pm.pio_write(0, 2, 0x0100)  # write 1 to clear
    assert pm.pio_read(0, 2) == 0 and levels[-1] is False
    pm.pio_write(4, 2, 1 << 10 | 1 << 13)  # SLP_TYP 1 (no such state) with SLP_EN: ignored
    assert pm.pio_read(4, 2) == 1 | 1 << 10  # SLP_EN reads 0, SLP_TYP kept
    with pytest.raises(PowerOffRequest, match="S5"):
        pm.pio_write(4, 2, SLP_TYP_S5 << 10 | 1 << 13)
    with pytest.raises(PowerOffRequest):  # a dword write at PM1_EN reaches PM1_CNT's bytes too
        pm.pio_write(2, 4, (SLP_TYP_S5 << 10 | 1 << 13) << 16)
