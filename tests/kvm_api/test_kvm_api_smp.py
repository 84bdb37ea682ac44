"""Several vCPUs per VM: ids, shared RAM, the MP states and INIT/SIPI (kvm_apic_accept_events,
kvm_vcpu_deliver_sipi_vector) [K x86.c, lapic.c; SDM Vol. 3 §9.4.4 (MP initialization)]."""

from __future__ import annotations

import struct

import pytest
from conftest import make_guest

from cetvm.kvm.api import KVM_MAX_VCPUS, KvmExitReason, MpState
from cetvm.kvm.errors import KvmIoctlError

#: Real-mode code: mov $0x1234,%ax; mov %ax,0x500; mov %cs,%bx; mov %bx,0x502; hlt
REAL_MODE_CODE = bytes.fromhex("b83412" "a30005" "8ccb" "891e0205" "f4")


def _start_ap(g, vector: int):
    ap = g.vm.create_vcpu(1)
    g.vm.put_memory(vector << 12, REAL_MODE_CODE)
    ap.set_mp_state(MpState.INIT_RECEIVED)
    assert ap.get_mp_state() is MpState.INIT_RECEIVED
    assert ap.run(immediate_exit=True).exit_reason is KvmExitReason.INTR
    assert ap.get_mp_state() is MpState.INIT_RECEIVED       # an AP waits for SIPI after INIT
    ap.set_mp_state(MpState.SIPI_RECEIVED, sipi_vector=vector)
    assert ap.get_mp_state() is MpState.RUNNABLE
    return ap


def test_vcpu_ids_and_initial_mp_states():
    g = make_guest("cet_msrs")
    with pytest.raises(KvmIoctlError, match="EINVAL"):
        g.vm.create_vcpu(KVM_MAX_VCPUS)
    ap = g.vm.create_vcpu(1)
    with pytest.raises(KvmIoctlError, match="EEXIST"):
        g.vm.create_vcpu(1)
    assert [v.vcpu_id for v in g.vm.vcpus] == [0, 1]
    assert g.vcpu.get_mp_state() is MpState.RUNNABLE
    assert ap.get_mp_state() is MpState.UNINITIALIZED
    before = ap.get_stats()["instructions"]
    run = ap.run(budget=1000)
    assert run.exit_reason is KvmExitReason.INTR and ap.get_stats()["instructions"] == before
    ap.set_mp_state(MpState.SIPI_RECEIVED, sipi_vector=8)   # SIPI before INIT
    ap.set_mp_state(MpState.UNINITIALIZED)
    assert ap.get_mp_state() is MpState.UNINITIALIZED


def test_ram_is_shared_between_vcpus():
    g = make_guest("cet_msrs")
    ap = g.vm.create_vcpu(1)
    g.vcpu.cpu.write_phys(0x600, b"\xAA\xBB")
    assert ap.cpu.read_phys(0x600, 2) == b"\xAA\xBB"
    ap.cpu.write_phys(0x602, b"\xCC")
    assert g.vm.get_memory(0x600, 3) == b"\xAA\xBB\xCC"
    g.vm.set_user_memory_region(1, 0x400000, 0x1000)  # a slot added after the vCPUs
    g.vm.put_memory(0x400000, b"\x11")
    assert ap.cpu.read_phys(0x400000, 1) == b"\x11"


def test_init_sipi_starts_an_ap_in_real_mode_at_vector_times_4k():
    g = make_guest("cet_msrs")
    ap = _start_ap(g, 0x08)
    sregs, regs = ap.get_sregs(), ap.get_regs()
    assert (sregs.cs.selector, sregs.cs.base, regs.rip) == (0x0800, 0x8000, 0)
    assert not sregs.cr0 & 1
    # a second SIPI to a running AP is dropped by the VMM's APIC; KVM_SET_MP_STATE forces it
    ap.set_mp_state(MpState.SIPI_RECEIVED, sipi_vector=0x09)
    assert ap.get_mp_state() is MpState.RUNNABLE  # accepted: (KVM forces wait-for-SIPI first)
    assert ap.get_sregs().cs.base == 0x9000


def test_ap_runs_real_mode_code_from_sipi_vector_0():
    g = make_guest("cet_msrs")
    ap = _start_ap(g, 0)
    assert ap.run(budget=1000).exit_reason is KvmExitReason.HLT
    assert struct.unpack("<HH", g.vm.get_memory(0x500, 4)) == (0x1234, 0)
    assert ap.get_regs().rip == 0xC


def test_ap_runs_real_mode_code_with_a_nonzero_cs_base():
    g = make_guest("cet_msrs")
    ap = _start_ap(g, 0x08)
    assert ap.run(budget=1000).exit_reason is KvmExitReason.HLT
    assert struct.unpack("<HH", g.vm.get_memory(0x500, 4)) == (0x1234, 0x0800)
    assert ap.get_regs().rip == 0xC


def test_init_on_the_bsp_restarts_it_at_the_reset_vector():
    g = make_guest("cet_msrs")
    g.vcpu.set_mp_state(MpState.INIT_RECEIVED)
    g.vcpu.run(immediate_exit=True)
    assert g.vcpu.get_mp_state() is MpState.RUNNABLE
    assert g.vcpu.get_regs().rip == 0xFFF0


def test_set_mp_state_checks_the_sipi_vector():
    g = make_guest("cet_msrs")
    with pytest.raises(KvmIoctlError):
        g.vcpu.set_mp_state(MpState.SIPI_RECEIVED)
    with pytest.raises(KvmIoctlError):
        g.vcpu.set_mp_state(MpState.SIPI_RECEIVED, sipi_vector=256)
    with pytest.raises(KvmIoctlError):
        g.vcpu.set_mp_state(MpState.RUNNABLE, sipi_vector=1)


@pytest.mark.parametrize("cet_path", ["native", "python"])
def test_a_budget_stop_in_real_mode_code_with_a_nonzero_cs_base_leaves_rip_at_the_offset(monkeypatch, cet_path):
    """The block hook (C or Python) stops in front of a block the budget cannot finish: RIP is
    the offset of the next instruction in the code segment, and the run goes on from there."""
    monkeypatch.setenv("CETVM_CET_PATH", cet_path)
    g = make_guest("cet_msrs")
    ap = _start_ap(g, 0x08)
    assert ap.cpu.cet_path == cet_path
    assert ap.run(budget=2).exit_reason is KvmExitReason.INTR
    assert ap.get_regs().rip == 0x6 and g.vm.get_memory(0x500, 2) == b"\x34\x12"
    assert ap.run(budget=1000).exit_reason is KvmExitReason.HLT
    assert struct.unpack("<HH", g.vm.get_memory(0x500, 4)) == (0x1234, 0x0800)
    assert ap.get_regs().rip == 0xC
