"""MSR indices and the CET MSR bit layouts [SDM Vol. 4]."""

from __future__ import annotations

import enum

from cetvm.arch.regs import is_canonical


class Msr(enum.IntEnum):
    """Model-specific register indices used by cetvm."""

    IA32_TIME_STAMP_COUNTER = 0x10
    IA32_APIC_BASE = 0x1B
    IA32_FEATURE_CONTROL = 0x3A
    IA32_TSC_ADJUST = 0x3B
    #: IA32_BIOS_UPDT_TRIG in the SDM; Linux's MSR_IA32_UCODE_WRITE.
    IA32_UCODE_WRITE = 0x79
    #: IA32_BIOS_SIGN_ID in the SDM; Linux's MSR_IA32_UCODE_REV.
    IA32_UCODE_REV = 0x8B
    #: The SMRAM base (host-initiated access only in KVM: MSR_IA32_SMBASE) [SDM Vol. 3 §32.11].
    IA32_SMBASE = 0x9E
    IA32_SMM_MONITOR_CTL = 0x9B
    #: Speculative-execution properties of the processor [SDM Vol. 4 Table 2-2].
    IA32_ARCH_CAPABILITIES = 0x10A
    IA32_SYSENTER_CS = 0x174
    IA32_SYSENTER_ESP = 0x175
    IA32_SYSENTER_EIP = 0x176
    IA32_MISC_ENABLE = 0x1A0
    IA32_DEBUGCTL = 0x1D9
    IA32_PAT = 0x277
    IA32_VMX_BASIC = 0x480
    IA32_VMX_PINBASED_CTLS = 0x481
    IA32_VMX_PROCBASED_CTLS = 0x482
    IA32_VMX_EXIT_CTLS = 0x483
    IA32_VMX_ENTRY_CTLS = 0x484
    IA32_VMX_MISC = 0x485
    IA32_VMX_CR0_FIXED0 = 0x486
    IA32_VMX_CR0_FIXED1 = 0x487
    IA32_VMX_CR4_FIXED0 = 0x488
    IA32_VMX_CR4_FIXED1 = 0x489
    IA32_VMX_VMCS_ENUM = 0x48A
    IA32_VMX_PROCBASED_CTLS2 = 0x48B
    IA32_VMX_EPT_VPID_CAP = 0x48C
    IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
    IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
    IA32_VMX_TRUE_EXIT_CTLS = 0x48F
    IA32_VMX_TRUE_ENTRY_CTLS = 0x490
    IA32_VMX_VMFUNC = 0x491
    IA32_U_CET = 0x6A0
    IA32_S_CET = 0x6A2
    IA32_PL0_SSP = 0x6A4
    IA32_PL1_SSP = 0x6A5
    IA32_PL2_SSP = 0x6A6
    IA32_PL3_SSP = 0x6A7
    IA32_INT_SSP_TAB = 0x6A8
    IA32_TSC_DEADLINE = 0x6E0
    IA32_X2APIC_BASE = 0x800
    IA32_XSS = 0xDA0
    IA32_EFER = 0xC0000080
    IA32_STAR = 0xC0000081
    IA32_LSTAR = 0xC0000082
    IA32_CSTAR = 0xC0000083
    IA32_FMASK = 0xC0000084
    IA32_FS_BASE = 0xC0000100
    IA32_GS_BASE = 0xC0000101
    IA32_KERNEL_GS_BASE = 0xC0000102
    IA32_TSC_AUX = 0xC0000103
    #: kvmclock's MSRs (KVM's paravirtual clock; Documentation/virt/kvm/x86/msr.rst): the
    #: legacy pair and the "_NEW" pair advertised by KVM_FEATURE_CLOCKSOURCE / CLOCKSOURCE2.
    KVM_WALL_CLOCK = 0x11
    KVM_SYSTEM_TIME = 0x12
    KVM_WALL_CLOCK_NEW = 0x4B564D00
    KVM_SYSTEM_TIME_NEW = 0x4B564D01
    #: KVM's synthetic MSR for the guest SSP (host-initiated access only) [K].
    KVM_INTERNAL_GUEST_SSP = 0x4B564DFF


class DebugCtl(enum.IntFlag):
    """IA32_DEBUGCTL bits [SDM Vol. 3 §19.4.1 Figure 19-3, §17.3.3 (bus-lock detection)]."""

    LBR = 1 << 0
    BTF = 1 << 1
    BUS_LOCK_DETECT = 1 << 2
    FREEZE_LBRS_ON_PMI = 1 << 11
    RTM_DEBUG = 1 << 15


class ArchCapabilities(enum.IntFlag):
    """IA32_ARCH_CAPABILITIES bits [SDM Vol. 4 Table 2-2; Intel's affected-processor guidance]."""

    RDCL_NO = 1 << 0                 # not susceptible to Rogue Data Cache Load (Meltdown)
    IBRS_ALL = 1 << 1                # enhanced IBRS
    RSBA = 1 << 2
    SKIP_L1DFL_VMENTRY = 1 << 3      # a VMM need not flush L1D on VM entry
    SSB_NO = 1 << 4                  # not susceptible to Speculative Store Bypass
    MDS_NO = 1 << 5                  # not susceptible to Microarchitectural Data Sampling
    IF_PSCHANGE_MC_NO = 1 << 6       # no machine check on an instruction-fetch page-size change
    TSX_CTRL = 1 << 7
    TAA_NO = 1 << 8                  # not susceptible to TSX Asynchronous Abort
    SBDR_SSDP_NO = 1 << 13
    FBSDP_NO = 1 << 14
    PSDP_NO = 1 << 15
    FB_CLEAR = 1 << 17
    GDS_NO = 1 << 26
    RFDS_NO = 1 << 27


class MiscEnable(enum.IntFlag):
    """IA32_MISC_ENABLE bits [SDM Vol. 4 Table 2-2]."""

    FAST_STRING = 1 << 0
    BTS_UNAVAILABLE = 1 << 11
    PEBS_UNAVAILABLE = 1 << 12


#: The CET MSRs, in index order.
CET_MSRS: tuple[Msr, ...] = (
    Msr.IA32_U_CET,
    Msr.IA32_S_CET,
    Msr.IA32_PL0_SSP,
    Msr.IA32_PL1_SSP,
    Msr.IA32_PL2_SSP,
    Msr.IA32_PL3_SSP,
    Msr.IA32_INT_SSP_TAB,
)

#: The CET MSR indices as a set of plain ints (membership tests on hot paths).
CET_MSR_SET: frozenset[int] = frozenset(int(m) for m in CET_MSRS)
#: The two CET control MSRs (IA32_U_CET, IA32_S_CET).
CET_CTL_MSRS: tuple[Msr, ...] = (Msr.IA32_U_CET, Msr.IA32_S_CET)

#: PLn_SSP MSR for privilege level n.
PL_SSP_MSRS: tuple[Msr, ...] = (Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP, Msr.IA32_PL2_SSP, Msr.IA32_PL3_SSP)


#: The MSRs that hold a shadow-stack pointer: PL0-3_SSP and the interrupt SSP table address.
SSP_MSRS: tuple[Msr, ...] = (*PL_SSP_MSRS, Msr.IA32_INT_SSP_TAB)


def pl_ssp_msr(cpl: int) -> Msr:
    """The IA32_PLn_SSP MSR that holds the shadow-stack pointer of privilege level ``cpl``."""
    return PL_SSP_MSRS[cpl]


class CetCtl(enum.IntFlag):
    """Bits of IA32_U_CET / IA32_S_CET [SDM Vol. 4 Table 2-2]."""

    SH_STK_EN = 1 << 0
    WR_SHSTK_EN = 1 << 1
    ENDBR_EN = 1 << 2
    LEG_IW_EN = 1 << 3
    NO_TRACK_EN = 1 << 4
    SUPPRESS_DIS = 1 << 5
    SUPPRESS = 1 << 10
    TRACKER = 1 << 11  # WAIT_FOR_ENDBRANCH


#: Bits 9:6 of U_CET/S_CET are reserved.
CET_CTL_RESERVED = 0x3C0
#: Bits 63:12 hold EB_LEG_BITMAP_BASE.
CET_LEG_BITMAP_BASE_MASK = ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF
#: SSP values (PLn_SSP, the guest SSP) must be 4-byte aligned: bits 1:0 clear.
SSP_ALIGNMENT_BITS = 0x3
#: Shadow-stack control bits (1:0).
CET_SHSTK_BITS = CetCtl.SH_STK_EN | CetCtl.WR_SHSTK_EN
#: IBT control bits 5:2 (bits 63:10 are IBT state/bitmap base too, see kvm_is_valid_u_s_cet).
CET_IBT_CTL_BITS = CetCtl.ENDBR_EN | CetCtl.LEG_IW_EN | CetCtl.NO_TRACK_EN | CetCtl.SUPPRESS_DIS


class Efer(enum.IntFlag):
    """IA32_EFER bits."""

    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10
    NXE = 1 << 11


#: EFER bits an Intel CPU defines (SCE, LME, LMA, NXE); every other bit is reserved (#GP on
#: WRMSR) [SDM Vol. 4 Table 2-2, IA32_EFER].
EFER_DEFINED_INTEL = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE)

#: IA32_VMX_BASIC bit 56: VM entry may inject a hardware exception with or without an error code,
#: regardless of the vector (needed to inject #CP with its error code) [SDM Vol. 3 A.1].
VMX_BASIC_NO_HW_ERRCODE_CHECK = 1 << 56

#: The VMX capability MSRs IA32_VMX_BASIC .. IA32_VMX_VMFUNC [SDM Vol. 3 App. A].
VMX_CAPABILITY_MSRS: frozenset[int] = frozenset(range(Msr.IA32_VMX_BASIC, Msr.IA32_VMX_VMFUNC + 1))


class FeatureControl(enum.IntFlag):
    """IA32_FEATURE_CONTROL bits [SDM Vol. 4 Table 2-2; SDM Vol. 3 §24.7]."""

    LOCKED = 1 << 0
    VMXON_INSIDE_SMX = 1 << 1
    VMXON_OUTSIDE_SMX = 1 << 2


def cet_ctl_fault(name: str, value: int, va_bits: int = 48) -> str | None:
    """Why ``value`` is no valid IA32_U_CET / IA32_S_CET value, or None [SDM Vol. 4 Table 2-2,
    WRMSR; SDM Vol. 1 §13.5.6 XRSTORS of CET_U; SDM Vol. 3 §28.3.1.1 GUEST_S_CET].

    Reserved bits 9:6; SUPPRESS (10) together with TRACKER (11); EB_LEG_BITMAP_BASE (63:12)
    not canonical. The CPUID-dependent reservations (bits 1:0 without SHSTK, the IBT bits
    without IBT) are the caller's, which knows the processor's features.
    """
    if value & CET_CTL_RESERVED:
        return f"{name} 0x{value:x} sets reserved bits 9:6"
    both = CetCtl.SUPPRESS | CetCtl.TRACKER
    if value & both == both:
        return f"{name} 0x{value:x} sets SUPPRESS and TRACKER together"
    if not is_canonical(value & CET_LEG_BITMAP_BASE_MASK, va_bits):
        return f"{name} 0x{value:x}: legacy bitmap base is not canonical"
    return None


def ssp_fault(name: str, value: int, va_bits: int = 48) -> str | None:
    """Why ``value`` is no valid shadow-stack pointer (IA32_PLn_SSP, GUEST_SSP), or None:
    canonical, bits 1:0 clear [SDM Vol. 4 Table 2-2; SDM Vol. 3 §28.3.1.1]."""
    if not is_canonical(value, va_bits):
        return f"{name} 0x{value:x} is not canonical"
    if value & SSP_ALIGNMENT_BITS:
        return f"{name} 0x{value:x} is not 4-byte aligned (bits 1:0 set)"
    return None


def ssp_table_fault(name: str, value: int, va_bits: int = 48) -> str | None:
    """Why ``value`` is no valid IA32_INTERRUPT_SSP_TABLE_ADDR / GUEST_INTR_SSP_TABLE, or None:
    canonical [SDM Vol. 4 Table 2-2; SDM Vol. 3 §28.3.1.1]."""
    if not is_canonical(value, va_bits):
        return f"{name} 0x{value:x} is not canonical"
    return None


def cet_msr_value_fault(index: int, value: int, va_bits: int = 48) -> str | None:
    """The architectural value check of a CET MSR write (WRMSR #GP(0), XRSTORS #GP(0)), or None
    when ``index`` is no CET MSR or the value is valid."""
    name = Msr(index).name if index in CET_MSR_SET else f"MSR {index:#x}"
    if index in (Msr.IA32_U_CET, Msr.IA32_S_CET):
        return cet_ctl_fault(name, value, va_bits)
    if index in PL_SSP_MSRS:
        return ssp_fault(name, value, va_bits)
    if index == Msr.IA32_INT_SSP_TAB:
        return ssp_table_fault(name, value, va_bits)
    return None
