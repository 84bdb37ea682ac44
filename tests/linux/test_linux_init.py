"""The guest's /init and command lines (cetvm.linux.init_script) and the parser of what the
guest prints (cetvm.linux.results)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from cetvm.linux import Outcome, kernel_cmdline, parse_console, parse_program_output
from cetvm.linux.init_script import INIT_PREFIX, InitOptions, init_script


@pytest.mark.parametrize("shell", ["sh", "bash", "dash"])
def test_init_is_valid_shell(tmp_path, shell):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    script = tmp_path / "init"
    script.write_text(init_script())
    proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_init_defaults_are_baked_in_and_no_placeholder_is_left():
    text = init_script(InitOptions(tests="shstk_rop", timeout=42))
    assert "tests=shstk_rop\n" in text and "limit=42\n" in text
    assert "@" not in text.replace("$@", "")
    assert text.rstrip().endswith("$finish -f") and "finish=poweroff\n" in text


def test_cmdlines():
    assert kernel_cmdline() == "console=ttyS0 panic=-1 cetvm.tests=all"
    assert kernel_cmdline(["a", "b"], "shell", 30, "quiet") == \
        "console=ttyS0 panic=-1 cetvm.tests=a,b cetvm.mode=shell cetvm.timeout=30 quiet"
    assert kernel_cmdline([]) .endswith("cetvm.tests=none")
    for bad in (["a b"], ["../x"], ["a,b"], [""]):
        with pytest.raises(ValueError, match="bad test program name"):
            kernel_cmdline(bad)
    with pytest.raises(ValueError, match="unknown mode"):
        kernel_cmdline("all", "debug")
    assert kernel_cmdline(finish="reboot").endswith("cetvm.exit=reboot")
    with pytest.raises(ValueError, match="unknown exit"):
        kernel_cmdline(finish="explode")


P = INIT_PREFIX
CONSOLE = f"""\
[    0.000000] Linux version 6.12.113+deb12-cloud-amd64
{P} start kernel=6.12.113+deb12-cloud-amd64 mode=test tests=all timeout=300\r
{P} dmesg: [    0.123456] CET detected: Indirect Branch Tracking enabled\r
{P} cpuflag user_shstk yes
{P} cpuflag ibt yes
{P} cpuflag shstk no
{P} tests shstk_rop shstk_map test_shadow_stack_64 shstk_hang
{P} run shstk_rop
1..3
ok 1 - blocked
[   12.000001] shstk_rop[77]: control protection ip:401a2b sp:7ffd ssp:7fff error:1(near ret)
not ok 2 - gadget reached
ok 3 - skipped thing # SKIP no WRSS
{P} exit shstk_rop 1
{P} run shstk_map
1..0 # SKIP shadow stack not supported (arch_prctl(ARCH_SHSTK_ENABLE): Operation not supported)
{P} exit shstk_map 0
{P} run test_shadow_stack_64
[INFO]\tstarting
[OK]\tShadow stack pivot
[FAIL]\tGuard gap test
{P} exit test_shadow_stack_64 1
{P} run shstk_hang
ok 1 - first
"""


def test_console_is_parsed_into_programs_and_checks():
    report = parse_console(CONSOLE.encode())
    assert report.started and not report.finished
    assert report.kernel == "6.12.113+deb12-cloud-amd64" and report.options["timeout"] == "300"
    assert report.ibt_enabled and report.cpu_flags == {"user_shstk": True, "ibt": True, "shstk": False}
    rop = report.program("shstk_rop")
    assert [c.outcome for c in rop.checks] == [Outcome.PASS, Outcome.FAIL, Outcome.SKIP]
    assert rop.checks[2].reason == "no WRSS" and rop.status == 1 and rop.outcome is Outcome.FAIL
    assert not any("control protection" in line for line in rop.output), "kernel messages are not program output"
    assert report.program("shstk_map").outcome is Outcome.SKIP
    selftest = report.program("test_shadow_stack_64")
    assert [c.what for c in selftest.failures()] == ["Guard gap test"] and selftest.outcome is Outcome.FAIL
    hang = report.program("shstk_hang")
    assert hang.status is None and hang.outcome is Outcome.FAIL
    assert not report.all_passed
    assert "did not reach 'done'" in report.summary()


def test_a_clean_run_passes():
    text = "\n".join([f"{P} start kernel=k", f"{P} tests a b", f"{P} run a", "1..1", "ok 1 - x", f"{P} exit a 0",
                      f"{P} run b", "[SKIP]\tCould not enable Shadow stack", f"{P} exit b 1", f"{P} done"])
    report = parse_console(text)
    assert report.all_passed and report.finished
    assert [p.outcome for p in report.programs] == [Outcome.PASS, Outcome.SKIP]
    assert not report.ibt_enabled


def test_a_missing_program_or_short_plan_is_a_failure():
    text = "\n".join([f"{P} tests a b", f"{P} run a", "1..2", "ok 1 - only one", f"{P} exit a 0", f"{P} done"])
    report = parse_console(text)
    assert report.program("a").outcome is Outcome.FAIL
    assert not report.all_passed  # b never ran


def test_program_output_parsing_and_signals():
    run = parse_program_output("t", "1..1\nok 1 - fine\n", 139)
    assert run.outcome is Outcome.FAIL and run.signal == 11
    assert parse_program_output("t", "1..1\nok 1 - fine\n", 0).outcome is Outcome.PASS
    assert parse_program_output("t", "", 0).outcome is Outcome.FAIL
