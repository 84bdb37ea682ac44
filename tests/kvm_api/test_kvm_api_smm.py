"""SMM through the KVM API (cetvm.kvm.smm): KVM_SMI, the SMRAM state-save map KVM 6.18 writes
(offsets of KVM's check_smram_offsets(), SSP at SMBASE + 0xFF18), RSM at KVM's #UD intercept,
a bad saved SSP → KVM_EXIT_SHUTDOWN, IA32_SMBASE, INIT latched in SMM, the smi vCPU events and
a vCPU saved in SMM restored in a fresh VM.

The guest: ``nop; nop; hlt`` at 1 MiB in 64-bit mode with CR4.CET, S_CET.SH_STK_EN and an SSP
(no CALL/RET, so the shadow stack itself is never touched); the SMI handler at SMBASE + 0x8000
is ``nop; nop; nop; rsm`` (16-bit code), so a run with budget 1 after KVM_SMI stops inside SMM.
"""

from __future__ import annotations

import json
import struct

import pytest
from conftest import CODE, Guest, build_machine, fresh_copy, long_mode_sregs

from cetvm.arch import KVM_REG_GUEST_SSP_ID, Cr0, Cr4, Msr
from cetvm.cpuid import get_model
from cetvm.kvm.api import Kvm, KvmExitReason, MpState, Regs
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.host import Host
from cetvm.kvm.msr import MsrResult, kvm_guest_get_msr_raw
from cetvm.kvm.smm import SmiEvents
from cetvm.kvm.state import restore_vcpu_state, save_vcpu_state

SMBASE = 0x30000
HANDLER = bytes([0x90, 0x90, 0x90, 0x0F, 0xAA])  # nop; nop; nop; rsm
SSP = 0x7FF8
CET_MSRS = {Msr.IA32_S_CET: 1, Msr.IA32_U_CET: 0x5, Msr.IA32_PL0_SSP: 0x7F00_0000_1000,
            Msr.IA32_PL1_SSP: 0x7F00_0000_2000, Msr.IA32_PL2_SSP: 0x7F00_0000_3000, Msr.IA32_PL3_SSP: 0x7F00_0000_4000}


def smm_guest(shstk: bool = True, smbase: int = SMBASE) -> Guest:
    kvm = Kvm(Host(get_model("sapphire-rapids")))
    vm = kvm.create_vm()
    build_machine(vm)
    vm.put_memory(CODE, bytes([0x90, 0x90, 0xF4]))
    vm.put_memory(smbase + 0x8000, HANDLER)
    vcpu = vm.create_vcpu()
    cpuid = kvm.get_supported_cpuid()
    cpuid.set_feature("shstk", shstk)
    vcpu.set_cpuid(cpuid)
    vcpu.set_sregs(long_mode_sregs(int(Cr4.CET) if shstk else 0))
    vcpu.set_regs(Regs(rip=CODE, rsp=0x80000, rflags=0x2, rax=0x1111, r15=0xF15))
    if shstk:
        assert vcpu.set_msrs([(int(i), v) for i, v in CET_MSRS.items()]) == len(CET_MSRS)
        vcpu.set_one_reg(KVM_REG_GUEST_SSP_ID, SSP)
    return Guest(kvm, vm, vcpu)


def smram(g: Guest, offset: int, size: int = 8, smbase: int = SMBASE) -> int:
    """A field of the state-save map at SMBASE + ``offset``."""
    return int.from_bytes(g.vm.get_memory(smbase + offset, size), "little")


def enter_smm(g: Guest) -> None:
    """KVM_SMI, then one instruction of the handler."""
    g.vcpu.smi()
    run = g.vcpu.run(budget=1)
    assert run.exit_reason is KvmExitReason.INTR
    assert g.vcpu.get_vcpu_events_smi().smm


def test_kvm_smi_enters_smm_with_the_entry_state_of_kvm_enter_smm():
    g = smm_guest()
    g.vcpu.smi()
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents(pending=True)
    g.vcpu.run(budget=1)
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents(smm=True)
    sregs = g.vcpu.get_sregs()
    assert g.vcpu.get_regs().rip == 0x8001  # SMBASE + 0x8000, one NOP run
    assert (sregs.cs.selector, sregs.cs.base, sregs.cs.limit) == (SMBASE >> 4, SMBASE, 0xFFFF_FFFF)
    assert (sregs.ds.base, sregs.ds.limit) == (0, 0xFFFF_FFFF)
    assert sregs.cr4 == 0, "CR4 = 0 in SMM: CET is off"
    assert not sregs.cr0 & (Cr0.PE | Cr0.PG) and sregs.cr0 & Cr0.WP
    assert sregs.efer == 0 and sregs.idt.limit == 0


def test_the_state_save_map_has_kvms_64bit_layout_with_the_ssp_at_ff18():
    g = smm_guest()
    before = g.vcpu.get_sregs()
    enter_smm(g)
    assert smram(g, 0xFF18) == SSP
    assert smram(g, 0xFEFC, 4) == 0x0002_0064 and smram(g, 0xFF00, 4) == SMBASE
    assert (smram(g, 0xFF78), smram(g, 0xFF70)) == (CODE, 0x2)
    assert (smram(g, 0xFF48), smram(g, 0xFF50), smram(g, 0xFF58)) == (before.cr4, before.cr3, before.cr0)
    assert smram(g, 0xFED0) == before.efer
    assert (smram(g, 0xFFF8), smram(g, 0xFF80)) == (0x1111, 0xF15)  # RAX last, R15 first
    assert (smram(g, 0xFE10, 2), smram(g, 0xFE12, 2)) == (8, 0xA09B)  # CS: selector, 64-bit code flags
    assert (smram(g, 0xFE84, 4), smram(g, 0xFE88)) == (before.idt.limit, before.idt.base)


def test_rsm_returns_with_ssp_cet_msrs_and_cr4_as_they_were():
    g = smm_guest()
    before_sregs, before_regs = g.vcpu.get_sregs(), g.vcpu.get_regs()
    enter_smm(g)
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.HLT and run.rip == CODE + 2
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents()
    assert g.vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID) == SSP
    assert dict(g.vcpu.get_msrs([int(i) for i in CET_MSRS])) == {int(i): v for i, v in CET_MSRS.items()}
    after = g.vcpu.get_sregs()
    assert (after.cr0, after.cr3, after.cr4, after.efer, after.cs, after.idt) == \
        (before_sregs.cr0, before_sregs.cr3, before_sregs.cr4, before_sregs.efer, before_sregs.cs, before_sregs.idt)
    assert (g.vcpu.get_regs().rax, g.vcpu.get_regs().r15) == (before_regs.rax, before_regs.r15)


@pytest.mark.parametrize("bad_ssp", [SSP | 2, 0x0080_0000_0000_7FF8], ids=["misaligned", "non-canonical"])
def test_rsm_with_a_bad_saved_ssp_shuts_the_vm_down(bad_ssp):
    g = smm_guest()
    enter_smm(g)
    g.vm.put_memory(SMBASE + 0xFF18, struct.pack("<Q", bad_ssp))  # the handler scribbles on SMRAM
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.SHUTDOWN
    assert "SSP" in run.detail and f"{bad_ssp:#x}" in run.detail
    assert not g.vcpu.get_vcpu_events_smi().smm


def test_without_guest_shstk_the_map_has_no_ssp_and_rsm_ignores_the_field():
    g = smm_guest(shstk=False)
    enter_smm(g)
    assert smram(g, 0xFF18) == 0
    g.vm.put_memory(SMBASE + 0xFF18, struct.pack("<Q", 0x1235))
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT


def test_rsm_outside_smm_is_ud_for_the_guest():
    g = smm_guest(shstk=False)  # (event delivery with S_CET.SH_STK_EN would need a real shadow stack)
    g.vm.put_memory(CODE, bytes([0x0F, 0xAA]))
    g.vm.put_memory(CODE + 0x40, bytes([0xF4]))  # the #UD gate of conftest's IDT: HLT there
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.HLT and run.rip == CODE + 0x40


def test_a_vcpu_saved_in_smm_returns_from_rsm_in_a_fresh_vm():
    g = smm_guest()
    enter_smm(g)
    state = json.loads(json.dumps(save_vcpu_state(g.vcpu)))
    assert state["smi"] == {"smm": True, "pending": False, "smm_inside_nmi": False, "latched_init": False}
    vcpu = fresh_copy(g).vcpu
    restore_vcpu_state(vcpu, state)
    assert vcpu.get_vcpu_events_smi().smm and vcpu.get_regs().rip == 0x8001
    run = vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.HLT and run.rip == CODE + 2
    assert vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID) == SSP and vcpu.get_sregs().cr4 & Cr4.CET


def test_smbase_is_host_only_msr_0x9e_relocates_the_smi_and_survives_init():
    g = smm_guest(smbase=0x50000)
    assert g.vcpu.get_msrs([int(Msr.IA32_SMBASE)]) == [(0x9E, SMBASE)]
    assert 0x9E in g.vcpu.get_msr_index_list()
    result, _ = kvm_guest_get_msr_raw(g.vcpu.state, g.vcpu.msrs, g.vcpu.cpu, int(Msr.IA32_SMBASE))
    assert result is MsrResult.ERROR, "a guest RDMSR of IA32_SMBASE fails (#GP)"
    assert g.vcpu.set_msrs([(int(Msr.IA32_SMBASE), 0x50000)]) == 1
    enter_smm(g)
    assert g.vcpu.get_sregs().cs.base == 0x50000 and smram(g, 0xFF00, 4, smbase=0x50000) == 0x50000
    g.vm.put_memory(0x50000 + 0xFF00, struct.pack("<I", 0x60000))  # the handler relocates SMBASE
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert g.vcpu.get_msrs([0x9E]) == [(0x9E, 0x60000)]
    g.vcpu.set_mp_state(MpState.INIT_RECEIVED)
    g.vcpu.run(immediate_exit=True)
    assert g.vcpu.get_msrs([0x9E]) == [(0x9E, 0x60000)], "INIT keeps SMBASE"
    assert g.vm.create_vcpu(1).get_msrs([0x9E]) == [(0x9E, SMBASE)], "RESET sets 0x30000"


def test_init_in_smm_is_latched_until_rsm():
    g = smm_guest()
    enter_smm(g)
    g.vcpu.set_mp_state(MpState.INIT_RECEIVED)
    assert g.vcpu.get_vcpu_events_smi().latched_init
    assert g.vcpu.get_mp_state() is MpState.RUNNABLE
    g.vcpu.run(budget=2)  # two more NOPs of the handler: still in SMM
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents(smm=True, latched_init=True)
    g.vcpu.run(budget=1)  # RSM: the INIT is taken now
    assert g.vcpu.get_regs().rip == 0xFFF0 and g.vcpu.get_sregs().cs.base == 0xFFFF_0000
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents()


def test_an_smi_in_smm_stays_pending_until_rsm():
    g = smm_guest()
    enter_smm(g)
    g.vcpu.smi()
    g.vcpu.run(budget=3)  # NOP, NOP, RSM
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents(pending=True)
    assert g.vcpu.get_regs().rip == CODE
    g.vcpu.run(budget=1)
    assert g.vcpu.get_vcpu_events_smi() == SmiEvents(smm=True) and g.vcpu.get_regs().rip == 0x8001


def test_set_vcpu_events_smi_refuses_smm_for_a_vcpu_in_init_received():
    g = smm_guest()
    ap = g.vm.create_vcpu(1)
    ap.set_mp_state(MpState.INIT_RECEIVED)
    assert ap.get_mp_state() is MpState.INIT_RECEIVED
    with pytest.raises(KvmInvalidArgument):
        ap.set_vcpu_events_smi(SmiEvents(smm=True))
    with pytest.raises(KvmInvalidArgument):
        g.vcpu.set_vcpu_events_smi(SmiEvents(smm="yes"))  # type: ignore[arg-type]


def test_the_map_saves_the_guests_own_cr0_and_cr4_writes_and_rsm_restores_them():
    """CR0/CR4 bits the guest set itself (CR0.AM, CR4.FSGSBASE: guest-owned, no VM exit) are in
    the map and back after RSM (KVM's kvm_read_cr0/cr4: the values the guest runs with)."""
    g = smm_guest()
    g.vm.put_memory(CODE, bytes([0x0F, 0x20, 0xC0, 0x48, 0x0D, 0x00, 0x00, 0x04, 0x00, 0x0F, 0x22, 0xC0,   # CR0 |= AM
                                 0x0F, 0x20, 0xE0, 0x48, 0x0D, 0x00, 0x00, 0x01, 0x00, 0x0F, 0x22, 0xE0,   # CR4 |= FSGSBASE
                                 0xF4, 0x90, 0x90, 0xF4]))
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    cr0, cr4 = g.vcpu.get_sregs().cr0, g.vcpu.get_sregs().cr4
    assert cr0 & Cr0.AM and cr4 & Cr4.FSGSBASE
    g.vcpu.run(immediate_exit=True)  # the HLT retires (outside the next run's budget)
    enter_smm(g)
    assert (smram(g, 0xFF58), smram(g, 0xFF48)) == (cr0, cr4)
    assert g.vcpu.run(budget=10_000).exit_reason is KvmExitReason.HLT
    assert (g.vcpu.get_sregs().cr0, g.vcpu.get_sregs().cr4) == (cr0, cr4)


@pytest.mark.parametrize("offset,value,why", [
    (0xFF60, 1 << 32, "DR7"),                       # kvm_set_dr: bits 63:32
    (0xFED0, 0x500 | 1 << 20, "EFER"),              # kvm_set_msr(EFER): a reserved bit
    (0xFF48, 0x620 | 1 << 31, "CR4"),               # kvm_set_cr4: a reserved bit
    (0xFF58, 0x8000_0010, "PG without"),            # kvm_set_cr0: PG without PE
    (0xFF48, 0x600 | 1 << 23, "PAE"),               # CR0.PG with EFER.LME and no CR4.PAE
], ids=["dr7", "efer", "cr4", "cr0", "no-pae"])
def test_rsm_refuses_a_map_kvms_setters_refuse_with_a_shutdown(offset, value, why):
    g = smm_guest()
    enter_smm(g)
    g.vm.put_memory(SMBASE + offset, struct.pack("<Q", value))
    run = g.vcpu.run(budget=10_000)
    assert run.exit_reason is KvmExitReason.SHUTDOWN and why in run.detail
