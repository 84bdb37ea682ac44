"""Snapshot container: round trip, corruption and truncation detection, required-state checks."""

import json
import struct
import zlib

import pytest

from cetvm import CetvmError, InputError
from cetvm.vmm.snapshot import (
    StateRequirement,
    check_required_state,
    decode_snapshot,
    encode_snapshot,
    missing_state,
    read_snapshot,
    write_snapshot,
)

MANIFEST = {
    "machine": {"ram_size": 4 << 20, "cpus": 1, "cpu_model": "sapphire-rapids"},
    "vcpus": [{"regs": {"rip": 0x100000, "rsp": 0x9F000}, "msrs": {"IA32_U_CET": 1, "IA32_XSS": 0x1800}}],
    "devices": {"serial": {"lcr": 3}},
}


def blobs():
    ram = bytearray(4 << 20)
    ram[0x100000:0x100010] = bytes(range(16))
    return {"ram@0x0": bytes(ram), "xsave/vcpu0": bytes(range(256)) * 4}


def test_round_trip_through_a_file(tmp_path):
    path = tmp_path / "vm.snap"
    write_snapshot(path, MANIFEST, blobs())
    manifest, sections = read_snapshot(path)
    assert manifest == MANIFEST
    assert sections == blobs()
    assert path.stat().st_size < 64 * 1024  # 4 MiB of mostly zero RAM compresses
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_file_layout_matches_the_documented_format():
    data = encode_snapshot({"a": 1}, {"s": b"xyz"}, compress=False)
    magic, version, count, mlen, mcrc, hcrc = struct.unpack_from("<8sIIQII", data)
    assert (magic, version, count) == (b"CETVMSNP", 1, 1)
    assert hcrc == zlib.crc32(data[:28])
    manifest = data[32 : 32 + mlen]
    assert json.loads(manifest) == {"a": 1} and mcrc == zlib.crc32(manifest)
    pos = 32 + mlen
    (nlen,) = struct.unpack_from("<H", data, pos)
    assert data[pos + 2 : pos + 2 + nlen] == b"s"
    enc, slen, rlen, rcrc, scrc, dcrc = struct.unpack_from("<BQQIII", data, pos + 2 + nlen)
    assert (enc, slen, rlen, rcrc) == (0, 3, 3, zlib.crc32(b"xyz"))
    assert data.endswith(b"xyzCETVMEND")


def test_uncompressed_round_trip_and_empty_sections():
    data = encode_snapshot({}, {"empty": b"", "one": b"\x01"}, compress=False)
    assert decode_snapshot(data) == ({}, {"empty": b"", "one": b"\x01"})


def test_every_single_byte_corruption_is_detected():
    data = encode_snapshot({"k": [1, 2]}, {"ram": b"\0" * 64 + b"abc", "x": b"q"})
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(InputError):
            decode_snapshot(bytes(bad))


def test_every_truncation_is_detected_with_a_precise_message():
    data = encode_snapshot({"k": 1}, {"ram": b"abc"})
    for n in range(len(data)):
        with pytest.raises(InputError, match="truncated|not a cetvm snapshot|end marker"):
            decode_snapshot(data[:n])
    with pytest.raises(InputError, match="truncated snapshot: section 'ram' data"):
        decode_snapshot(data[: data.index(b"CETVMEND") - 1])


def test_specific_error_messages():
    data = encode_snapshot({"k": 1}, {"ram": b"abc"})
    with pytest.raises(InputError, match=r"not a cetvm snapshot \(starts with b'\\x7fELF"):
        decode_snapshot(b"\x7fELF" + data[4:])
    with pytest.raises(InputError, match="2 unexpected bytes after the end marker"):
        decode_snapshot(data + b"!!")
    head = bytearray(data[:28])
    struct.pack_into("<I", head, 8, 2)
    newer = bytes(head) + struct.pack("<I", zlib.crc32(head)) + data[32:]
    with pytest.raises(InputError, match=r"format version 2 \(newer than this cetvm\) is not supported"):
        decode_snapshot(newer)
    bad_manifest = bytearray(data)
    bad_manifest[33] ^= 1
    with pytest.raises(InputError, match="manifest at offset 0x20 is corrupt"):
        decode_snapshot(bytes(bad_manifest))
    bad_data = bytearray(data)
    bad_data[data.index(b"CETVMEND") - 1] ^= 1
    with pytest.raises(InputError, match="section 'ram' at offset 0x[0-9a-f]+ is corrupt"):
        decode_snapshot(bytes(bad_data))


def test_missing_file_and_unserializable_manifest(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_snapshot(tmp_path / "nope")
    with pytest.raises(CetvmError, match="not JSON-serializable"):
        write_snapshot(tmp_path / "x", {"f": object()}, {})
    assert not (tmp_path / "x").exists()


CET_U = 1 << 11
NEEDS_XSS = StateRequirement("vcpus.*.msrs", "IA32_XSS",
                             when=lambda vcpu: vcpu["xcrs"]["xss_in_use"] & CET_U != 0,
                             reason="CET user state is in use")


def test_required_state_is_met_or_reported_per_vcpu():
    manifest = {"vcpus": [
        {"xcrs": {"xss_in_use": CET_U}, "msrs": {"IA32_XSS": CET_U}},
        {"xcrs": {"xss_in_use": CET_U}, "msrs": {}},
        {"xcrs": {"xss_in_use": 0}, "msrs": {}},
    ]}
    assert missing_state(manifest, [NEEDS_XSS]) == [
        "snapshot is missing vcpus[1].msrs.IA32_XSS (CET user state is in use)"]
    with pytest.raises(InputError, match=r"vcpus\[1\]\.msrs\.IA32_XSS"):
        check_required_state(manifest, [NEEDS_XSS])
    check_required_state({"vcpus": [manifest["vcpus"][0], manifest["vcpus"][2]]}, [NEEDS_XSS])


def test_required_state_missing_sections_and_unevaluable_conditions():
    reqs = [StateRequirement("machine", "cpu_model"), NEEDS_XSS]
    problems = missing_state({"vcpus": [{"msrs": {}}]}, reqs)
    assert problems[0] == "snapshot has no section machine"
    assert problems[1].startswith("cannot tell whether vcpus[0].msrs.IA32_XSS is required")
    assert missing_state({"machine": {"cpu_model": "x"}, "vcpus": []}, reqs) == []
