"""Architectural facts only: numbers, bit names and pure helpers. No state lives here.

The SDM's CET, XSAVE, MSR, paging and VMX facts as named Python objects, and the architectural
value checks built on them (one place each).
"""

from cetvm.arch.cet import (
    CP_ERR_ENCL,
    ENDBR32,
    ENDBR64,
    SEGV_CPERR,
    CpError,
    is_valid_supervisor_token,
    restore_token,
    shadow_stack_entry_width,
    supervisor_token,
)
from cetvm.arch.cpuid_bits import FEATURES, IBT, SHSTK, CET_SSS, CpuidBit, Reg
from cetvm.arch.msr import (
    CET_MSRS,
    CET_CTL_RESERVED,
    CetCtl,
    Efer,
    Msr,
    PL_SSP_MSRS,
    VMX_BASIC_NO_HW_ERRCODE_CHECK,
    pl_ssp_msr,
)
from cetvm.arch.regs import Cr0, Cr4, PfErr, Pte, Vector, VECTORS_WITH_ERROR_CODE, is_canonical, u64
from cetvm.arch.vmx import ExitReason, KVM_REG_GUEST_SSP_ID, VmcsField, VmEntryControls, VmExitControls
from cetvm.arch.xfeatures import (
    XFEATURE_MASK_CET,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_MPX,
    XFeature,
    xfeature_name,
)

__all__ = [name for name in dir() if not name.startswith("_")]
