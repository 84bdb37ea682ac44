"""Time facts: TSC/nanosecond conversions, the pvclock ABI of kvmclock, KVM's paravirtual
feature bits of CPUID 0x40000001, and the CPUID leaves that state the TSC frequency.

- pvclock [Linux/KVM ABI, Documentation/virt/kvm/x86/msr.rst "MSR_KVM_SYSTEM_TIME_NEW",
  "MSR_KVM_WALL_CLOCK_NEW"]: ``struct pvclock_vcpu_time_info`` (32 bytes: u32 version, u32 pad,
  u64 tsc_timestamp, u64 system_time, u32 tsc_to_system_mul, s8 tsc_shift, u8 flags, u8 pad[2])
  and ``struct pvclock_wall_clock`` (12 bytes: u32 version, u32 sec, u32 nsec). A reader takes
  the version, the fields, the version again, and retries while it is odd or changed. Time is
  ``system_time + scale(tsc - tsc_timestamp)`` where scale shifts the delta left by
  ``tsc_shift`` (right when negative) and multiplies it by ``tsc_to_system_mul / 2**32``.
- KVM paravirtual features (CPUID.0x40000001.EAX, msr.rst / cpuid.rst): bit 0
  KVM_FEATURE_CLOCKSOURCE (MSRs 0x11/0x12), bit 3 KVM_FEATURE_CLOCKSOURCE2 (the "_NEW" MSRs),
  bit 24 KVM_FEATURE_CLOCKSOURCE_STABLE_BIT (the guest may trust PVCLOCK_TSC_STABLE_BIT).
- CPUID.15H [SDM Vol. 2A CPUID "Time Stamp Counter and Nominal Core Crystal Clock Information
  Leaf"]: EAX = denominator, EBX = numerator of the TSC / crystal ratio, ECX = crystal Hz; TSC Hz =
  ECX * EBX / EAX. CPUID.16H: EAX base MHz, EBX maximum MHz, ECX bus (reference) MHz.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

NSEC_PER_SEC = 1_000_000_000
U64 = (1 << 64) - 1

#: struct pvclock_vcpu_time_info / pvclock_wall_clock, little-endian.
PVCLOCK_VCPU_TIME_INFO = struct.Struct("<IIQQIbBxx")
PVCLOCK_WALL_CLOCK = struct.Struct("<III")
#: pvclock_vcpu_time_info.flags: the TSC is stable and synchronised (no per-vCPU correction).
PVCLOCK_TSC_STABLE_BIT = 1 << 0
#: The system-time MSR's enable bit (bit 0 of the written guest-physical address).
KVM_SYSTEM_TIME_ENABLE = 1


class KvmFeature(enum.IntFlag):
    """CPUID.0x40000001.EAX bits (KVM_FEATURE_*) cetvm knows."""

    CLOCKSOURCE = 1 << 0
    CLOCKSOURCE2 = 1 << 3
    CLOCKSOURCE_STABLE_BIT = 1 << 24


def ns_to_ticks(ns: int, khz: int) -> int:
    """Ticks of a ``khz`` clock in ``ns`` nanoseconds (rounded down)."""
    return ns * khz // 1_000_000


def ticks_to_ns_ceil(ticks: int, khz: int) -> int:
    """The fewest nanoseconds in which a ``khz`` clock counts ``ticks`` (rounded up)."""
    return -(-ticks * 1_000_000 // khz)


def pvclock_time_scale(hz: int) -> tuple[int, int]:
    """(tsc_to_system_mul, tsc_shift) converting ticks of an ``hz`` counter to nanoseconds:
    the shift brings NSEC_PER_SEC / hz into [0.5, 1), the multiplier is that fraction in 32-bit
    fixed point (rounded down). The same scale KVM's kvm_get_time_scale() derives."""
    if hz <= 0:
        raise ValueError(f"pvclock: a counter frequency must be positive, not {hz}")
    num, den, shift = NSEC_PER_SEC, hz, 0
    while num >= den:
        den, shift = den * 2, shift + 1
    while 2 * num < den:
        num, shift = num * 2, shift - 1
    return (num << 32) // den, shift


def pvclock_scale_delta(delta: int, mul: int, shift: int) -> int:
    """pvclock's scale of a TSC delta to nanoseconds (the guest's pvclock_scale_delta)."""
    delta = delta << shift if shift >= 0 else delta >> -shift
    return (delta * mul) >> 32


@dataclass(frozen=True)
class PvclockTimeInfo:
    """struct pvclock_vcpu_time_info."""

    version: int
    tsc_timestamp: int
    system_time: int
    tsc_to_system_mul: int
    tsc_shift: int
    flags: int

    def pack(self) -> bytes:
        return PVCLOCK_VCPU_TIME_INFO.pack(self.version & 0xFFFF_FFFF, 0, self.tsc_timestamp & U64,
                                           self.system_time & U64, self.tsc_to_system_mul, self.tsc_shift,
                                           self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> "PvclockTimeInfo":
        version, _pad, tsc, system, mul, shift, flags = PVCLOCK_VCPU_TIME_INFO.unpack(data)
        return cls(version, tsc, system, mul, shift, flags)

    def read_ns(self, tsc: int) -> int:
        """The guest's pvclock read at TSC value ``tsc``."""
        return (self.system_time + pvclock_scale_delta((tsc - self.tsc_timestamp) & U64, self.tsc_to_system_mul,
                                                       self.tsc_shift)) & U64


@dataclass(frozen=True)
class TscFrequencyLeaves:
    """CPUID 15H/16H values describing a TSC of ``tsc_khz`` on a ``crystal_hz`` crystal."""

    tsc_khz: int
    crystal_hz: int
    bus_mhz: int

    def leaf_15h(self) -> tuple[int, int, int, int]:
        """(denominator, numerator, crystal Hz, 0), the ratio reduced."""
        numerator, denominator = self.tsc_khz * 1000, self.crystal_hz
        common = math.gcd(numerator, denominator)
        return denominator // common, numerator // common, self.crystal_hz, 0

    def leaf_16h(self) -> tuple[int, int, int, int]:
        """(base MHz, maximum MHz, bus MHz, 0): a core running at the TSC's rate."""
        mhz = self.tsc_khz // 1000
        return mhz, mhz, self.bus_mhz, 0


def tsc_hz_from_leaf_15h(eax: int, ebx: int, ecx: int) -> int | None:
    """TSC Hz from CPUID.15H (None when the leaf does not state it)."""
    if not eax or not ebx or not ecx:
        return None
    return ecx * ebx // eax
