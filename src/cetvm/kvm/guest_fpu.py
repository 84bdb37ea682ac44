"""The vCPU's guest FPU state: a compacted XSAVES image holding, among others, the CET components.

KVM keeps U_CET/PL3_SSP (CET_USER) and PL0-2_SSP (CET_KERNEL) in the guest fpstate; an MSR
access to them first loads the guest FPU (kvm_get_xstate_msr/kvm_set_xstate_msr →
kvm_fpu_get()). The buffer is a :class:`cetvm.xstate.XsaveArea` laid out for XCOMP_BV =
supported_xcr0 | supported_xss (KVM's guest_default_cfg) with offsets from the host CPUID
[SDM Vol. 1 13.4.3].

"Loaded" (:attr:`GuestFpu.loaded`) models fpu_swap_kvm_fpstate(): between kvm_load_guest_fpu
and kvm_put_guest_fpu the live values are in the CPU's registers and the buffer is stale. The
hypervisor does the copying (:mod:`cetvm.kvm.fpu_swap`); :attr:`GuestFpu.touches` counts every
put/load/clear so a test can check that INIT "touches the FPU only when it has to".

The user ABI (KVM_GET_XSAVE / KVM_SET_XSAVE) is the *standard* format of the user (XCR0)
components: fpu_copy_guest_fpstate_to_uabi() converts with copy_xstate_to_uabi_buf(), which
never exposes supervisor components — CET state goes to userspace through KVM_GET_MSRS and
KVM_GET_ONE_REG instead. Decision, as the kernel: the uABI buffer is
max(4096, standard size of supported XCR0) bytes (KVM_GET_XSAVE2 size); XCOMP_BV is 0 in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cetvm.arch.xfeatures import (
    FXSAVE_MXCSR_OFFSET,
    MXCSR_FEATURE_MASK,
    XFEATURE_MASK_FPSSE,
    XSAVE_EXTENDED_OFFSET,
    XSAVE_HEADER_OFFSET,
    XFeature,
)
from cetvm.kvm.errors import KvmInvalidArgument
from cetvm.kvm.xstate_size import host_layout
from cetvm.xstate import XsaveArea, XsaveFormat
from cetvm.xstate.layout import bits_of
from cetvm.arch.regs import U64_MASK

if TYPE_CHECKING:  # pragma: no cover
    from cetvm.cpuid.model import CpuidModel

#: struct kvm_xsave is 4096 bytes; KVM_GET_XSAVE2 may be larger [K x86.c kvm_vcpu_ioctl_x86_get_xsave2].
KVM_XSAVE_MIN_SIZE = 4096
#: XSAVE header: XSTATE_BV @512, XCOMP_BV @520, reserved bytes 528-575 [SDM Vol. 1 13.4.2].
_HEADER_RESERVED_OFFSET = XSAVE_HEADER_OFFSET + 16
#: Components whose use makes copy_uabi_to_xstate() validate MXCSR (FP, SSE, YMM).
_MXCSR_USERS = XFeature.X87.mask | XFeature.SSE.mask | XFeature.YMM.mask


class GuestFpu:
    """A zero-allocated guest fpstate (KVM relies on zero allocation for RESET)."""

    def __init__(self, cpu: "CpuidModel", features: int) -> None:
        self.cpu = cpu
        self.features = features
        self.layout = host_layout(cpu)
        self.area = XsaveArea.new(self.layout, features, XsaveFormat.COMPACTED)
        self.loads = 0    # times an MSR access had to load the guest FPU (kvm_fpu_get)
        self.loaded = False  # guest state live in the CPU (between load and put)
        self.touches = 0  # put/load/clear operations (see the module docstring)
        #: (MXCSR+XMM bytes, cpu.fpu_writes) the CPU held at the last swap (cetvm.kvm.vmx._swap_sse)
        self.sse_on_cpu: tuple[bytes, int] | None = None
        self._offsets: dict[tuple[int, int], int] = {}
        #: (buffer bytes, cpu.fpu_writes) at the last put: the CPU still holds that image
        #: while both are unchanged (cetvm.kvm.vmx.kvm_load_guest_fpu skips the copy)
        self.image_on_cpu: tuple[bytes, int] | None = None

    @property
    def buffer(self) -> bytearray:
        return self.area.data

    @property
    def xstate_bv(self) -> int:
        return self.area.xstate_bv

    def has(self, feature: int) -> bool:
        return bool(self.features >> feature & 1)

    def _offset(self, feature: int) -> int:
        """Where component ``feature`` starts in the compacted buffer (fixed by the layout and
        the features: computed once per component)."""
        key = (feature, self.features)
        offset = self._offsets.get(key)
        if offset is None:
            offset = self._offsets[key] = self.layout.compacted_offset(feature, self.features)
        return offset

    def read(self, feature: int, offset: int) -> int:
        """Read 8 bytes at ``offset`` within component ``feature`` (init state reads as 0)."""
        self.loads += 1
        return self.peek(feature, offset)

    def peek(self, feature: int, offset: int) -> int:
        """Like :meth:`read`, for the hypervisor's own copying (not a guest MSR access)."""
        if not self.xstate_bv >> feature & 1:
            return 0
        base = self._offset(feature) + offset
        return int.from_bytes(self.area.data[base:base + 8], "little")

    def write(self, feature: int, offset: int, value: int) -> None:
        """Write 8 bytes in component ``feature``, marking it in use in XSTATE_BV."""
        self.loads += 1
        self.poke(feature, offset, value)

    def poke(self, feature: int, offset: int, value: int) -> None:
        base = self._offset(feature) + offset
        self.area.data[base:base + 8] = (value & U64_MASK).to_bytes(8, "little")
        self.area.xstate_bv = self.xstate_bv | 1 << feature

    def clear_component(self, feature: int) -> None:
        """fpstate_clear_xstate_component(): back to init state (zeros, XSTATE_BV bit clear)."""
        if not self.has(feature):
            return
        self.touches += 1
        self.area.clear_component(feature)

    # ----------------------------------------------------------------- user ABI
    @property
    def user_features(self) -> int:
        """The XCR0 (user) components of this fpstate."""
        return self.features & self.layout.user_mask

    @property
    def uabi_size(self) -> int:
        return max(KVM_XSAVE_MIN_SIZE, self.layout.standard_size(self.user_features))

    def to_uabi(self) -> bytes:
        """copy_xstate_to_uabi_buf(): the standard-format image of the user components."""
        out = XsaveArea(self.layout, XsaveFormat.STANDARD, bytearray(self.uabi_size), self.user_features)
        out.data[:XSAVE_HEADER_OFFSET] = self.area.data[:XSAVE_HEADER_OFFSET]
        bv = self.xstate_bv & self.user_features
        for n in bits_of(bv & ~XFEATURE_MASK_FPSSE):
            out.set_component_bytes(n, self.area.component_bytes(n))
        out.xstate_bv = bv
        return out.to_bytes()

    def from_uabi(self, data: bytes) -> None:
        """copy_uabi_from_kernel_to_xstate(): load a standard-format image of user components.

        -EINVAL (:class:`KvmInvalidArgument`) for a buffer shorter than 576 bytes or longer than
        :attr:`uabi_size` (the ioctl copies exactly that many), XSTATE_BV bits outside the user
        features, a non-zero XCOMP_BV or reserved header bytes (validate_user_xstate_header),
        reserved MXCSR bits while x87/SSE/AVX state is in use (``mxcsr & ~mxcsr_feature_mask``),
        or an image too short for its XSTATE_BV. Supervisor components (CET) are left alone.
        """
        if not XSAVE_EXTENDED_OFFSET <= len(data) <= self.uabi_size:
            raise KvmInvalidArgument(f"KVM_SET_XSAVE: image of {len(data)} bytes, expected 576 to "
                                     f"{self.uabi_size}")
        src = XsaveArea(self.layout, XsaveFormat.STANDARD, bytearray(data), self.user_features)
        if src.xcomp_bv:
            raise KvmInvalidArgument(f"KVM_SET_XSAVE: XCOMP_BV {src.xcomp_bv:#x} must be 0 in the standard format")
        if any(data[_HEADER_RESERVED_OFFSET:XSAVE_EXTENDED_OFFSET]):
            raise KvmInvalidArgument("KVM_SET_XSAVE: reserved bytes 528-575 of the XSAVE header are not zero")
        bv = src.xstate_bv
        if bv & ~self.user_features:
            raise KvmInvalidArgument(f"KVM_SET_XSAVE: XSTATE_BV {bv:#x} has components outside the guest "
                                     f"FPU's user features {self.user_features:#x}")
        mxcsr = int.from_bytes(data[FXSAVE_MXCSR_OFFSET:FXSAVE_MXCSR_OFFSET + 4], "little")
        if bv & _MXCSR_USERS and mxcsr & ~MXCSR_FEATURE_MASK:
            raise KvmInvalidArgument(f"KVM_SET_XSAVE: MXCSR {mxcsr:#x} sets reserved bits "
                                     f"{mxcsr & ~MXCSR_FEATURE_MASK:#x}")
        need = self.layout.standard_size(bv & ~XFEATURE_MASK_FPSSE)
        if len(data) < need:
            raise KvmInvalidArgument(f"KVM_SET_XSAVE: image of {len(data)} bytes is too short for XSTATE_BV {bv:#x}")
        self.area.data[:XSAVE_HEADER_OFFSET] = bytes(data[:XSAVE_HEADER_OFFSET])
        for n in bits_of(self.user_features & ~XFEATURE_MASK_FPSSE):
            if bv >> n & 1:
                self.area.set_component_bytes(n, src.component_bytes(n))
            else:
                self.area.clear_component(n)
        supervisor = self.xstate_bv & ~self.user_features
        self.area.xstate_bv = bv | supervisor
