"""The host FPU framework model: guest-only CET_KERNEL and guest permission requests."""

from __future__ import annotations

import pytest

from cetvm import InputError
from cetvm.cpuid import get_model
from cetvm.xstate import HostFpu, XsaveLayout

CET_U, CET_S, AMX = 1 << 11, 1 << 12, (1 << 17) | (1 << 18)


@pytest.fixture(scope="module")
def spr() -> HostFpu:
    return HostFpu.from_host(get_model("sapphire-rapids"), user_shstk=True)


def test_cet_kernel_is_guest_only(spr):
    assert spr.guest_default_cfg.features & CET_S
    assert not spr.kernel_cfg.features & CET_S
    assert spr.kernel_cfg.features & CET_U and spr.guest_default_cfg.features & CET_U
    assert spr.features_guest_only == CET_S
    assert spr.features_supervisor & CET_U and not spr.features_supervisor & CET_S
    assert spr.xss & (CET_U | CET_S) == CET_U | CET_S


def test_no_unsupported_supervisor_state(spr):
    # PT, HDC, UINTR, Arch LBR are enumerated by SPR but never enabled by Linux
    assert spr.xss & ((1 << 8) | (1 << 13) | (1 << 14) | (1 << 15)) == 0


def test_dynamic_amx_excluded_from_defaults(spr):
    assert spr.features_user & AMX == AMX
    for cfg in (spr.kernel_cfg, spr.user_cfg, spr.guest_default_cfg):
        assert not cfg.features & (1 << 18)


def test_sizes_are_compacted_for_kernel_and_standard_for_user(spr):
    layout = XsaveLayout.from_cpuid(get_model("sapphire-rapids"))
    cfg = spr.guest_default_cfg
    assert cfg.size == layout.compacted_size(cfg.features)
    assert cfg.user_size == layout.standard_size(cfg.user_features)
    assert spr.user_cfg.size == spr.user_cfg.user_size == cfg.user_size


def test_guest_size_grows_by_cet_s_on_tiger_lake():
    tgl = HostFpu.from_host(get_model("tiger-lake"), user_shstk=True)
    assert tgl.guest_default_cfg.size - tgl.kernel_cfg.size == 24


def test_guest_perm_request_keeps_cet_space(spr):
    layout = XsaveLayout.from_cpuid(get_model("sapphire-rapids"))
    cfg = spr.guest_perm_request(AMX)
    assert cfg.features & (CET_U | CET_S | AMX) == CET_U | CET_S | AMX
    assert cfg.size == layout.compacted_size(cfg.features)
    assert cfg.size >= layout.compacted_offset(12, cfg.features) + 24
    assert cfg.user_features & AMX == AMX and not cfg.user_features & (CET_U | CET_S)
    # The v6 patch under review computed permitted (user features only) | requested | the
    # guest-only supervisor features, which drops CET_USER from the guest buffer.
    v6_mask = spr.default_user_features | AMX | spr.features_guest_only
    assert not v6_mask & CET_U and cfg.features & CET_U


def test_user_shstk_off_drops_cet_user_only():
    fpu = HostFpu.from_host(get_model("sapphire-rapids"), user_shstk=False)
    assert not fpu.kernel_cfg.features & CET_U and not fpu.guest_default_cfg.features & CET_U
    assert fpu.guest_default_cfg.features & CET_S


def test_cpus_without_cet_or_amx():
    icl = HostFpu.from_host(get_model("ice-lake"), user_shstk=True)
    assert icl.xss & (CET_U | CET_S) == 0
    assert icl.guest_default_cfg == icl.kernel_cfg
    zen4 = HostFpu.from_host(get_model("zen4"), user_shstk=True)
    assert zen4.guest_default_cfg.features & CET_S
    with pytest.raises(InputError, match="not supported"):
        zen4.guest_perm_request(AMX)
