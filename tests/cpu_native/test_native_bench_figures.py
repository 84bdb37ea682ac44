"""`cetvm bench` and benchmarks/bench_native_cet.py report every run, not only the best one.

The headline figures are the best run of each configuration; the runs themselves, their
distribution and the native/off ratio of each back-to-back pair are what make a figure on a
noisy machine believable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cetvm import InputError
from cetvm.cli.bench import measure, run_bench
from cetvm.cpu.native import native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native CET fast path not built")
BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_native_cet.py"


@needs_native
@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_every_run_is_kept_and_the_headline_is_the_best(clock):
    result = run_bench(20, off_iterations=3000, repeats=3, clock=clock)
    assert result.clock == clock
    assert set(result.samples) == {"native_ring0", "off_ring0", "native_ring3", "off_ring3"}
    assert all(len(runs) == 3 and min(runs) > 0 for runs in result.samples.values())
    assert result.cet_on_native_mips == max(result.samples["native_ring0"])
    assert result.cet_off_ring3_mips == max(result.samples["off_ring3"])
    dist = result.distribution()["native_ring3"]
    assert dist["min"] <= dist["median"] <= dist["max"] == result.cet_on_native_ring3_mips and dist["runs"] == 3
    pairs = result.paired_shares(0)
    assert pairs == [on / off for on, off in zip(result.samples["native_ring0"], result.samples["off_ring0"])]


def test_unknown_clock_is_an_input_error():
    with pytest.raises(InputError, match="clock"):
        measure(10, cet=False, clock="sundial")
    with pytest.raises(InputError, match="clock"):
        run_bench(10, repeats=1, clock="sundial")


@needs_native
def test_bench_json_has_the_runs_and_the_pairs(capsys):
    from cetvm.cli.main import main

    assert main(["bench", "--json", "--iterations", "30", "--repeats", "2", "--clock", "wall"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["clock"] == "wall" and doc["repeats"] == 2
    assert doc["cet_on_native_mips"] == max(doc["samples"]["native_ring0"])
    assert len(doc["paired_native_share"]["ring3"]) == 2
    assert main(["bench", "--iterations", "30", "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "cpu clock" in text and "each round's pair, ring 3" in text


@needs_native
def test_benchmark_script_reports_best_and_median():
    run = subprocess.run([sys.executable, str(BENCH_SCRIPT), "--iterations", "2000", "--repeats", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    for cpl in (0, 3):
        assert 0 < doc[f"cpl{cpl}_native_median"] <= doc[f"cpl{cpl}_native"]
        assert doc[f"cpl{cpl}_native_ratio"] == pytest.approx(doc[f"cpl{cpl}_native"] / doc[f"cpl{cpl}_off"], abs=2e-3)
        assert doc[f"cpl{cpl}_native_ratio_paired_median"] > 0
