"""What KVM offers per host (KVM vmx.c/x86.c rules), through the API and `cetvm caps`."""

from __future__ import annotations

import json

import pytest

from cetvm.cli.main import main
from cetvm.cpuid import get_model, load_cpuid_file
from cetvm.kvm.caps import kvm_caps_for_host
from cetvm.kvm.errors import KvmLoadError
from cetvm.kvm.host import Host

from shared_data import dump  # noqa: E402
CET_MSRS = {0x6A0, 0x6A2, 0x6A4, 0x6A5, 0x6A6, 0x6A7, 0x6A8}


def caps(model: str, **settings):
    return kvm_caps_for_host(Host(get_model(model), **settings))


def offered(c) -> tuple[bool, bool]:
    return c.cet["shstk"].offered, c.cet["ibt"].offered


def test_sapphire_rapids_offers_both_and_cet_xss():
    c = caps("sapphire-rapids")
    assert offered(c) == (True, True)
    assert c.supported_xss == 0x1800
    assert CET_MSRS | {0xDA0} <= set(c.get_msr_index_list())


def test_zen4_svm_offers_shstk_only():
    c = caps("zen4")
    assert c.host.virt == "svm"
    assert offered(c) == (True, False)
    assert {0x6A0, 0x6A2, 0x6A4, 0x6A8} <= set(c.get_msr_index_list())


def test_amd_with_ibt_still_gets_no_ibt():
    cpu = get_model("zen4")
    cpu.set_feature("ibt", True)
    c = kvm_caps_for_host(Host(cpu))
    assert offered(c) == (True, False)
    assert c.cet["ibt"].reason == "SVM: KVM never offers IBT on AMD"


def test_ice_lake_offers_neither():
    c = caps("ice-lake")
    assert offered(c) == (False, False)
    assert c.cet["shstk"].reason.startswith("CPU lacks CET")
    assert c.cet["ibt"].reason.startswith("CPU lacks CET")
    assert c.supported_xss == 0
    assert not (CET_MSRS | {0xDA0}) & set(c.get_msr_index_list())


def test_ibt_off_on_the_host_kernel_hides_ibt():
    c = caps("sapphire-rapids", kernel_cmdline="quiet ibt=off")
    assert offered(c) == (True, False)
    assert "ibt=off" in c.cet["ibt"].reason
    # init's arguments after "--" are not the kernel's
    assert offered(caps("sapphire-rapids", kernel_cmdline="quiet -- ibt=off")) == (True, True)


def test_without_vmx_basic_56_neither():
    c = caps("sapphire-rapids", vmx_basic_56=False)
    assert offered(c) == (False, False)
    assert "IA32_VMX_BASIC[56]" in c.cet["shstk"].reason
    assert c.supported_xss == 0


def test_shadow_paging_clears_shstk_first():
    """kvm_set_cpu_caps clears SHSTK without TDP and keeps IBT; on VMX, vmx_hardware_setup also
    turns unrestricted guest off without EPT, so vmx_set_cpu_caps then clears IBT as well."""
    c = caps("sapphire-rapids", tdp=False)
    assert c.cet["shstk"].reason == "no TDP (shadow paging): SHSTK not supported"
    assert offered(c) == (False, False)
    assert "unrestricted guest" in c.cet["ibt"].reason


@pytest.mark.parametrize("setting,needle", [
    ({"vmx_load_cet_controls": False}, "load-CET-state"),
    ({"unrestricted_guest": False}, "unrestricted guest"),
    ({"allow_smaller_maxphyaddr": True}, "allow_smaller_maxphyaddr"),
])
def test_vmx_and_emulator_rules_clear_both(setting, needle):
    c = caps("sapphire-rapids", **setting)
    assert offered(c) == (False, False)
    assert needle in c.cet["shstk"].reason and needle in c.cet["ibt"].reason


def test_host_xss_without_cet_user_clears_both():
    c = caps("sapphire-rapids", user_shstk=False)
    assert offered(c) == (False, False)
    assert "host XSS lacks CET_U" in c.cet["shstk"].reason
    assert c.supported_xss == 0


def test_supervisor_shadow_stacks_refuse_to_load():
    with pytest.raises(KvmLoadError, match="supervisor shadow stacks"):
        caps("sapphire-rapids", supervisor_shstk=True)


def test_first_failing_rule_wins():
    c = caps("ice-lake", tdp=False, vmx_basic_56=False)
    assert c.cet["shstk"].reason.startswith("CPU lacks CET")


def test_supported_cpuid_leaf_d_matches_the_reference_sizes():
    """SDM Vol. 1 §13.4.3: SPR with XCR0=0x602E7 and XSS=0x1800 → compacted size 0x2A00."""
    c = caps("sapphire-rapids")
    amx = c.get_supported_cpuid(guest_perm=1 << 18)
    assert amx.get(0xD, 0)[0] == 0x602E7
    assert amx.get(0xD, 1)[1] == 0x2A00
    assert amx.get(0xD, 1)[2] == 0x1800
    # Without ARCH_REQ_XCOMP_GUEST_PERM, KVM drops both AMX components.
    plain = c.get_supported_cpuid()
    assert plain.get(0xD, 0)[0] == 0x2E7
    assert not plain.contains(0xD, 17) and not plain.contains(0xD, 18)


def test_supported_cpuid_subleaves_come_from_the_dump():
    model = load_cpuid_file(dump("sapphire-rapids.txt"))
    sup = caps("sapphire-rapids").get_supported_cpuid()
    for n in (2, 5, 6, 7, 9, 11, 12):
        eax, ebx, ecx, _ = model.get(0xD, n)
        assert sup.get(0xD, n) == (eax, ebx, ecx & ~4, 0)
    for n in (8, 10, 13, 14, 15, 16):  # supervisor components KVM does not support
        assert not sup.contains(0xD, n)
    assert sup.get(0xD, 1)[0] == model.get(0xD, 1)[0] & 0x1F


def test_supported_cpuid_never_has_cet_sss_and_follows_caps():
    for model in ("sapphire-rapids", "zen4", "ice-lake"):
        c = caps(model)
        sup = c.get_supported_cpuid()
        assert not sup.has("cet_sss")
        assert (sup.has("shstk"), sup.has("ibt")) == offered(c)
        assert sup.has("hypervisor")


def test_supported_cpuid_from_a_raw_dump_file():
    host = Host(load_cpuid_file(dump("tiger-lake.txt")))
    c = kvm_caps_for_host(host)
    assert offered(c) == (True, True)


# ----------------------------------------------------------------------------- CLI
def run_json(capsys, *argv) -> dict:
    assert main(["caps", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def test_cli_json_sapphire_rapids(capsys):
    doc = run_json(capsys)
    assert doc["host"] == "sapphire-rapids" and doc["vendor"] == "intel"
    assert doc["features"]["shstk"] == {"offered": True, "reason": "offered"}
    assert doc["features"]["ibt"]["offered"] is True
    assert doc["supported_xss"] == 0x1800
    assert doc["guest_xstate_size"]["compacted"] > doc["guest_xstate_size"]["standard"] - 0x1000
    assert CET_MSRS <= set(doc["msr_index_list"])


@pytest.mark.parametrize("argv,expected", [
    (["--host", "zen4"], (True, False)),
    (["--host", "ice-lake"], (False, False)),
    (["--kernel-cmdline", "ibt=off"], (True, False)),
    (["--vmx-basic-56", "off"], (False, False)),
    (["--tdp", "off"], (False, False)),
    (["--no-user-shstk"], (False, False)),
    (["--host", str(dump("zen4-genoa.txt"))], (True, False)),
])
def test_cli_json_decisions(capsys, argv, expected):
    doc = run_json(capsys, *argv)
    assert (doc["features"]["shstk"]["offered"], doc["features"]["ibt"]["offered"]) == expected


def test_cli_arch_capabilities_follow_the_host(capsys):
    """RDCL_NO for a host that is not susceptible to Meltdown, not for Skylake-SP; never IBRS_ALL."""
    spr, skx = run_json(capsys)["arch_capabilities"], run_json(capsys, "--host", "skylake-sp")["arch_capabilities"]
    assert spr & 1 and not skx & 1 and not (spr | skx) & 2
    assert main(["caps"]) == 0 and "IA32_ARCH_CAPABILITIES" in capsys.readouterr().out


def test_cli_table_names_features_and_msrs(capsys):
    assert main(["caps", "--host", "ice-lake"]) == 0
    out = capsys.readouterr().out
    assert "SHSTK" in out and "CPU lacks CET" in out
    assert "IA32_EFER" in out and "IA32_U_CET" not in out


def test_cli_errors_are_one_line(capsys):
    assert main(["caps", "--supervisor-shstk"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refuses to load" in err
    assert main(["caps", "--host", "no-such-cpu"]) == 2
    assert main(["caps", "--kernel-cmdline", "ibt=maybe"]) == 2


@pytest.mark.parametrize("model, virt, module", [("sapphire-rapids", "svm", "kvm_amd"), ("zen4", "vmx", "kvm_intel")])
def test_vendor_module_must_match_the_cpu(model, virt, module):
    from cetvm.cpuid import get_model
    from cetvm.kvm import KvmLoadError

    with pytest.raises(KvmLoadError, match=module):
        kvm_caps_for_host(Host(get_model(model), virt=virt))
