"""Pure value checks KVM applies to CET MSR data [K x86.h]."""

from __future__ import annotations

from cetvm.arch.msr import CET_CTL_RESERVED, CetCtl, ssp_fault, ssp_table_fault

#: CET_US_RESERVED_BITS: bits 9:6.
CET_US_RESERVED_BITS = CET_CTL_RESERVED
#: CET_US_SHSTK_MASK_BITS: bits 1:0 (SH_STK_EN, WR_SHSTK_EN).
CET_US_SHSTK_MASK_BITS = 0x3
#: CET_US_IBT_MASK_BITS: bits 5:2 and 63:10 (IBT controls, SUPPRESS, TRACKER, bitmap base).
CET_US_IBT_MASK_BITS = 0x3C | (0xFFFF_FFFF_FFFF_FFFF & ~0x3FF)


def kvm_is_valid_u_s_cet(data: int, guest_shstk: bool, guest_ibt: bool) -> bool:
    """kvm_is_valid_u_s_cet(): may ``data`` be written to IA32_U_CET / IA32_S_CET?

    Rejects reserved bits 9:6; shadow-stack bits 1:0 without guest SHSTK; IBT bits 5:2 and
    63:10 without guest IBT; a legacy-bitmap base (data >> 12) that is not 4-aligned
    (bits 13:12); SUPPRESS together with TRACKER (IBT can be suppressed only while IDLE).
    """
    if data & CET_US_RESERVED_BITS:
        return False
    if not guest_shstk and data & CET_US_SHSTK_MASK_BITS:
        return False
    if not guest_ibt and data & CET_US_IBT_MASK_BITS:
        return False
    if (data >> 12) & 3:
        return False
    if data & CetCtl.SUPPRESS and data & CetCtl.TRACKER:
        return False
    return True


def kvm_is_valid_ssp(data: int, index_is_int_ssp_tab: bool, va_bits: int = 48) -> bool:
    """__kvm_set_msr for PL0-3_SSP / INT_SSP_TAB / the guest SSP: canonical
    (is_noncanonical_msr_address) and, except for INT_SSP_TAB, 4-byte aligned."""
    if index_is_int_ssp_tab:
        return ssp_table_fault("IA32_INT_SSP_TAB", data, va_bits) is None
    return ssp_fault("SSP", data, va_bits) is None
