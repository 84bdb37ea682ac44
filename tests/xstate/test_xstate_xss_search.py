"""Inferring the OS's IA32_XSS from CPUID.(0xD,1).EBX in polynomial time (issue 9: every subset of
the supported XSS bits was tried; 40 bits never finished)."""

from __future__ import annotations

import itertools
import json
import random
import time

import pytest

from cetvm import InputError
from cetvm.cli.main import main
from cetvm.cpuid import get_model
from cetvm.xstate.layout import XComponent, XsaveLayout, bits_of


def _brute_force(layout: XsaveLayout, xcr0: int, target: int) -> list[int]:
    """The old definition: every subset, fewest components first, ties by value."""
    bits = list(bits_of(layout.xss_supported))
    found = [sum(1 << b for b in combo) for k in range(len(bits) + 1) for combo in itertools.combinations(bits, k)
             if layout.compacted_size(xcr0 | sum(1 << b for b in combo)) == target]
    return sorted(found, key=lambda m: (bin(m).count("1"), m))


def test_the_search_agrees_with_every_subset_on_random_layouts():
    rng = random.Random(9)
    for _ in range(200):
        components, xcr0_supported, xss_supported = {}, 0x3, 0
        for n in rng.sample(range(2, 40), rng.randrange(1, 9)):
            supervisor = rng.random() < 0.6
            components[n] = XComponent(n, rng.choice([1, 8, 16, 24, 64, 128]), 0, supervisor, rng.random() < 0.4,
                                       False)
            if supervisor:
                xss_supported |= 1 << n
            else:
                xcr0_supported |= 1 << n
        layout = XsaveLayout(components, xcr0_supported, xss_supported)
        xcr0 = 0x3 | sum(1 << n for n, c in components.items() if not c.supervisor and rng.random() < 0.5)
        target = layout.compacted_size(xcr0 | (xss_supported & rng.getrandbits(40)))
        expected = _brute_force(layout, xcr0, target)
        assert layout.infer_os_xss(xcr0, target, limit=1 << 20) == expected
        assert layout.count_os_xss(xcr0, target) == len(expected)


def _model_with_xss_bits(bits: range):
    """Tiger Lake plus an 8-byte supervisor component for each bit."""
    model = get_model("tiger-lake")
    eax, ebx, ecx, edx = model.get(0xD, 1)
    for bit in bits:
        ecx, edx = (ecx | 1 << bit, edx) if bit < 32 else (ecx, edx | 1 << (bit - 32))
        model.set(0xD, bit, 8, 0, 1, 0)
    model.set(0xD, 1, eax, ebx, ecx, edx)
    return model


def test_cetvm_cpuid_of_a_40_bit_xss_model_is_fast(capsys, tmp_path):
    path = tmp_path / "xss40.json"
    path.write_text(json.dumps(_model_with_xss_bits(range(19, 59)).to_json()))
    started = time.monotonic()
    assert main(["cpuid", str(path), "--json"]) == 0
    assert time.monotonic() - started < 5
    facts = json.loads(capsys.readouterr().out)
    assert facts["os_xss_candidates"][0] == "0x900" and len(facts["os_xss_candidates"]) == 16
    assert facts["os_xss_count"] > 10**9  # many equal-size subsets: counted, not listed


def test_xcr0_bit_63_is_refused_not_an_assertion(capsys, tmp_path):
    model = get_model("tiger-lake")
    eax, ebx, ecx, edx = model.get(0xD, 0)
    model.set(0xD, 0, eax, ebx, ecx, edx | 1 << 31)
    model.set(0xD, 63, 8, 0x1000, 0, 0)
    path = tmp_path / "xcr63.json"
    path.write_text(json.dumps(model.to_json()))
    assert main(["cpuid", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cetvm: error:") and "bit 63" in err and len(err.splitlines()) == 1
    with pytest.raises(InputError, match="bit 63"):
        XsaveLayout.from_cpuid(model)
