"""Oracle: the real `cpuid -r` tool's output on this machine parses to exactly the CPUID that
cetvm's host model reads with the CPUID instruction (CPU 0, every leaf and subleaf the host
model has). `.ci/run` installs Debian's `cpuid` package; elsewhere the test skips with a message."""

import shutil
import subprocess

import pytest

from cetvm.cpuid import get_model, parse_cpuid_raw


@pytest.mark.skipif(shutil.which("cpuid") is None, reason="the cpuid tool is not installed (apt-get install cpuid)")
def test_cpuid_raw_output_matches_the_host_model():
    text = subprocess.run(["cpuid", "-r"], capture_output=True, text=True, check=True).stdout
    parsed = parse_cpuid_raw(text, source="cpuid -r")
    host = get_model("host")
    assert host.entries(), "the host model read no leaves"
    for e in host.entries():
        assert parsed.get(e.leaf, e.subleaf) == (e.eax, e.ebx, e.ecx, e.edx), (hex(e.leaf), e.subleaf)
    assert parsed.vendor == host.vendor
