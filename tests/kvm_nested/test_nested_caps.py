"""Nested VMX capabilities through the KVM API: CPUID.1:ECX.VMX, the IA32_VMX_* MSRs KVM reports
to L1 (IA32_VMX_BASIC[56], the load-CET-state controls with guest SHSTK/IBT), IA32_FEATURE_CONTROL
and KVM_GET_MSR_INDEX_LIST, following kvm_intel's ``nested`` setting [K nested.c
nested_vmx_setup_ctls_msrs, nested_vmx_entry_exit_ctls_update; vmx.c vmx_set_msr]."""

from __future__ import annotations

import pytest

from cetvm.arch.cpuid_bits import FEATURES
from cetvm.arch.msr import VMX_CAPABILITY_MSRS, FeatureControl, Msr
from cetvm.arch.vmx import VmEntryControls, VmExitControls
from cetvm.kvm.api import Kvm
from cetvm.kvm.host import Host

VMX = FEATURES["vmx"]


def vcpu_on(host: Host, *, shstk: bool = True, ibt: bool = True, vmx: bool = True):
    """A vCPU whose CPUID is KVM_GET_SUPPORTED_CPUID with the given features removed."""
    kvm = Kvm(host)
    cpuid = kvm.get_supported_cpuid()
    for name, keep in (("shstk", shstk), ("ibt", ibt), ("vmx", vmx)):
        if not keep:
            cpuid.set_feature(name, False)
    vcpu = kvm.create_vm().create_vcpu()
    vcpu.set_cpuid(cpuid)
    return kvm, vcpu


def msr(vcpu, index: int) -> int | None:
    got = vcpu.get_msrs([index])
    return got[0][1] if got else None


def test_vmx_is_offered_only_with_nested_on_an_intel_host():
    assert Kvm(Host.from_model_name("sapphire-rapids")).get_supported_cpuid().has("vmx")
    assert not Kvm(Host.from_model_name("sapphire-rapids", nested=False)).get_supported_cpuid().has("vmx")
    assert not Kvm(Host.from_model_name("zen4")).get_supported_cpuid().has("vmx")


def test_vmx_capability_msrs_are_in_the_index_list_only_with_nested():
    assert VMX_CAPABILITY_MSRS <= set(Kvm(Host.from_model_name("sapphire-rapids")).get_msr_index_list())
    assert not VMX_CAPABILITY_MSRS & set(Kvm(Host.from_model_name("sapphire-rapids", nested=False)).get_msr_index_list())
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids", nested=False), vmx=False)
    assert msr(vcpu, Msr.IA32_VMX_BASIC) is None


@pytest.mark.parametrize("basic_56", [True, False])
def test_vmx_basic_reports_kvms_vmcs12_and_the_host_bit_56(basic_56):
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids", vmx_basic_56=basic_56))
    basic = msr(vcpu, Msr.IA32_VMX_BASIC)
    assert basic & 0x7FFF_FFFF == 0x11E5_7ED0          # VMCS12_REVISION
    assert (basic >> 32) & 0x1FFF == 4096               # VMCS region size
    assert basic >> 55 & 1                              # TRUE_ control MSRs
    assert bool(basic >> 56 & 1) is basic_56


@pytest.mark.parametrize("shstk,ibt,offered", [(True, True, True), (True, False, True), (False, True, True),
                                               (False, False, False)])
def test_load_cet_controls_follow_the_guest_cpuid(shstk, ibt, offered):
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids"), shstk=shstk, ibt=ibt)
    for index, bit in ((Msr.IA32_VMX_TRUE_ENTRY_CTLS, VmEntryControls.LOAD_CET_STATE),
                       (Msr.IA32_VMX_ENTRY_CTLS, VmEntryControls.LOAD_CET_STATE),
                       (Msr.IA32_VMX_TRUE_EXIT_CTLS, VmExitControls.LOAD_CET_STATE),
                       (Msr.IA32_VMX_EXIT_CTLS, VmExitControls.LOAD_CET_STATE)):
        value = msr(vcpu, index)
        assert bool(value >> 32 & bit) is offered, hex(index)
        assert not value & bit  # never required


def test_no_cet_controls_when_kvm_offers_no_cet():
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids", vmx_load_cet_controls=False))
    assert not msr(vcpu, Msr.IA32_VMX_TRUE_ENTRY_CTLS) >> 32 & VmEntryControls.LOAD_CET_STATE


def test_cr4_fixed_msrs_require_vmxe_and_allow_cet_with_guest_cet():
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids"))
    assert msr(vcpu, Msr.IA32_VMX_CR4_FIXED0) == 1 << 13
    assert msr(vcpu, Msr.IA32_VMX_CR4_FIXED1) & (1 << 23 | 1 << 13) == 1 << 23 | 1 << 13
    _, no_cet = vcpu_on(Host.from_model_name("sapphire-rapids"), shstk=False, ibt=False)
    assert not msr(no_cet, Msr.IA32_VMX_CR4_FIXED1) & 1 << 23
    assert msr(vcpu, Msr.IA32_VMX_CR0_FIXED0) == 0x8000_0021


def test_vmx_msrs_are_read_only_to_userspace_except_restoring_the_same_value():
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids"))
    basic = msr(vcpu, Msr.IA32_VMX_BASIC)
    assert vcpu.set_msrs([(Msr.IA32_VMX_BASIC, basic)]) == 1
    assert vcpu.set_msrs([(Msr.IA32_VMX_BASIC, basic ^ 1)]) == 0


def test_feature_control_vmxon_bits_need_vmx_in_the_guest_cpuid():
    bits = int(FeatureControl.LOCKED | FeatureControl.VMXON_OUTSIDE_SMX)
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids"))
    assert vcpu.set_msrs([(Msr.IA32_FEATURE_CONTROL, bits)]) == 1
    assert msr(vcpu, Msr.IA32_FEATURE_CONTROL) == bits
    _, no_vmx = vcpu_on(Host.from_model_name("sapphire-rapids"), vmx=False)
    assert no_vmx.set_msrs([(Msr.IA32_FEATURE_CONTROL, bits)]) == 0
    assert no_vmx.set_msrs([(Msr.IA32_FEATURE_CONTROL, int(FeatureControl.LOCKED))]) == 1


def test_vmcs_enum_reports_the_highest_field_index():
    _, vcpu = vcpu_on(Host.from_model_name("sapphire-rapids"))
    assert msr(vcpu, Msr.IA32_VMX_VMCS_ENUM) == 0x19 << 1  # TSC_MULTIPLIER (0x2032), index 0x19


def test_cetvm_caps_says_what_nested_cet_offers(capsys):
    import json

    from cetvm.cli.main import main
    assert main(["caps", "--json"]) == 0
    nested = json.loads(capsys.readouterr().out)["nested"]
    assert nested["enabled"] and nested["vmx_basic_56"] and nested["load_cet_controls"]["offered"]
    assert main(["caps", "--json", "--nested", "off"]) == 0
    assert not json.loads(capsys.readouterr().out)["nested"]["enabled"]
    assert main(["caps", "--json", "--host", "zen4"]) == 0
    assert "SVM" in json.loads(capsys.readouterr().out)["nested"]["reason"]
    assert main(["caps", "--vmx-basic-56", "off"]) == 0
    text = capsys.readouterr().out
    assert "load-CET-state entry/exit controls for L1: no" in text
