"""KVM's force-emulation prefix through `cetvm boot` in a fresh process, on the Python CET path."""

import os
import subprocess
import sys

from boot_support import guest

PASS_STATUS = 1


def test_forced_emulation_on_the_python_path_in_a_fresh_process():
    """Regression: single-instruction runs (the emulated instruction behind the prefix) used to
    add and delete the Python count hook around each run; Unicorn 2.1.4 then called a freed
    ctypes closure (segfault at the CPL3 FEP LEA). `cetvm boot` in a fresh process, as users run it."""
    env = dict(os.environ, CETVM_CET_PATH="python", CETVM_PYTHON_FAST_PATH="1")
    proc = subprocess.run([sys.executable, "-m", "cetvm", "boot", str(guest("fep_cet")), "--memory", "32M",
                           "--force-emulation-prefix", "--append", "fep=1"], capture_output=True, env=env, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == PASS_STATUS, (proc.returncode, proc.stderr.decode()[-2000:])
    assert "ok 8 - CPL3: FEP LEA emulates" in out and "# 0 failed" in out


def test_the_force_emulation_prefix_setting_survives_a_snapshot(tmp_path):
    """The host setting is part of the machine: a snapshot taken with it restores with it."""
    snap = tmp_path / "fep.snap"
    first = subprocess.run([sys.executable, "-m", "cetvm", "boot", str(guest("fep_cet")), "--memory", "32M",
                            "--force-emulation-prefix", "--append", "fep=1", "--save-state", str(snap),
                            "--save-at", "250000"], capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr.decode()
    rest = subprocess.run([sys.executable, "-m", "cetvm", "boot", "--restore-state", str(snap)],
                          capture_output=True, timeout=120)
    assert rest.returncode == PASS_STATUS, rest.stderr.decode()
    assert "ok 8 - CPL3: FEP LEA emulates" in rest.stdout.decode()
