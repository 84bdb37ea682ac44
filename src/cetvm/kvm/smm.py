"""System-management mode as KVM 6.18 emulates it [K smm.c enter_smm / emulator_leave_smm /
rsm_load_state_64, emulate.c em_rsm, x86.c KVM_SMI and the SMM part of KVM_GET/SET_VCPU_EVENTS;
SDM Vol. 3 ch. 32 "System Management Mode"].

What KVM does, and cetvm with it:

- **KVM_SMI** (``process_smi``) makes an SMI pending; it is taken at the next guest entry that
  is not an ``immediate_exit`` run (``kvm_check_and_inject_events``: after a queued exception,
  before interrupts; ``vmx_smi_allowed``: not while already in SMM — an SMI in SMM stays
  pending until RSM).
- **enter_smm**: the 512-byte state-save map :class:`SmramState64` (``struct
  kvm_smram_state_64``, KVM's own layout "based on the AMD64 one", used whenever the guest CPUID
  has long mode) is written at SMBASE + 0xFE00 — GPRs, RIP, RFLAGS, DR6/DR7, CR0/CR3/CR4, EFER,
  the segment caches, GDTR/IDTR/LDTR/TR, SMBASE, the revision 0x00020064, the interrupt shadow
  and, since "KVM: x86: Save and reload SSP to/from SMRAM", the guest SSP at SMBASE + 0xFF18
  when the guest has SHSTK (MSR_KVM_INTERNAL_GUEST_SSP; a failed read requests a triple fault).
  Then HF_SMM is set, NMIs are blocked (HF_SMM_INSIDE_NMI remembers that they already were),
  and the vCPU gets the SMM entry state (:mod:`cetvm.arch.smm`): CR4 = 0, so CET is off in the
  handler; S_CET, U_CET and PL0-3_SSP are not touched (they are MSRs, not part of the map).
- **RSM** is #UD on the hardware that runs the guest; KVM intercepts #UD and emulates it
  (``em_rsm``): outside SMM it injects #UD; inside, ``emulator_leave_smm`` reads the map, leaves
  SMM (HF_SMM and HF_SMM_INSIDE_NMI cleared, NMIs unblocked unless they were blocked before, a
  latched INIT is processed) and ``rsm_load_state_64`` loads it with KVM's own setters, so each
  value passes the checks a guest write would: DR6/DR7 (bits 63:32 clear), EFER through
  kvm_set_msr, CR3/CR4/CR0 in rsm_enter_protected_mode's order (CR3, CR4 without PCIDE, CR0, then
  PCIDE and the PCID), and the SSP through kvm_msr_write(MSR_KVM_INTERNAL_GUEST_SSP) —
  canonical and 4-byte aligned, like every SSP MSR. Any failure makes em_rsm request a triple
  fault: KVM_EXIT_SHUTDOWN.
- **SMBASE**: vcpu->arch.smbase, 0x30000 at RESET (INIT keeps it), reloaded from the map's SMBASE
  field by RSM (SMBASE relocation); IA32_SMBASE (0x9E) is readable and writable by userspace
  only (KVM_GET/SET_MSRS, in KVM_GET_MSR_INDEX_LIST), a guest access is #GP.
- **INIT** is blocked in SMM (kvm_apic_init_sipi_allowed): it stays latched until RSM, a SIPI
  is dropped.
- **KVM_GET/SET_VCPU_EVENTS** carry ``smi``: smm, pending, smm_inside_nmi, latched_init
  (:class:`SmiEvents`), so a vCPU saved in SMM is restored in SMM.

Decisions (cetvm):

- SMRAM is ordinary guest RAM at SMBASE (KVM puts it in the SMM address space, memslots with
  as_id 1, which the VMM fills — QEMU maps TSEG/A-segment there). cetvm's KVM has one address
  space, so SMM code sees the same memory as the rest of the guest, and an SMBASE outside RAM
  fails the entry (KVM: kvm_vm_dead → KVM_EXIT_INTERNAL_ERROR here).
- Only the 64-bit map: a guest CPUID without long mode (KVM's 32-bit map) is refused at the
  SMI with KVM_EXIT_INTERNAL_ERROR.
- The NMI mask is the VMCS's blocking by NMI (:func:`cetvm.kvm.nmi.vmx_get_nmi_mask` /
  :func:`~cetvm.kvm.nmi.vmx_set_nmi_mask`), the one the CPU sets on NMI delivery and IRET
  clears: an NMI made pending in the SMI handler waits for RSM (or for an IRET there, as on
  KVM).
- The interrupt shadow is saved (STI shadow) but not restored (the CPU has no setter); an SMI is
  taken after the exiting instruction retired, when there is no shadow.
- A failed RSM leaves the vCPU out of SMM with the SMM registers (KVM has loaded part of the
  map by then); the VM shuts down either way.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from cetvm.arch import Cr0, Cr4, Msr
from cetvm.arch.msr import Efer
from cetvm.arch.smm import (
    DR7_FIXED_1,
    RFLAGS_FIXED,
    SMBASE_RESET,
    SMM_HANDLER_OFFSET,
    SMRAM_STATE_OFFSET,
    SMRAM_STATE_SIZE,
)
from cetvm.cpu.state import GPR_NAMES, DescriptorTable, Regs, SegAttr, Segment, Sregs
from cetvm.kvm.caps import KvmCaps
from cetvm.kvm.cet_rules import kvm_is_valid_ssp
from cetvm.kvm.cr import cr0_invalid_reason, kvm_is_illegal_gpa, kvm_is_valid_cr4
from cetvm.kvm.msr import MsrResult, guest_maxphyaddr, kvm_get_msr, kvm_set_efer_value, kvm_set_msr
from cetvm.kvm.nmi import vmx_get_nmi_mask, vmx_set_nmi_mask
from cetvm.kvm.vcpu import VcpuArch

#: The revision identifier KVM writes in its 64-bit map (SMBASE + 0xFEFC).
SMM_REVISION_64 = 0x0002_0064
#: KVM_X86_SHADOW_INT_STI, the interrupt-shadow value KVM stores for an STI shadow.
KVM_X86_SHADOW_INT_STI = 2


class HFlag(enum.IntFlag):
    """vcpu->arch.hflags bits for SMM [K kvm_host.h]."""

    SMM = 1 << 1
    SMM_INSIDE_NMI = 1 << 2


@dataclass(frozen=True)
class SmiEvents:
    """kvm_vcpu_events.smi (KVM_VCPUEVENT_VALID_SMM): in SMM, an SMI pending, NMIs were already
    blocked when SMM was entered, an INIT latched while in SMM."""

    smm: bool = False
    pending: bool = False
    smm_inside_nmi: bool = False
    latched_init: bool = False


# --------------------------------------------------------------------------- the map
@dataclass
class SmmSegment:
    """struct kvm_smm_seg_state_64: selector, attributes (the descriptor flags >> 8: type 3:0,
    S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15), limit, base."""

    selector: int = 0
    attributes: int = 0
    limit: int = 0
    base: int = 0

    @classmethod
    def of(cls, seg: Segment) -> "SmmSegment":
        """enter_smm_save_seg_64()."""
        return cls(seg.selector & 0xFFFF, (seg.attributes >> 8) & 0xFFFF, seg.limit & 0xFFFF_FFFF, seg.base)

    def segment(self) -> Segment:
        """rsm_load_seg_64() / rsm_set_desc_flags()."""
        return Segment(self.selector, self.base, self.limit, self.attributes << 8)


_SEGMENT = struct.Struct("<HHIQ")
#: Offsets in the map (from SMBASE + 0xFE00) of KVM's check_smram_offsets().
_SEGMENT_OFFSETS = {"es": 0x00, "cs": 0x10, "ss": 0x20, "ds": 0x30, "fs": 0x40, "gs": 0x50,
                    "gdtr": 0x60, "ldtr": 0x70, "idtr": 0x80, "tr": 0x90}
_U64_OFFSETS = {"efer": 0xD0, "ssp": 0x118, "cr4": 0x148, "cr3": 0x150, "cr0": 0x158, "dr7": 0x160,
                "dr6": 0x168, "rflags": 0x170, "rip": 0x178}
_U32_OFFSETS = {"smm_revision": 0xFC, "smbase": 0x100}
_INT_SHADOW = 0xCB
#: gprs[16] at 0xFF80, "in a reversed natural order": R15 first, RAX at 0xFFF8.
_GPRS = 0x180
#: Where the SSP lives, from SMBASE (KVM's layout; Bochs puts it at 0xFF40).
SMRAM_SSP_OFFSET = SMRAM_STATE_OFFSET + _U64_OFFSETS["ssp"]
SMRAM_SMBASE_OFFSET = SMRAM_STATE_OFFSET + _U32_OFFSETS["smbase"]


@dataclass
class SmramState64:
    """struct kvm_smram_state_64 (the fields KVM writes; I/O restart, auto-HALT restart and the
    svm_* fields stay zero, as in KVM)."""

    es: SmmSegment = field(default_factory=SmmSegment)
    cs: SmmSegment = field(default_factory=SmmSegment)
    ss: SmmSegment = field(default_factory=SmmSegment)
    ds: SmmSegment = field(default_factory=SmmSegment)
    fs: SmmSegment = field(default_factory=SmmSegment)
    gs: SmmSegment = field(default_factory=SmmSegment)
    gdtr: SmmSegment = field(default_factory=SmmSegment)
    ldtr: SmmSegment = field(default_factory=SmmSegment)
    idtr: SmmSegment = field(default_factory=SmmSegment)
    tr: SmmSegment = field(default_factory=SmmSegment)
    int_shadow: int = 0
    efer: int = 0
    smm_revision: int = SMM_REVISION_64
    smbase: int = 0
    ssp: int = 0
    cr4: int = 0
    cr3: int = 0
    cr0: int = 0
    dr7: int = 0
    dr6: int = 0
    rflags: int = 0
    rip: int = 0
    #: RAX..R15 in encoding order (stored reversed in the map).
    gprs: list[int] = field(default_factory=lambda: [0] * 16)

    def pack(self) -> bytes:
        buf = bytearray(SMRAM_STATE_SIZE)
        for name, offset in _SEGMENT_OFFSETS.items():
            seg: SmmSegment = getattr(self, name)
            _SEGMENT.pack_into(buf, offset, seg.selector, seg.attributes, seg.limit, seg.base)
        for name, offset in _U64_OFFSETS.items():
            struct.pack_into("<Q", buf, offset, getattr(self, name))
        for name, offset in _U32_OFFSETS.items():
            struct.pack_into("<I", buf, offset, getattr(self, name))
        buf[_INT_SHADOW] = self.int_shadow & 0xFF
        struct.pack_into("<16Q", buf, _GPRS, *reversed(self.gprs))
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> "SmramState64":
        if len(data) != SMRAM_STATE_SIZE:
            raise ValueError(f"the SMRAM state-save map is {SMRAM_STATE_SIZE} bytes, got {len(data)}")
        values: dict[str, object] = {name: SmmSegment(*_SEGMENT.unpack_from(data, offset))
                                     for name, offset in _SEGMENT_OFFSETS.items()}
        values.update({name: struct.unpack_from("<Q", data, offset)[0] for name, offset in _U64_OFFSETS.items()})
        values.update({name: struct.unpack_from("<I", data, offset)[0] for name, offset in _U32_OFFSETS.items()})
        values["int_shadow"] = data[_INT_SHADOW]
        values["gprs"] = list(reversed(struct.unpack_from("<16Q", data, _GPRS)))
        return cls(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- state
def is_smm(vcpu: VcpuArch) -> bool:
    return bool(vcpu.hflags & HFlag.SMM)


def smm_uses_64bit_map(vcpu: VcpuArch) -> bool:
    """KVM uses the 64-bit map whenever the guest CPUID has long mode (X86_FEATURE_LM)."""
    return vcpu.cpuid.guest_cpuid_has("lm")


def kvm_smm_changed(vcpu: VcpuArch, entering_smm: bool) -> None:
    """kvm_smm_changed(): HF_SMM on entry; both SMM flags cleared on exit (the latched INIT is
    then accepted at the next run, KVM_REQ_EVENT)."""
    if entering_smm:
        vcpu.hflags |= HFlag.SMM
    else:
        vcpu.hflags &= ~int(HFlag.SMM | HFlag.SMM_INSIDE_NMI)


def smi_events(vcpu: VcpuArch, init_latched: bool) -> SmiEvents:
    """KVM_GET_VCPU_EVENTS's smi (latched_init: kvm_lapic_latched_init, an INIT waiting)."""
    return SmiEvents(is_smm(vcpu), vcpu.smi_pending, bool(vcpu.hflags & HFlag.SMM_INSIDE_NMI), init_latched)


def set_smi_events(vcpu: VcpuArch, smi: SmiEvents) -> None:
    """KVM_SET_VCPU_EVENTS with KVM_VCPUEVENT_VALID_SMM (the latched INIT is the caller's)."""
    if smi.smm != is_smm(vcpu):
        kvm_smm_changed(vcpu, smi.smm)
    vcpu.smi_pending = smi.pending
    if smi.smm:
        vmx_set_nmi_mask(vcpu, True)  # NMIs are blocked in SMM
        if smi.smm_inside_nmi:
            vcpu.hflags |= HFlag.SMM_INSIDE_NMI
        else:
            vcpu.hflags &= ~int(HFlag.SMM_INSIDE_NMI)


# --------------------------------------------------------------------------- entering SMM
def guest_ssp(vcpu: VcpuArch) -> int | None:
    """MSR_KVM_INTERNAL_GUEST_SSP read by KVM (host-initiated), None when it fails."""
    result, value = kvm_get_msr(vcpu, Msr.KVM_INTERNAL_GUEST_SSP, host_initiated=True)
    return value if result is MsrResult.OK else None


def enter_smm_save_state_64(vcpu: VcpuArch, cpu) -> tuple[SmramState64, bool]:
    """enter_smm_save_state_64(): the map of the vCPU's state, and whether KVM requests a triple
    fault (the SSP of a SHSTK guest could not be read)."""
    regs, sregs = cpu.get_regs(), cpu.get_sregs()
    state = SmramState64(
        es=SmmSegment.of(sregs.es), cs=SmmSegment.of(sregs.cs), ss=SmmSegment.of(sregs.ss),
        ds=SmmSegment.of(sregs.ds), fs=SmmSegment.of(sregs.fs), gs=SmmSegment.of(sregs.gs),
        gdtr=SmmSegment(limit=sregs.gdt.limit, base=sregs.gdt.base),
        idtr=SmmSegment(limit=sregs.idt.limit, base=sregs.idt.base),
        ldtr=SmmSegment.of(sregs.ldt), tr=SmmSegment.of(sregs.tr),
        int_shadow=KVM_X86_SHADOW_INT_STI if cpu.interrupt_shadow else 0,
        efer=sregs.efer, smbase=vcpu.smbase, cr4=sregs.cr4, cr3=sregs.cr3, cr0=sregs.cr0,
        dr7=cpu.reg("dr7"), dr6=cpu.reg("dr6"), rflags=regs.rflags, rip=regs.rip,
        gprs=[getattr(regs, name) for name in GPR_NAMES])
    triple_fault = False
    if vcpu.cpuid.guest_cpu_cap_has("shstk"):
        ssp = guest_ssp(vcpu)
        triple_fault = ssp is None
        state.ssp = ssp or 0
    return state, triple_fault


#: CS and the data segments in SMM (enter_smm): 4-GiB limit, type 3 (read/write, accessed),
#: S, P, G; D/B and L clear — a real-mode-like state with flat limits.
SMM_SEGMENT_ATTRIBUTES = int(SegAttr.ACCESSED | SegAttr.WRITABLE_READABLE | SegAttr.S | SegAttr.P | SegAttr.G)


def smm_entry_sregs(sregs: Sregs, smbase: int) -> Sregs:
    """The control and segment registers enter_smm() loads [SDM Vol. 3 §32.5.1 Table 32-4]."""
    def data() -> Segment:
        return Segment(0, 0, 0xFFFF_FFFF, SMM_SEGMENT_ATTRIBUTES)

    sregs.cs = Segment((smbase >> 4) & 0xFFFF, smbase, 0xFFFF_FFFF, SMM_SEGMENT_ATTRIBUTES)
    sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss = data(), data(), data(), data(), data()
    sregs.idt = DescriptorTable(0, 0)  # "Undocumented: IDT limit is set to zero on entry to SMM."
    sregs.cr0 &= ~int(Cr0.PE | Cr0.EM | Cr0.TS | Cr0.PG)
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


@dataclass(frozen=True)
class SmmTransition:
    """The outcome of an SMM entry or an RSM for the run loop: ``shutdown`` (KVM_REQ_TRIPLE_FAULT
    → KVM_EXIT_SHUTDOWN), ``dead`` (kvm_vm_dead → KVM_EXIT_INTERNAL_ERROR), ``ud`` (RSM outside
    SMM: #UD injected), with what happened in ``detail``."""

    shutdown: bool = False
    dead: bool = False
    ud: bool = False
    detail: str = ""


def smram_is_ram(cpu, smbase: int) -> bool:
    return cpu.is_ram(smbase + SMRAM_STATE_OFFSET, SMRAM_STATE_SIZE)


def enter_smm(vcpu: VcpuArch, cpu) -> SmmTransition:
    """enter_smm(): save the state-save map, enter SMM, load the SMM entry state."""
    if not smm_uses_64bit_map(vcpu):
        return SmmTransition(dead=True, detail="enter_smm: the guest CPUID lacks long mode and cetvm's KVM "
                                               "implements only the 64-bit SMRAM state-save map")
    state, triple_fault = enter_smm_save_state_64(vcpu, cpu)
    smbase = vcpu.smbase
    if not smram_is_ram(cpu, smbase):
        return SmmTransition(dead=True, detail=f"enter_smm: SMRAM state-save map at {smbase + SMRAM_STATE_OFFSET:#x} "
                                               "is not guest RAM (KVM: kvm_vm_dead)")
    kvm_smm_changed(vcpu, True)
    cpu.write_phys(smbase + SMRAM_STATE_OFFSET, state.pack())
    if vmx_get_nmi_mask(vcpu):
        vcpu.hflags |= HFlag.SMM_INSIDE_NMI
    else:
        vmx_set_nmi_mask(vcpu, True)
    sregs = smm_entry_sregs(cpu.get_sregs(), smbase)
    cpu.set_sregs(sregs)
    vcpu.cr0, vcpu.cr4 = sregs.cr0, sregs.cr4
    cpu.set_reg("rflags", RFLAGS_FIXED)
    cpu.set_reg("rip", SMM_HANDLER_OFFSET)
    cpu.set_reg("dr7", DR7_FIXED_1)
    cpu.flush_translations()  # the handler runs in another mode at addresses the guest may have used
    if triple_fault:
        return SmmTransition(shutdown=True, detail="enter_smm: reading the guest SSP failed")
    return SmmTransition(detail=f"entered SMM at SMBASE {smbase:#x}")


# --------------------------------------------------------------------------- RSM
def kvm_dr_valid(value: int) -> bool:
    """kvm_set_dr() for DR6/DR7: bits 63:32 must be clear (kvm_dr6_valid / kvm_dr7_valid)."""
    return not value >> 32


def rsm_enter_protected_mode_fault(vcpu: VcpuArch, smm_cr0: int, cr0: int, cr3: int, cr4: int,
                                   efer: int) -> str | None:
    """rsm_enter_protected_mode(): CR3 first (with CR4.PCIDE, its PCID bits are set last), CR4
    without PCIDE (checked against the SMM CR0 still loaded), then CR0 (long mode needs CR4.PAE
    and a CS that is not yet 64-bit — emulator_leave_smm loaded a 32-bit one), then PCIDE.
    ``smm_cr0``: CR0 as the SMI handler left it. Why KVM's kvm_set_cr3/cr4/cr0 refuse the saved
    values, or None."""
    maxphyaddr = guest_maxphyaddr(vcpu)
    if kvm_is_illegal_gpa(cr3 & ~0xFFF if cr4 & Cr4.PCIDE else cr3, maxphyaddr):
        return f"CR3 {cr3:#x} beyond MAXPHYADDR ({maxphyaddr} bits)"
    if not kvm_is_valid_cr4(vcpu, cr4):
        return f"CR4 {cr4:#x} sets bits reserved for this guest"
    if cr4 & Cr4.CET and not smm_cr0 & Cr0.WP:
        return "CR4.CET while CR0.WP is clear"
    why = cr0_invalid_reason(cr0)
    if why is not None:
        return why
    if cr0 & Cr0.PG and efer & Efer.LME and not cr4 & Cr4.PAE:
        return "CR0.PG with EFER.LME but without CR4.PAE"
    if not cr0 & Cr0.WP and cr4 & Cr4.CET:
        return "CR0.WP clear while CR4.CET is set"
    if cr4 & Cr4.PCIDE and not (cr0 & Cr0.PG and efer & Efer.LME):
        return "CR4.PCIDE outside long mode"
    return None


def rsm_load_state_64_fault(vcpu: VcpuArch, state: SmramState64, smm_cr0: int) -> str | None:
    """rsm_load_state_64()'s checks in its order (DR6, DR7, EFER, CR3/CR4/CR0, SSP): why KVM
    returns X86EMUL_UNHANDLEABLE, or None."""
    for name in ("dr6", "dr7"):
        if not kvm_dr_valid(getattr(state, name)):
            return f"{name.upper()} {getattr(state, name):#x} sets bits 63:32"
    if kvm_set_efer_value(vcpu, 0, state.efer & ~int(Efer.LMA), paging=False, host_initiated=False) is None:
        return f"EFER {state.efer:#x} refused by kvm_set_msr"
    why = rsm_enter_protected_mode_fault(vcpu, smm_cr0, state.cr0, state.cr3, state.cr4, state.efer)
    if why is not None:
        return why
    if vcpu.cpuid.guest_cpu_cap_has("shstk") and not kvm_is_valid_ssp(state.ssp, False):
        return f"saved SSP {state.ssp:#x} is not canonical and 4-byte aligned (kvm_msr_write of the guest SSP)"
    return None


def rsm_sregs(state: SmramState64, cr2: int) -> Sregs:
    """The registers rsm_load_state_64() loads (LMA follows from LME and CR0.PG)."""
    return Sregs(es=state.es.segment(), cs=state.cs.segment(), ss=state.ss.segment(), ds=state.ds.segment(),
                 fs=state.fs.segment(), gs=state.gs.segment(), tr=state.tr.segment(), ldt=state.ldtr.segment(),
                 gdt=DescriptorTable(state.gdtr.base, state.gdtr.limit & 0xFFFF),
                 idt=DescriptorTable(state.idtr.base, state.idtr.limit & 0xFFFF),
                 cr0=state.cr0, cr2=cr2, cr3=state.cr3, cr4=state.cr4, efer=state.efer & ~int(Efer.LMA))


def emulator_leave_smm(vcpu: VcpuArch, cpu) -> SmmTransition:
    """emulator_leave_smm() + rsm_load_state_64(); a failure is a triple fault (em_rsm)."""
    smbase = vcpu.smbase
    if not smram_is_ram(cpu, smbase):
        kvm_smm_changed(vcpu, False)
        return SmmTransition(shutdown=True, detail=f"RSM: SMRAM at {smbase:#x} is not guest RAM")
    state = SmramState64.unpack(cpu.read_phys(smbase + SMRAM_STATE_OFFSET, SMRAM_STATE_SIZE))
    if not vcpu.hflags & HFlag.SMM_INSIDE_NMI:
        vmx_set_nmi_mask(vcpu, False)
    kvm_smm_changed(vcpu, False)
    smm_sregs = cpu.get_sregs()
    why = rsm_load_state_64_fault(vcpu, state, smm_sregs.cr0)
    if why is not None:
        return SmmTransition(shutdown=True, detail=f"RSM failed (rsm_load_state_64): {why}")
    vcpu.smbase = state.smbase
    if vcpu.cpuid.guest_cpu_cap_has("shstk"):  # the VM entry loads it from GUEST_SSP
        kvm_set_msr(vcpu, Msr.KVM_INTERNAL_GUEST_SSP, state.ssp, host_initiated=True)
    sregs = rsm_sregs(state, smm_sregs.cr2)
    cpu.set_sregs(sregs)
    vcpu.cr0, vcpu.cr4 = sregs.cr0, sregs.cr4
    regs = Regs(**dict(zip(GPR_NAMES, state.gprs)), rip=state.rip, rflags=state.rflags | RFLAGS_FIXED)
    cpu.set_regs(regs)
    cpu.set_reg("dr6", state.dr6)
    cpu.set_reg("dr7", state.dr7)
    cpu.flush_translations()
    return SmmTransition(detail=f"RSM to {state.rip:#x}")


def em_rsm(vcpu: VcpuArch, cpu) -> SmmTransition:
    """em_rsm(): #UD outside SMM; otherwise leave SMM (failure → triple fault)."""
    if not is_smm(vcpu):
        return SmmTransition(ud=True, detail="RSM outside SMM")
    return emulator_leave_smm(vcpu, cpu)


def kvm_smm_reset(vcpu: VcpuArch, init_event: bool) -> None:
    """kvm_vcpu_reset(): hflags and the pending SMI cleared on RESET and INIT (the NMI state:
    :func:`cetvm.kvm.nmi.kvm_nmi_reset`); SMBASE = 0x30000 on RESET only."""
    vcpu.hflags = 0
    vcpu.smi_pending = False
    vcpu.smi_count = 0
    if not init_event:
        vcpu.smbase = SMBASE_RESET


def smi_allowed(vcpu: VcpuArch) -> bool:
    """vmx_smi_allowed(): not while in SMM."""
    return not is_smm(vcpu)


# --------------------------------------------------------------------------- capabilities
@dataclass(frozen=True)
class SmmCaps:
    """What the modeled KVM offers for SMM: KVM_CHECK_EXTENSION(KVM_CAP_X86_SMM) (CONFIG_KVM_SMM
    and the vendor module's has_emulated_msr(MSR_IA32_SMBASE): VMX and SVM without SEV-ES),
    and whether the guest SSP goes to SMRAM (guests with SHSTK, which KVM offers or not)."""

    supported: bool
    ssp_in_smram: bool
    why: str

    def to_json(self) -> dict[str, object]:
        return {"supported": self.supported, "ssp_in_smram": self.ssp_in_smram, "why": self.why}


def kvm_smm_caps(caps: KvmCaps) -> SmmCaps:
    """KVM_CAP_X86_SMM and the SSP rule for ``caps``'s host."""
    layout = (f"KVM_SMI; KVM's 64-bit state-save map at SMBASE+0x{SMRAM_STATE_OFFSET:X} (SMBASE "
              "0x30000 at RESET, relocatable); RSM emulated at KVM's #UD intercept")
    if caps.has("shstk"):
        why = (f"{layout}; the guest SSP is saved at SMBASE+0x{SMRAM_SSP_OFFSET:X} and reloaded by RSM "
               "(a saved SSP that is not canonical and 4-byte aligned fails RSM: shutdown); CR4 = 0 in SMM, "
               "so CET is off in the SMI handler")
        return SmmCaps(True, True, why)
    return SmmCaps(True, False, f"{layout}; no SSP in SMRAM: SHSTK is not offered to guests")
