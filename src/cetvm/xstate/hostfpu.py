"""The host kernel's FPU framework, as Linux 6.18 configures it [L fpu__init_system_xstate].

What the model reproduces (fpu__init_system_xstate and friends, with the CET changes that
went in for KVM CET virtualization — the review of the KVM CET virtualization series):

- Max features = CPU-enumerated XCR0 | XSS components, restricted to what Linux supports
  (XFEATURE_MASK_USER_SUPPORTED: x87, SSE, AVX, MPX, AVX-512, PKRU, AMX, APX;
  XFEATURE_MASK_SUPERVISOR_SUPPORTED: PASID, CET_USER, CET_KERNEL), each gated on its CPU
  feature (xsave_cpuid_features[]: avx, mpx, avx512f, pku, amx_tile, apx, enqcmd, shstk).
  PT, HDC, UINTR, Arch LBR, HWP are never in the kernel's XSS.
- CET_USER is in XSS only with ``user_shstk`` (CONFIG_X86_USER_SHADOW_STACK, the kernel using
  user shadow stacks); CET_KERNEL whenever the CPU enumerates it with SHSTK.
- Without XSAVES the kernel uses the standard format and no supervisor state at all.
- XTILE_DATA is dynamic (XFD): excluded from default buffers until a permission request.
  Decision (UNVERIFIED detail): without XFD the kernel cannot make AMX dynamic, so both AMX
  components are dropped.
- CET_KERNEL is guest-only: in guest_default_cfg, not in the normal task's kernel_cfg.
- The kernel buffer sizes are in the compacted format (XSAVES), the user ABI sizes (signal
  frames, KVM_GET_XSAVE uABI) in the standard format.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm import InputError
from cetvm.arch.cpuid_bits import CpuidBit, Reg
from cetvm.arch.xfeatures import (
    XFEATURE_MASK_AVX512,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_MPX,
    XFEATURE_MASK_XTILE,
    XFeature,
)
from cetvm.cpuid.model import CpuidModel
from cetvm.xstate.layout import XsaveLayout

#: CPUID bits Linux gates xfeatures on that cetvm.arch.cpuid_bits does not name.
ENQCMD = CpuidBit("enqcmd", 7, 0, Reg.ECX, 29)
APX_F = CpuidBit("apx_f", 7, 1, Reg.EDX, 21)

#: XFEATURE_MASK_USER_SUPPORTED [L asm/fpu/xstate.h].
XFEATURE_MASK_USER_SUPPORTED = (XFEATURE_MASK_FPSSE | XFeature.YMM.mask | XFEATURE_MASK_MPX
                                | XFEATURE_MASK_AVX512 | XFeature.PKRU.mask | XFEATURE_MASK_XTILE
                                | XFeature.APX.mask)
#: XFEATURE_MASK_SUPERVISOR_SUPPORTED.
XFEATURE_MASK_SUPERVISOR_SUPPORTED = XFeature.PASID.mask | XFEATURE_MASK_CET_USER | XFEATURE_MASK_CET_KERNEL
#: XFEATURE_MASK_USER_DYNAMIC: allocated only after ARCH_REQ_XCOMP(_GUEST)_PERM.
XFEATURE_MASK_USER_DYNAMIC = XFeature.XTILE_DATA.mask
#: Supervisor features only guest FPUs carry (fpu_guest_cfg / guest_default_cfg).
XFEATURE_MASK_GUEST_SUPERVISOR = XFEATURE_MASK_CET_KERNEL


@dataclass(frozen=True)
class FpuConfig:
    """A buffer configuration: kernel (compacted) features/size, user-ABI features/size."""

    features: int
    size: int
    user_features: int
    user_size: int


def _has(model: CpuidModel, bit: CpuidBit) -> bool:
    return bool(model.get(bit.leaf, bit.subleaf)[bit.reg] & bit.mask)


#: (xfeature mask, CPUID bit it depends on) — the xsave_cpuid_features[] table.
def _feature_gates(model: CpuidModel) -> list[tuple[int, bool]]:
    return [
        (XFeature.YMM.mask, model.has("avx")),
        (XFEATURE_MASK_MPX, model.has("mpx")),
        (XFEATURE_MASK_AVX512, model.has("avx512f")),
        (XFeature.PKRU.mask, model.has("pku")),
        (XFEATURE_MASK_XTILE, model.has("amx_tile")),
        (XFeature.APX.mask, _has(model, APX_F)),
        (XFeature.PASID.mask, _has(model, ENQCMD)),
        (XFEATURE_MASK_CET_USER, model.has("shstk")),
        (XFEATURE_MASK_CET_KERNEL, model.has("shstk")),
    ]


class HostFpu:
    """The host kernel's xfeature configuration for one CPU model."""

    def __init__(self, layout: XsaveLayout, max_features: int, compacted: bool) -> None:
        self.layout = layout
        self.max_features = max_features
        self.compacted = compacted

    @classmethod
    def from_host(cls, model: CpuidModel, *, user_shstk: bool) -> "HostFpu":
        """The configuration Linux 6.18 would choose on ``model`` (see the module docstring)."""
        if not model.has("xsave"):
            raise InputError(f"{model.name}: the CPU has no XSAVE; the kernel's xstate framework is off")
        layout = XsaveLayout.from_cpuid(model)
        mask = (model.xcr0_mask & XFEATURE_MASK_USER_SUPPORTED) | (model.xss_mask & XFEATURE_MASK_SUPERVISOR_SUPPORTED)
        for features, present in _feature_gates(model):
            if not present:
                mask &= ~features
        if not user_shstk:
            mask &= ~XFEATURE_MASK_CET_USER
        compacted = model.has("xsaves")
        if not compacted:
            mask &= XFEATURE_MASK_USER_SUPPORTED
        if not model.has("xfd"):
            mask &= ~XFEATURE_MASK_XTILE
        elif mask & XFEATURE_MASK_XTILE != XFEATURE_MASK_XTILE:
            mask &= ~XFEATURE_MASK_XTILE
        return cls(layout, mask, compacted)

    # ----------------------------------------------------------------- masks
    @property
    def features_user(self) -> int:
        """XCR0 as the kernel programs it (all user features, dynamic ones included)."""
        return self.max_features & XFEATURE_MASK_USER_SUPPORTED

    @property
    def features_supervisor(self) -> int:
        """Supervisor xstate of every task (PASID, CET_USER); not the guest-only ones."""
        return self.max_features & XFEATURE_MASK_SUPERVISOR_SUPPORTED & ~XFEATURE_MASK_GUEST_SUPERVISOR

    @property
    def features_guest_only(self) -> int:
        """Supervisor xstate only guest FPUs hold: CET_KERNEL."""
        return self.max_features & XFEATURE_MASK_GUEST_SUPERVISOR

    @property
    def features_dynamic(self) -> int:
        """User features allocated only after a permission request (AMX TILEDATA)."""
        return self.max_features & XFEATURE_MASK_USER_DYNAMIC

    @property
    def xcr0(self) -> int:
        return self.features_user

    @property
    def xss(self) -> int:
        """IA32_XSS as the host kernel programs it (task and guest-only supervisor features)."""
        return self.features_supervisor | self.features_guest_only

    # ----------------------------------------------------------------- sizes
    def kernel_size(self, features: int) -> int:
        """Size of a kernel fpstate buffer for ``features`` (compacted when XSAVES is used)."""
        if self.compacted:
            return self.layout.compacted_size(features)
        return self.layout.standard_size(features & XFEATURE_MASK_USER_SUPPORTED)

    def user_size(self, features: int) -> int:
        """Size of the user ABI (standard-format) buffer for the user part of ``features``."""
        return self.layout.standard_size(features & XFEATURE_MASK_USER_SUPPORTED)

    def _config(self, features: int) -> FpuConfig:
        user = features & XFEATURE_MASK_USER_SUPPORTED
        return FpuConfig(features, self.kernel_size(features), user, self.user_size(user))

    @property
    def default_user_features(self) -> int:
        return self.features_user & ~XFEATURE_MASK_USER_DYNAMIC

    @property
    def kernel_cfg(self) -> FpuConfig:
        """fpu_kernel_cfg defaults: every task's buffer (no dynamic, no guest-only features)."""
        return self._config(self.default_user_features | self.features_supervisor)

    @property
    def user_cfg(self) -> FpuConfig:
        """fpu_user_cfg defaults: the user ABI (standard format, user features only)."""
        user = self.default_user_features
        size = self.user_size(user)
        return FpuConfig(user, size, user, size)

    @property
    def guest_default_cfg(self) -> FpuConfig:
        """guest_default_cfg: kernel defaults plus the guest-only CET_KERNEL."""
        return self._config(self.default_user_features | self.features_supervisor | self.features_guest_only)

    # ----------------------------------------------------------------- permissions
    def _check_request(self, requested_xcr0: int) -> None:
        extra = requested_xcr0 & ~self.features_user
        if extra:
            raise InputError(f"requested xfeatures 0x{extra:x} are not supported by the host "
                             f"(XCR0 0x{self.features_user:x})")

    def guest_perm_request(self, requested_xcr0: int) -> FpuConfig:
        """Guest FPU config after ARCH_REQ_XCOMP_GUEST_PERM for ``requested_xcr0`` (e.g. AMX).

        As merged (__xstate_request_perm(), after the review of the v6 CET-virtualization
        series): the guest's permitted mask starts as guest_default_cfg.features, which
        already holds every guest supervisor feature, and the new mask is permitted |
        requested — so CET_USER and CET_KERNEL keep their space.
        """
        self._check_request(requested_xcr0)
        return self._config(self.guest_default_cfg.features | requested_xcr0)
