"""XSAVE state components [SDM Vol. 1 ch. 13]."""

from __future__ import annotations

import enum


class XFeature(enum.IntEnum):
    """XSAVE state-component numbers."""

    X87 = 0
    SSE = 1
    YMM = 2
    BNDREGS = 3
    BNDCSR = 4
    OPMASK = 5
    ZMM_HI256 = 6
    HI16_ZMM = 7
    PT = 8
    PKRU = 9
    PASID = 10
    CET_USER = 11
    CET_KERNEL = 12
    HDC = 13
    UINTR = 14
    LBR = 15
    HWP = 16
    XTILE_CFG = 17
    XTILE_DATA = 18
    APX = 19

    @property
    def mask(self) -> int:
        return 1 << int(self)

    @property
    def label(self) -> str:
        return XFEATURE_NAMES.get(int(self), f"component {int(self)}")


XFEATURE_NAMES: dict[int, str] = {
    0: "x87", 1: "SSE", 2: "AVX", 3: "MPX BNDREGS", 4: "MPX BNDCSR", 5: "AVX-512 opmask",
    6: "AVX-512 ZMM_Hi256", 7: "AVX-512 Hi16_ZMM", 8: "PT", 9: "PKRU", 10: "PASID",
    11: "CET_U", 12: "CET_S", 13: "HDC", 14: "UINTR", 15: "Arch LBR", 16: "HWP",
    17: "AMX TILECFG", 18: "AMX TILEDATA", 19: "APX",
}


def xfeature_name(n: int) -> str:
    """Readable name of component ``n``."""
    return XFEATURE_NAMES.get(n, f"component {n}")


def mask_of(*features: XFeature) -> int:
    m = 0
    for f in features:
        m |= 1 << int(f)
    return m


XFEATURE_MASK_CET_USER = XFeature.CET_USER.mask
XFEATURE_MASK_CET_KERNEL = XFeature.CET_KERNEL.mask
XFEATURE_MASK_CET = XFEATURE_MASK_CET_USER | XFEATURE_MASK_CET_KERNEL
XFEATURE_MASK_MPX = mask_of(XFeature.BNDREGS, XFeature.BNDCSR)
XFEATURE_MASK_FPSSE = mask_of(XFeature.X87, XFeature.SSE)
XFEATURE_MASK_AVX512 = mask_of(XFeature.OPMASK, XFeature.ZMM_HI256, XFeature.HI16_ZMM)
XFEATURE_MASK_XTILE = mask_of(XFeature.XTILE_CFG, XFeature.XTILE_DATA)

#: Components that live in IA32_XSS (supervisor state) rather than XCR0 [L xstate.h].
XFEATURE_MASK_SUPERVISOR_ALL = mask_of(
    XFeature.PT, XFeature.PASID, XFeature.CET_USER, XFeature.CET_KERNEL, XFeature.HDC,
    XFeature.UINTR, XFeature.LBR, XFeature.HWP,
)

#: Layout of the CET components (offsets within the component) [SDM Vol. 1 §13.5.6].
CET_U_SIZE = 16
CET_U_OFF_U_CET = 0
CET_U_OFF_PL3_SSP = 8
CET_S_SIZE = 24
CET_S_OFF_PL0_SSP = 0
CET_S_OFF_PL1_SSP = 8
CET_S_OFF_PL2_SSP = 16

#: Legacy region and header [SDM Vol. 1 13.4].
XSAVE_LEGACY_SIZE = 512
XSAVE_HEADER_OFFSET = 512
XSAVE_HEADER_SIZE = 64
XSAVE_EXTENDED_OFFSET = 576
XCOMP_BV_COMPACTED = 1 << 63
#: MXCSR and MXCSR_MASK in the legacy region [SDM Vol. 1 Table 10-2].
FXSAVE_MXCSR_OFFSET = 24
FXSAVE_MXCSR_MASK_OFFSET = 28
#: MXCSR bits a CPU with DAZ supports (FXSAVE's MXCSR_MASK on every CET-capable CPU); bits 31:16
#: are reserved: a set one faults in LDMXCSR/FXRSTOR/XRSTOR [SDM Vol. 1 §11.6.6].
MXCSR_FEATURE_MASK = 0xFFFF
