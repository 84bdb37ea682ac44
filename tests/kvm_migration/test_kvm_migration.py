"""`cetvm migrate-check` and check_migration(): the destination checks of QEMU and KVM 6.18."""

from __future__ import annotations

import json

import pytest

import cetvm.cli.main as cli_main
from cetvm.cpuid import get_model
from cetvm.kvm.caps import kvm_caps_for_host
from cetvm.kvm.host import Host
from cetvm.kvm.migration import Severity, check_migration, guest_xss, restricted_cpuid
from shared_data import dump

CET_MSR_NAMES = ("IA32_U_CET", "IA32_S_CET", "IA32_PL0_SSP", "IA32_PL3_SSP", "IA32_INT_SSP_TAB")


def host(model: str, **settings) -> Host:
    return Host(get_model(model), **settings)


def blocker_whats(report) -> list[str]:
    return [f.what for f in report.findings if f.severity is Severity.BLOCKER]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `cetvm migrate-check ...` through cetvm's real entry point (migrate added if not wired yet)."""
    modules = cli_main.COMMAND_MODULES
    if "migrate" not in modules:
        cli_main.COMMAND_MODULES = modules + ("migrate",)
    try:
        status = cli_main.main(["migrate-check", *argv])
    finally:
        cli_main.COMMAND_MODULES = modules
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- the function
def test_sapphire_rapids_to_emerald_rapids_is_migratable():
    report = check_migration(host("sapphire-rapids"), host("emerald-rapids"))
    assert report.migratable
    assert not report.blockers


@pytest.mark.parametrize("model", ["sapphire-rapids", "ice-lake", "zen4"])
def test_same_host_is_migratable(model):
    report = check_migration(host(model), host(model))
    assert report.migratable and report.findings == ()


def test_sapphire_rapids_to_ice_lake_blocked_by_cet():
    report = check_migration(host("sapphire-rapids"), host("ice-lake"))
    assert not report.migratable
    whats = blocker_whats(report)
    # CET features are reported before any other feature.
    assert whats[:2] == ["CPUID feature SHSTK", "CPUID feature IBT"]
    shstk = report.findings[0]
    assert "CPU lacks CET" in shstk.why
    xss = [w for w in whats if w.startswith("IA32_XSS")]
    assert len(xss) == 1 and "CET_U" in xss[0] and "CET_S" in xss[0]
    msrs = [w for w in whats if w.startswith("MSRs missing")]
    assert len(msrs) == 1 and all(name in msrs[0] for name in CET_MSR_NAMES)
    assert any("SHSTK" in item for item in report.restricted_cpuid_loses)
    assert any("IBT" in item for item in report.restricted_cpuid_loses)
    # Same vendor: giving up what Ice Lake lacks is enough.
    assert report.restricted_cpuid_suffices


def test_restricted_cpuid_drops_cet_state_and_migrates():
    src = kvm_caps_for_host(host("sapphire-rapids"))
    dst = kvm_caps_for_host(host("ice-lake"))
    guest = src.get_supported_cpuid()
    assert guest.has("shstk") and guest_xss(guest) == 0x1800  # CET_U | CET_S (SDM 13.1)
    restricted, loses = restricted_cpuid(guest, dst)
    assert not restricted.has("shstk") and not restricted.has("ibt")
    assert guest_xss(restricted) == 0
    assert check_migration(host("sapphire-rapids"), host("ice-lake"), restricted).migratable


def test_sapphire_rapids_to_zen4_blocked_by_ibt_and_vendor():
    report = check_migration(host("sapphire-rapids"), host("zen4"))
    assert not report.migratable
    whats = blocker_whats(report)
    assert any(w.startswith("CPU vendor") for w in whats)
    assert "CPUID feature IBT" in whats
    assert "CPUID feature SHSTK" not in whats  # KVM on SVM offers shadow stacks
    ibt = next(f for f in report.findings if f.what == "CPUID feature IBT")
    assert "never offers IBT on SVM" in ibt.why
    assert any(item.startswith("IBT") and "SVM" in item for item in report.restricted_cpuid_loses)
    assert not report.restricted_cpuid_suffices  # the vendor cannot be restricted away


def test_ibt_off_on_destination_blocks_only_ibt():
    report = check_migration(host("sapphire-rapids"), host("sapphire-rapids", kernel_cmdline="ibt=off"))
    assert blocker_whats(report) == ["CPUID feature IBT"]
    assert "ibt=off" in report.findings[0].why
    assert [item.split(" ")[0] for item in report.restricted_cpuid_loses] == ["IBT"]
    assert report.restricted_cpuid_suffices


def test_ice_lake_guest_moves_to_sapphire_rapids():
    assert check_migration(host("ice-lake"), host("sapphire-rapids")).migratable


def test_destination_where_kvm_refuses_to_load():
    report = check_migration(host("sapphire-rapids"), host("sapphire-rapids", supervisor_shstk=True))
    assert not report.migratable
    assert "KVM does not load on the destination" in report.findings[0].what


def test_shadow_paging_destination_loses_shstk_and_ibt():
    report = check_migration(host("sapphire-rapids"), host("sapphire-rapids", tdp=False))
    whats = blocker_whats(report)
    assert whats[:2] == ["CPUID feature SHSTK", "CPUID feature IBT"]
    assert "TDP" in report.findings[0].why


# --------------------------------------------------------------------------- the command
def test_cli_migratable_exit_0(capsys):
    status, out, _ = cli(capsys, "--from", "sapphire-rapids", "--to", "emerald-rapids")
    assert status == 0
    assert out.strip().splitlines()[-1].startswith("verdict: MIGRATABLE")


def test_cli_blocked_exit_1_with_table(capsys):
    status, out, _ = cli(capsys, "--from", "sapphire-rapids", "--to", "ice-lake")
    assert status == 1
    assert "blocker   CPUID feature SHSTK" in out
    assert "would make the migration possible" in out
    assert out.strip().splitlines()[-1].startswith("verdict: NOT MIGRATABLE")


def test_cli_json(capsys):
    status, out, _ = cli(capsys, "--from", "sapphire-rapids", "--to", "zen4", "--json")
    doc = json.loads(out)
    assert status == 1
    assert {"from", "to", "migratable", "findings", "restricted_cpuid_loses"} <= set(doc)
    assert doc["from"] == "sapphire-rapids" and doc["to"] == "zen4" and doc["migratable"] is False
    assert all(set(f) == {"severity", "what", "why"} for f in doc["findings"])
    assert any(item.startswith("IBT") for item in doc["restricted_cpuid_loses"])


def test_cli_destination_kernel_cmdline(capsys):
    status, out, _ = cli(capsys, "--from", "sapphire-rapids", "--to", "sapphire-rapids",
                         "--to-kernel-cmdline", "ibt=off", "--json")
    doc = json.loads(out)
    assert status == 1 and [f["what"] for f in doc["findings"]] == ["CPUID feature IBT"]


def test_cli_source_options_apply_to_the_source(capsys):
    # A source without IBT (ibt=off) gives the guest no IBT: nothing is lost on an ibt=off destination.
    status, _, _ = cli(capsys, "--from", "sapphire-rapids", "--from-kernel-cmdline", "ibt=off",
                       "--to", "sapphire-rapids", "--to-kernel-cmdline", "ibt=off")
    assert status == 0


def test_cli_dump_file_source(capsys):
    status, out, _ = cli(capsys, "--from", str(dump("sapphire-rapids.txt")), "--to", "ice-lake")
    assert status == 1 and "CPUID feature SHSTK" in out


@pytest.mark.parametrize("argv", [
    ("--from", "sapphire-rapids", "--to", "no-such-cpu"),
    ("--from", "sapphire-rapids"),
    ("--from", "sapphire-rapids", "--to", "zen4", "--to-tdp", "maybe"),
    ("--from", "sapphire-rapids", "--to", "zen4", "--to-kernel-cmdline", "ibt=sometimes"),
])
def test_cli_bad_input_exit_2_one_line(capsys, argv):
    status, out, err = cli(capsys, *argv)
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("cetvm: error:")
