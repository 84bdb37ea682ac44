"""The fuzz properties, one per area (see :mod:`tests.fuzz`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cetvm.vmm.snapshot import decode_snapshot, encode_snapshot
from fuzz.contract import check_contract, run_cetvm
from fuzz.strategies import cpuid_files, elf_images, hostile_guest_code, manifest_mutations, section_mutations
from spec_images import JMP_SELF, elf64_kernel

SAVED_AT = 500
#: Statuses of `cetvm caps` on a valid file: 0 offered, 1 KVM refuses to load (one error line).
CAPS_STATUSES = frozenset({0, 1})


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="cetvm-fuzz-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def base_snapshot(workdir) -> bytes:
    """A 2 MiB machine spinning in `jmp $`, saved after SAVED_AT instructions."""
    kernel = workdir / "spin.elf"
    kernel.write_bytes(elf64_kernel(JMP_SELF))
    path = workdir / "base.snap"
    outcome = run_cetvm(["boot", str(kernel), "-m", "2M", "--save-state", str(path), "--save-at", str(SAVED_AT)])
    assert outcome.status == 0, outcome.err
    return path.read_bytes()


def _write(workdir: Path, name: str, data: bytes) -> str:
    path = workdir / name
    path.write_bytes(data)
    return str(path)


@given(data=cpuid_files())
def test_cpuid_files(workdir, data):
    path = _write(workdir, "dump.txt", data)
    for argv in (["cpuid", path], ["cpuid", path, "--json"]):
        check_contract(run_cetvm(argv), frozenset({0}))
    check_contract(run_cetvm(["caps", "--host", path]), CAPS_STATUSES)


@given(image=elf_images())
def test_boot_images(workdir, image):
    path = _write(workdir, "kernel.elf", image)
    check_contract(run_cetvm(["boot", path, "-m", "4M", "--max-instructions", "200"]))


def test_snapshot_manifests(workdir, base_snapshot):
    manifest, blobs = decode_snapshot(base_snapshot)

    @given(mutated=manifest_mutations(manifest))
    def run(mutated):
        path = _write(workdir, "manifest.snap", encode_snapshot(mutated, blobs))
        check_contract(run_cetvm(["boot", "--restore-state", path, "--max-instructions", str(SAVED_AT + 100)]))

    run()


def test_snapshot_sections(workdir, base_snapshot):
    @given(data=section_mutations(base_snapshot))
    def run(data):
        path = _write(workdir, "sections.snap", data)
        check_contract(run_cetvm(["boot", "--restore-state", path, "--max-instructions", str(SAVED_AT + 100)]))

    run()


@given(code=hostile_guest_code(), cet=st.sampled_from(["on", "off"]), path=st.sampled_from(["native", "python"]))
def test_hostile_guests(workdir, monkeypatch, code, cet, path):
    """Issue 9: a guest of hostile instructions (string MMIO, event delivery at RAM edges, IDT/GDT
    and stacks outside RAM, privilege changes, forced emulation...) ends as a guest would —
    any status, at most one diagnosis line, never a cetvm bug."""
    monkeypatch.setenv("CETVM_CET_PATH", path)
    kernel = _write(workdir, "hostile.elf", elf64_kernel(code))
    check_contract(run_cetvm(["boot", kernel, "-m", "4M", "--cet", cet, "--max-instructions", "400",
                              "--force-emulation-prefix"]))
