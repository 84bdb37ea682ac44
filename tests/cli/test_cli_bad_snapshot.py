"""`cetvm boot --restore-state` with corrupt, truncated, foreign and semantically broken snapshots:
one line, exit status 2, never a traceback; every single-byte corruption is detected."""

from __future__ import annotations

import copy
import json
import random
import struct

import pytest

from cetvm import InputError
from cetvm.vmm.snapshot import decode_snapshot, encode_snapshot

from cli_support import JMP_SELF, assert_one_line_error, cetvm, elf64_kernel

SAVED_AT = 1000


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A snapshot of a 4 MiB machine spinning in `jmp $`, taken after SAVED_AT instructions."""
    directory = tmp_path_factory.mktemp("snap")
    kernel = directory / "spin.elf"
    kernel.write_bytes(elf64_kernel(JMP_SELF))
    path = directory / "vm.snap"
    from cetvm.cli.main import main

    status = main(["boot", str(kernel), "--memory", "4M", "--save-state", str(path), "--save-at", str(SAVED_AT)])
    assert status == 0 and path.is_file()
    return path.read_bytes()


def restore(capsys, tmp_path, data: bytes, *extra: str):
    path = tmp_path / "bad.snap"
    path.write_bytes(data)
    return cetvm(capsys, "boot", "--restore-state", str(path), *extra)


def test_the_fixture_snapshot_continues(capsys, tmp_path, snapshot):
    run = restore(capsys, tmp_path, snapshot, "--max-instructions", str(SAVED_AT + 500), "--json")
    assert run.status == 124
    assert '"instructions": %d' % (SAVED_AT + 500) in run.out


def test_a_snapshot_from_before_the_interrupt_platform_continues(capsys, tmp_path, snapshot):
    """Its devices have no I/O APIC, PIT, PM1 or IRQ line state: they restore at reset."""
    def older(manifest, _blobs):
        for key in ("ioapic", "pit", "pm1", "irq_lines"):
            del manifest["devices"][key]
    run = restore(capsys, tmp_path, _mutated(snapshot, older), "--max-instructions", str(SAVED_AT + 500), "--json")
    assert run.status == 124
    assert '"instructions": %d' % (SAVED_AT + 500) in run.out


def test_every_single_byte_corruption_is_detected(snapshot):
    rng = random.Random(14)
    positions = sorted({rng.randrange(len(snapshot)) for _ in range(300)} | set(range(0, 40)) | {len(snapshot) - 1})
    for pos in positions:
        data = bytearray(snapshot)
        data[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(InputError):
            decode_snapshot(bytes(data), "bad.snap")


def test_every_truncation_is_detected(snapshot):
    rng = random.Random(41)
    for length in sorted({rng.randrange(len(snapshot)) for _ in range(200)} | set(range(0, 40))):
        with pytest.raises(InputError, match="bad.snap"):
            decode_snapshot(snapshot[:length], "bad.snap")


@pytest.mark.parametrize("cut", [0, 5, 8, 31, 100, -9, -1])
def test_truncated_snapshot_on_the_command_line(capsys, tmp_path, snapshot, cut):
    run = restore(capsys, tmp_path, snapshot[:cut])
    assert_one_line_error(run, 2, "bad.snap")


@pytest.mark.parametrize("offset", [0, 9, 13, 20, 29, 40, 200, -20, -3])
def test_flipped_byte_on_the_command_line(capsys, tmp_path, snapshot, offset):
    data = bytearray(snapshot)
    data[offset] ^= 0x40
    assert_one_line_error(restore(capsys, tmp_path, bytes(data)), 2, "bad.snap")


def test_trailing_garbage_is_refused(capsys, tmp_path, snapshot):
    assert_one_line_error(restore(capsys, tmp_path, snapshot + b"x"), 2, "unexpected bytes after the end marker")


def _with_header_field(snapshot: bytes, offset: int, value: int) -> bytes:
    """Rewrite a 32-bit header field and recompute the header CRC (header layout in the
    cetvm.vmm.snapshot module docstring: CRC32 of bytes 0..27 at 28)."""
    import zlib

    data = bytearray(snapshot)
    struct.pack_into("<I", data, offset, value)
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[:28])) & 0xFFFFFFFF)
    return bytes(data)


def test_a_snapshot_from_a_newer_format_version_is_refused_by_version(capsys, tmp_path, snapshot):
    run = restore(capsys, tmp_path, _with_header_field(snapshot, 8, 2))
    assert_one_line_error(run, 2, "format version 2", "newer", "reads version 1")


def test_a_snapshot_with_an_older_format_version_is_refused(capsys, tmp_path, snapshot):
    assert_one_line_error(restore(capsys, tmp_path, _with_header_field(snapshot, 8, 0)), 2, "format version 0")


def test_a_wrong_section_count_is_refused(capsys, tmp_path, snapshot):
    assert_one_line_error(restore(capsys, tmp_path, _with_header_field(snapshot, 12, 7)), 2, "bad.snap")


def _mutated(snapshot: bytes, change) -> bytes:
    manifest, blobs = decode_snapshot(snapshot)
    manifest = copy.deepcopy(manifest)
    blobs = dict(blobs)
    change(manifest, blobs)
    return encode_snapshot(manifest, blobs)


def _set(path, value):
    def change(manifest, _blobs):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _delete(path):
    def change(manifest, _blobs):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


def _drop_section(name):
    def change(_manifest, blobs):
        del blobs[name]
    return change


def _resize_section(name, size):
    def change(_manifest, blobs):
        blobs[name] = bytes(size)
    return change


SEMANTIC_CASES = {
    "kind": (_set(["kind"], "something-else"), ["not a cetvm machine snapshot"]),
    "machine missing": (_delete(["machine"]), ["has no 'machine'"]),
    "memory text": (_set(["machine", "memory"], "lots"), ["machine.memory", "not an integer"]),
    "memory too small": (_set(["machine", "memory"], 4096), ["too small"]),
    "unknown cpu": (_set(["machine", "cpu"], "pentium"), ["pentium"]),
    "cet mode": (_set(["machine", "cet"], "sometimes"), ["--cet"]),
    "two vcpus": (lambda m, b: m["vcpus"].append(m["vcpus"][0]), ["1 vCPU(s)", "2 vCPU states"]),
    "vcpu is text": (_set(["vcpus", 0], "x"), ["vcpus[0]"]),
    "regs missing": (_delete(["vcpus", 0, "regs"]), ["regs"]),
    "msrs is text": (_set(["vcpus", 0, "msrs"], "x"), ["msrs"]),
    "U_CET is text": (_set(["vcpus", 0, "msrs", "0x6a0"], "x"), ["vcpus[0].msrs.0x6a0", "integer"]),
    "cr4 is text": (_set(["vcpus", 0, "sregs", "cr4"], "x"), ["vcpus[0].sregs.cr4", "integer"]),
    "efer refused": (_set(["vcpus", 0, "msrs", "0xc0000080"], -1), ["refused", "vcpus[0].msrs.0xc0000080"]),
    "cr0 refused": (_set(["vcpus", 0, "sregs", "cr0"], 0x8000_0000), ["refused by KVM", "CR0.PG without CR0.PE"]),
    "cr4 float": (_set(["vcpus", 0, "sregs", "cr4"], 1.5), ["vcpus[0].sregs.cr4", "1.5"]),
    "segment is text": (_set(["vcpus", 0, "sregs", "cs"], "x"), ["vcpus[0].sregs.cs"]),
    "xcr0 refused": (_set(["vcpus", 0, "xcrs", 0, 1], 1 << 60), ["XCR0"]),
    "rip is text": (_set(["vcpus", 0, "regs", "rip"], "x"), ["vcpus[0].regs.rip"]),
    "rip is bool": (_set(["vcpus", 0, "regs", "rip"], True), ["vcpus[0].regs.rip"]),
    "run count": (_delete(["run"]), ["has no 'run'"]),
    "xsave section": (_drop_section("xsave/vcpu0"), ["xsave/vcpu0"]),
    "ram section": (_drop_section("ram@0x0"), ["ram@0x0"]),
    "ram size": (_resize_section("ram@0x0", 4096), ["ram@0x0", "0x1000"]),
}


@pytest.mark.parametrize("case", SEMANTIC_CASES, ids=list(SEMANTIC_CASES))
def test_semantically_broken_snapshot_is_one_line_exit_2(capsys, tmp_path, snapshot, case):
    change, fragments = SEMANTIC_CASES[case]
    run = restore(capsys, tmp_path, _mutated(snapshot, change), "--max-instructions", str(SAVED_AT + 100))
    assert_one_line_error(run, 2, "cetvm: error:", *fragments)


# --- issue 9: one schema for the manifest; bounded sections ---------------------------------
def _cpu_model_with_host(host):
    def change(manifest, _blobs):
        from cetvm.cpuid import get_model

        machine = manifest["machine"]
        machine["cpu_model"] = get_model(machine.pop("cpu")).to_json()
        machine["host"] = host
    return change


SCHEMA_CASES = {
    "rip missing": (_delete(["vcpus", 0, "regs", "rip"]), ["vcpus[0].regs has no 'rip'"]),
    "rip 2^70": (_set(["vcpus", 0, "regs", "rip"], 1 << 70), ["vcpus[0].regs.rip", "not a 64-bit value"]),
    "rsp 2^64": (_set(["vcpus", 0, "regs", "rsp"], 1 << 64), ["vcpus[0].regs.rsp", "not a 64-bit value"]),
    "guest ssp 2^64": (_set(["vcpus", 0, "guest_ssp"], 1 << 64), ["vcpus[0].guest_ssp", "not a 64-bit value"]),
    "efer all ones": (_set(["vcpus", 0, "sregs", "efer"], (1 << 64) - 1), ["vcpus[0].sregs.efer", "SCE, LME"]),
    "EFER MSR all ones": (_set(["vcpus", 0, "msrs", "0xc0000080"], (1 << 64) - 1), ["vcpus[0].msrs.0xc0000080"]),
    "segment attribute 2^64": (_set(["vcpus", 0, "sregs", "cs", "attributes"], 1 << 64),
                               ["vcpus[0].sregs.cs.attributes", "refused"]),
    "segment attribute 2^32": (_set(["vcpus", 0, "sregs", "ds", "attributes"], 1 << 32),
                               ["vcpus[0].sregs.ds.attributes", "32-bit"]),
    "gdt limit 2^40": (_set(["vcpus", 0, "sregs", "gdt", "limit"], 1 << 40), ["vcpus[0].sregs.gdt.limit", "16-bit"]),
    "selector 2^16": (_set(["vcpus", 0, "sregs", "ss", "selector"], 1 << 16), ["vcpus[0].sregs.ss.selector"]),
    "kernel_cmdline 1": (_cpu_model_with_host({"kernel_cmdline": 1}), ["machine.host.kernel_cmdline", "not a string"]),
    "host virt": (_cpu_model_with_host({"virt": "xen"}), ["machine.host.virt", "vmx, svm"]),
    "cmdline 1": (_set(["machine", "cmdline"], 1), ["machine.cmdline", "not a string"]),
    "modules not a list": (_set(["machine", "modules"], "x"), ["machine.modules", "not a list"]),
    "cpu and cpu_model": (_set(["machine", "cpu_model"], {}), ["exactly one of 'cpu'"]),
    "unknown register": (_set(["vcpus", 0, "regs", "rip2"], 0), ["unknown field 'rip2'"]),
    "mp_state": (_set(["vcpus", 0, "mp_state"], "RUNNING"), ["vcpus[0].mp_state", "RUNNABLE"]),
    "event vector 32": (_set(["vcpus", 0, "events"], {"vector": 32}), ["vcpus[0].events.vector"]),
    "xcrs pair": (_set(["vcpus", 0, "xcrs"], [[0]]), ["vcpus[0].xcrs[0]", "pair"]),
    "msr key": (_set(["vcpus", 0, "msrs", "IA32_EFER"], 0), ["vcpus[0].msrs", "'IA32_EFER'"]),
    "instructions negative": (_set(["run", "instructions"], -1), ["run.instructions"]),
    "instructions 2^64": (_set(["run", "instructions"], 1 << 64), ["run.instructions"]),
    "memory 2^64": (_set(["machine", "memory"], 1 << 64), ["machine.memory"]),
    "unknown device": (_set(["devices", "hpet"], {}), ["devices", "unknown field 'hpet'"]),
    "ioapic is text": (_set(["devices", "ioapic"], "x"), ["devices.ioapic", "not an object"]),
    "pit channels short": (_set(["devices", "pit", "channels"], []), ["pit state", "channels"]),
    "ioapic entry 2^64": (_set(["devices", "ioapic", "redirtbl", 0], 1 << 64), ["ioapic redirtbl[0]"]),
}


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=list(SCHEMA_CASES))
def test_the_manifest_schema_refuses_bad_state_with_the_field(capsys, tmp_path, snapshot, case):
    change, fragments = SCHEMA_CASES[case]
    run = restore(capsys, tmp_path, _mutated(snapshot, change), "--max-instructions", str(SAVED_AT + 100))
    assert_one_line_error(run, 2, "cetvm: error:", *fragments)


def _raw_snapshot(manifest_bytes: bytes, sections: list[tuple[str, int, bytes, int]]) -> bytes:
    """A snapshot built from the format description alone (cetvm.vmm.snapshot's docstring), so
    fields can lie: sections are (name, encoding, stored bytes, claimed raw length)."""
    import zlib

    crc = lambda data: zlib.crc32(data) & 0xFFFFFFFF  # noqa: E731
    header = struct.pack("<8sIIQI", b"CETVMSNP", 1, len(sections), len(manifest_bytes), crc(manifest_bytes))
    parts = [header, struct.pack("<I", crc(header)), manifest_bytes]
    for name, encoding, stored, raw_len in sections:
        descriptor = (struct.pack("<H", len(name)) + name.encode()
                      + struct.pack("<BQQII", encoding, len(stored), raw_len, crc(stored) if encoding == 0 else 0,
                                    crc(stored)))
        parts += [descriptor, struct.pack("<I", crc(descriptor)), stored]
    return b"".join(parts + [b"CETVMEND"])


def test_a_deeply_nested_manifest_is_one_line(capsys, tmp_path):
    manifest = b'{"kind": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    run = restore(capsys, tmp_path, _raw_snapshot(manifest, []))
    assert_one_line_error(run, 2, "nested too deeply")


@pytest.mark.parametrize("claimed", ["the region size", "the bomb size"])
def test_a_zlib_bomb_is_refused_before_it_inflates(tmp_path, snapshot, claimed):
    """64 MiB of zeros compress to ~64 KiB; the manifest's 4 MiB machine bounds the section."""
    import tracemalloc
    import zlib

    from cetvm.vmm.machine import Machine

    manifest, blobs = decode_snapshot(snapshot)
    bomb = zlib.compress(bytes(64 << 20), 9)
    raw_len = 4 << 20 if claimed == "the region size" else 64 << 20
    data = _raw_snapshot(json.dumps(manifest).encode(),
                         [("xsave/vcpu0", 0, blobs["xsave/vcpu0"], len(blobs["xsave/vcpu0"])),
                          ("ram@0x0", 1, bomb, raw_len)])
    path = tmp_path / "bomb.snap"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="inflates to more than|allows at most"):
            Machine.restore(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_an_unexpected_section_is_refused(capsys, tmp_path, snapshot):
    change = lambda _m, blobs: blobs.__setitem__("ram@0x100000000", b"x")  # noqa: E731
    run = restore(capsys, tmp_path, _mutated(snapshot, change))
    assert_one_line_error(run, 2, "unexpected section 'ram@0x100000000'")


def test_a_first_instruction_that_cannot_be_fetched_keeps_the_count(capsys, tmp_path, snapshot):
    """RIP beyond the identity map: the fetch faults (then #DF, triple fault) before the
    instruction is counted, so the count stays SAVED_AT (it used to underflow to 2^64 + ...)."""
    run = restore(capsys, tmp_path, _mutated(snapshot, _set(["vcpus", 0, "regs", "rip"], 1 << 32)), "--json")
    assert run.status == 125, run.err
    assert json.loads(run.out)["instructions"] == SAVED_AT
