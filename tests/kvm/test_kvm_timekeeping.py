"""The time math (pvclock scale, TSC <-> ns, CPUID 15H) and KVM's TSC / kvmclock MSR rules through
the KVM-shaped API: host-initiated IA32_TSC writes (kvm_synchronize_tsc's 0 and one-second
matching), KVM_VCPU_TSC_OFFSET, the pvclock structure KVM writes, the PV-feature enforcement,
KVM_GET_MSR_INDEX_LIST, KVM_SET_CLOCK. Guest-visible behaviour is in guests/tests/clocks.c."""

from __future__ import annotations

from fractions import Fraction

import pytest

from cetvm.arch.msr import Msr
from cetvm.arch.timekeeping import (
    PVCLOCK_TSC_STABLE_BIT,
    KvmFeature,
    PvclockTimeInfo,
    TscFrequencyLeaves,
    ns_to_ticks,
    pvclock_scale_delta,
    pvclock_time_scale,
    ticks_to_ns_ceil,
    tsc_hz_from_leaf_15h,
)
from cetvm.cpuid import get_model
from cetvm.kvm.api import Kvm
from cetvm.kvm.state import restore_vcpu_state, save_vcpu_state
from cetvm.kvm.host import Host
from cetvm.kvm.timekeeping import DEFAULT_TSC_KHZ, KVM_PV_FEATURES

TSC = int(Msr.IA32_TIME_STAMP_COUNTER)
SYSTEM_TIME_NEW, WALL_CLOCK_NEW = int(Msr.KVM_SYSTEM_TIME_NEW), int(Msr.KVM_WALL_CLOCK_NEW)
RAM = 0x100000


@pytest.mark.parametrize("hz", [1_000_000_000, 2_000_000_000, 2_100_000_000, 3_193_999_000, 25_000_000,
                                999_999_999, 10_000_000_000])
def test_pvclock_scale_converts_one_second_of_ticks_to_one_second(hz):
    mul, shift = pvclock_time_scale(hz)
    assert 1 << 31 <= mul < 1 << 32  # the fraction is normalised to [0.5, 1)
    exact = Fraction(10**9, hz)
    assert Fraction(mul, 1 << 32) * Fraction(2) ** shift <= exact  # rounded down ...
    assert exact - Fraction(mul, 1 << 32) * Fraction(2) ** shift < Fraction(2) ** shift / (1 << 32)  # ... by < 1 ulp
    one_second = pvclock_scale_delta(hz, mul, shift)
    assert 10**9 - 2 <= one_second <= 10**9


def test_pvclock_scale_of_cetvm_tsc_is_exact():
    mul, shift = pvclock_time_scale(DEFAULT_TSC_KHZ * 1000)
    assert (mul, shift) == (1 << 31, 0)
    assert all(pvclock_scale_delta(2 * ns, mul, shift) == ns for ns in (0, 1, 999, 10**12))


def test_pvclock_rejects_a_zero_rate():
    with pytest.raises(ValueError):
        pvclock_time_scale(0)


def test_tick_conversions_round_the_right_way():
    assert ns_to_ticks(3, 2_500_000) == 7                # 7.5 ticks: the counter has not reached 8
    assert ticks_to_ns_ceil(8, 2_500_000) == 4           # 3.2 ns: the first whole ns with 8 ticks
    assert ns_to_ticks(ticks_to_ns_ceil(8, 2_500_000), 2_500_000) >= 8


def test_cpuid_15h_and_16h_state_the_tsc_rate():
    leaves = TscFrequencyLeaves(2_000_000, crystal_hz=1_000_000_000, bus_mhz=1000)
    eax, ebx, ecx, _ = leaves.leaf_15h()
    assert (eax, ebx, ecx) == (1, 2, 1_000_000_000)
    assert tsc_hz_from_leaf_15h(eax, ebx, ecx) == 2_000_000_000
    assert leaves.leaf_16h() == (2000, 2000, 1000, 0)
    assert tsc_hz_from_leaf_15h(0, 2, 3) is None


def test_pvclock_structure_round_trips_and_reads():
    info = PvclockTimeInfo(4, 1000, 5_000, 1 << 31, 0, PVCLOCK_TSC_STABLE_BIT)
    packed = info.pack()
    assert len(packed) == 32
    assert PvclockTimeInfo.unpack(packed) == info
    assert info.read_ns(3000) == 6_000


# ----------------------------------------------------------------------------- through the API
def vm_with_vcpus(n=1, cpuid_features=int(KVM_PV_FEATURES)):
    kvm = Kvm(Host(cpu=get_model("sapphire-rapids")))
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, RAM, 0x10000)
    now = [0]
    vm.set_host_clock(lambda: now[0], realtime_base_ns=1_000 * 10**9)
    vcpus = []
    for i in range(n):
        vcpu = vm.create_vcpu(i)
        model = kvm.get_supported_cpuid()
        model.set(0x4000_0001, 0, cpuid_features, 0, 0, 0)
        vcpu.set_cpuid(model)
        vcpus.append(vcpu)
    return vm, vcpus, now


def tsc_of(vcpu) -> int:
    return vcpu.get_msrs([TSC])[0][1]


def test_vcpus_created_together_share_one_tsc_that_follows_the_host_clock():
    vm, (a, b), now = vm_with_vcpus(2)
    now[0] = 1_000
    assert tsc_of(a) == tsc_of(b) == 2_000
    assert a.get_tsc_khz() == DEFAULT_TSC_KHZ


def test_host_tsc_write_sets_the_value_then_matches_within_a_second():
    vm, (a, b), now = vm_with_vcpus(2)
    assert a.set_msrs([(TSC, 10**12)]) == 1
    assert tsc_of(a) == 10**12
    now[0] = 500
    assert b.set_msrs([(TSC, 10**12 + 999)]) == 1      # within 1 s of what a's write implies: in sync
    assert tsc_of(b) == tsc_of(a) == 10**12 + 1000
    assert b.set_msrs([(TSC, 5 * 10**12)]) == 1         # far away: exactly that value
    assert tsc_of(b) == 5 * 10**12 and tsc_of(a) == 10**12 + 1000


def test_tsc_offset_attribute_is_exact_and_restores_a_saved_tsc_that_matching_would_lose():
    vm, (a,), now = vm_with_vcpus(1)
    a.set_tsc_offset(12345)
    now[0] = 10
    assert tsc_of(a) == 12365
    assert a.get_tsc_offset() == 12345
    saved = save_vcpu_state(a)
    _, (b,), now_b = vm_with_vcpus(1)
    now_b[0] = 10
    restore_vcpu_state(b, saved)  # IA32_TSC = 12365 alone would be "matched" to offset 0
    assert tsc_of(b) == 12365


def test_kvmclock_system_time_writes_pvclock_with_stable_bit():
    vm, (a,), now = vm_with_vcpus(1)
    now[0] = 7_000
    vm.set_clock(1_000_000)
    assert a.set_msrs([(SYSTEM_TIME_NEW, RAM + 0x40 | 1)]) == 1
    info = PvclockTimeInfo.unpack(vm.get_memory(RAM + 0x40, 32))
    assert info.version % 2 == 0 and info.version > 0
    assert info.flags & PVCLOCK_TSC_STABLE_BIT
    assert info.system_time == 1_000_000 and info.tsc_timestamp == tsc_of(a)
    now[0] = 9_000
    assert info.read_ns(tsc_of(a)) == vm.get_clock() == 1_002_000
    vm.set_clock(0)  # KVM_SET_CLOCK republishes: version moves by 2
    assert PvclockTimeInfo.unpack(vm.get_memory(RAM + 0x40, 32)).version == info.version + 2
    assert a.get_msrs([SYSTEM_TIME_NEW]) == [(SYSTEM_TIME_NEW, RAM + 0x40 | 1)]


def test_kvmclock_structure_across_a_page_boundary_or_outside_ram_is_not_written():
    vm, (a,), now = vm_with_vcpus(1)
    assert a.set_msrs([(SYSTEM_TIME_NEW, RAM + 0xFF0 | 1)]) == 1   # the write succeeds ...
    assert vm.get_memory(RAM + 0xFF0, 16) == bytes(16)              # ... nothing is published
    assert a.set_msrs([(SYSTEM_TIME_NEW, 0x8000_0000 | 1)]) == 1


def test_wall_clock_is_the_real_time_at_kvmclock_zero():
    vm, (a,), now = vm_with_vcpus(1)
    now[0] = 3 * 10**9
    vm.set_clock(5 * 10**9 + 250)
    assert a.set_msrs([(WALL_CLOCK_NEW, RAM + 0x80)]) == 1
    raw = vm.get_memory(RAM + 0x80, 12)
    version, sec, nsec = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    assert version % 2 == 0 and version
    # real time now is 1000 s + 3 s; kvmclock reads 5 s + 250 ns: kvmclock 0 was 998 s - 250 ns
    assert (sec, nsec) == (997, 10**9 - 250)


def test_kvmclock_msrs_need_their_pv_feature_in_the_guest_cpuid():
    vm, (a,), now = vm_with_vcpus(1, cpuid_features=0)
    assert a.set_msrs([(SYSTEM_TIME_NEW, RAM | 1)]) == 0
    assert a.get_msrs([SYSTEM_TIME_NEW]) == []
    vm, (b,), now = vm_with_vcpus(1)
    assert b.set_msrs([(int(Msr.KVM_SYSTEM_TIME), RAM | 1)]) == 0   # CLOCKSOURCE is not advertised
    assert not KVM_PV_FEATURES & KvmFeature.CLOCKSOURCE


def test_msr_index_list_has_the_tsc_and_kvmclock_msrs():
    vm, (a,), now = vm_with_vcpus(1)
    listed = set(a.get_msr_index_list())
    assert {TSC, int(Msr.IA32_TSC_ADJUST), SYSTEM_TIME_NEW, WALL_CLOCK_NEW} <= listed


def test_tsc_adjust_host_write_stores_only_the_value():
    vm, (a,), now = vm_with_vcpus(1)
    before = tsc_of(a)
    assert a.set_msrs([(int(Msr.IA32_TSC_ADJUST), 77)]) == 1
    assert a.get_msrs([int(Msr.IA32_TSC_ADJUST)]) == [(int(Msr.IA32_TSC_ADJUST), 77)]
    assert tsc_of(a) == before


def test_wall_clock_msr_zero_writes_nothing_at_address_zero():
    """A restored machine writes back the MSR it saved, 0 when the guest never used it: KVM
    (kvm_write_wall_clock) writes no structure then — found by the SMP snapshot test, whose AP
    trampoline at 0 was overwritten."""
    kvm = Kvm(Host(cpu=get_model("sapphire-rapids")))
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, 0x10000)
    vm.put_memory(0, b"\xEA" * 16)
    vcpu = vm.create_vcpu(0)
    model = kvm.get_supported_cpuid()
    model.set(0x4000_0001, 0, int(KVM_PV_FEATURES), 0, 0, 0)
    vcpu.set_cpuid(model)
    assert vcpu.set_msrs([(WALL_CLOCK_NEW, 0)]) == 1
    assert vm.get_memory(0, 16) == b"\xEA" * 16
