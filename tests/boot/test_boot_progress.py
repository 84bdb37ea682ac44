"""Long runs report progress (instructions, seconds) about once a second; short runs stay quiet."""

import itertools

from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from spec_images import JMP_SELF, elf64_kernel


def _machine(tmp_path):
    image = tmp_path / "spin.elf"
    image.write_bytes(elf64_kernel(JMP_SELF))
    return Machine.boot(image, MachineConfig(memory="16M", serial_sink=lambda _b: None))


def test_progress_is_reported_with_growing_counts(tmp_path):
    machine = _machine(tmp_path)
    ticks = itertools.count(0, 0.4)  # a clock that advances 0.4 s per reading
    machine._loop.clock = lambda: next(ticks)
    seen: list[tuple[int, float]] = []
    result = machine.run(max_instructions=20_000_000, progress=lambda n, s: seen.append((n, s)))
    assert result.instructions == 20_000_000
    assert len(seen) >= 2
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0
    assert all(b - a >= 1.0 for (_, a), (_, b) in zip(seen, seen[1:]))


def test_short_run_reports_nothing(tmp_path):
    machine = _machine(tmp_path)
    seen = []
    machine.run(max_instructions=1000, progress=lambda n, s: seen.append(n))
    assert seen == []


def test_cli_progress_flag_prints_lines_on_stderr(tmp_path, capsys, monkeypatch):
    from cetvm.cli.main import main
    from cetvm.vmm import run_loop

    monkeypatch.setattr(run_loop, "PROGRESS_PERIOD", 0.0)
    image = tmp_path / "spin.elf"
    image.write_bytes(elf64_kernel(JMP_SELF))
    status = main(["boot", str(image), "--memory", "16M", "--max-instructions", "5000000", "--progress"])
    err = capsys.readouterr().err
    assert status == 124
    assert "cetvm: running:" in err and "MIPS" in err
