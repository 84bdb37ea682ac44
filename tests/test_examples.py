"""The README's scripting example runs and shows KVM's CET MSR rules."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kvm_api.py"


def test_kvm_api_example_shows_kvm_rules():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, check=True).stdout
    assert "set U_CET/PL3_SSP: 2 of 2" in out
    assert "misaligned PL3_SSP: 0 of 1" in out
    assert "U_CET, PL3_SSP now: ['0x1', '0x7ffff000']" in out
    assert "GUEST_SSP (ONE_REG): 0x100000" in out
    assert "PL3_SSP without SHSTK: 0 of 1" in out
    assert "EINVAL" in out
