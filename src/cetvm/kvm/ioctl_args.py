"""The argument checks at the entry of every KVM-shaped call (:mod:`cetvm.kvm.api`).

An ioctl receives C structs: every field has a type and a width, and ``copy_from_user`` can
only deliver values that fit. The Python API receives arbitrary objects, so each call first
checks that its arguments are what the struct could hold — an ``int`` (never a ``bool``,
``float`` or ``str``) in the field's range, ``bytes``, a sequence of pairs, the right
dataclass — and refuses anything else with :class:`~cetvm.kvm.errors.KvmInvalidArgument`
(-EINVAL). Values are never truncated to fit. The semantic rules of each ioctl (KVM's
kvm_is_valid_sregs, kvm_set_msr_common, the memslot checks...) come after these, in the module
that owns them.

Decision: IntEnum/IntFlag members are ints and accepted; ``bool`` is not an integer here
(``True`` for a register value is a caller bug), except where the field is a flag
(:func:`check_flag`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TypeVar

from cetvm.arch.regs import RFLAGS_FIXED, RFLAGS_RESERVED
from cetvm.cpu.state import DescriptorTable, Regs, Segment, Sregs
from cetvm.kvm.errors import KvmInvalidArgument, KvmIoctlError

U8_MAX = (1 << 8) - 1
U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
#: msr_io(): KVM_GET/SET_MSRS take fewer than MAX_IO_MSRS = 256 entries (-E2BIG otherwise);
#: cetvm uses the same bound for every list argument.
MAX_IO_MSRS = 256
MAX_IO_ENTRIES = MAX_IO_MSRS - 1
#: The segment registers of struct kvm_sregs, in its order.
SREGS_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS_DTABLES = ("gdt", "idt")
SREGS_CONTROL = ("cr0", "cr2", "cr3", "cr4", "efer")

T = TypeVar("T")


def describe(value: object) -> str:
    """A short repr of a bad argument for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(what: str, value: object, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]; -EINVAL for a non-integer (bool, float, str, None...)
    or a value outside the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvmInvalidArgument(f"{what} must be an integer, got {describe(value)}")
    if not lo <= value <= hi:
        raise KvmInvalidArgument(f"{what} {number(value)} is outside {number(lo)}..{number(hi)}")
    return int(value)


def number(value: int) -> str:
    """An integer for a message: decimal when small, hex otherwise."""
    return str(int(value)) if -4096 < value < 4096 else f"{int(value):#x}"


def check_u8(what: str, value: object) -> int:
    return check_int(what, value, 0, U8_MAX)


def check_u16(what: str, value: object) -> int:
    return check_int(what, value, 0, U16_MAX)


def check_u32(what: str, value: object) -> int:
    return check_int(what, value, 0, U32_MAX)


def check_u64(what: str, value: object) -> int:
    return check_int(what, value, 0, U64_MAX)


def check_flag(what: str, value: object) -> bool:
    """A __u8 flag field (kvm_run.immediate_exit, a bool parameter): True/False or 0/1."""
    if isinstance(value, bool):
        return value
    return bool(check_int(what, value, 0, 1))


def check_bytes(what: str, value: object, max_len: int) -> bytes:
    """A buffer (bytes, bytearray, memoryview) of at most ``max_len`` bytes."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise KvmInvalidArgument(f"{what} must be bytes, got {describe(value)}")
    data = bytes(value)
    if len(data) > max_len:
        raise KvmInvalidArgument(f"{what} of {len(data)} bytes is longer than {max_len}")
    return data


def check_items(what: str, value: object, max_len: int = MAX_IO_ENTRIES,
                too_many: Callable[[str], KvmIoctlError] = KvmInvalidArgument) -> list[object]:
    """A list, tuple or set of at most ``max_len`` items (a string, bytes or a mapping is
    refused: it would iterate as something else); ``too_many`` is raised above ``max_len``."""
    if isinstance(value, (str, bytes, bytearray, memoryview, dict)) or not isinstance(value, Iterable):
        raise KvmInvalidArgument(f"{what} must be a list, got {describe(value)}")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise KvmInvalidArgument(f"{what} must be a list, tuple or set, got {describe(value)}")
    if len(value) > max_len:
        raise too_many(f"{what} has {len(value)} entries, at most {max_len}")
    return list(value)


def check_pair(what: str, value: object) -> tuple[object, object]:
    """One (index, value) entry of a list (kvm_msr_entry, kvm_xcr)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise KvmInvalidArgument(f"{what} must be an (index, value) pair, got {describe(value)}")
    return value[0], value[1]


def check_instance(what: str, value: object, cls: type[T]) -> T:
    if not isinstance(value, cls):
        raise KvmInvalidArgument(f"{what} must be a {cls.__name__}, got {describe(value)}")
    return value


# ----------------------------------------------------------------------------- structs
def check_kvm_regs(regs: object) -> Regs:
    """struct kvm_regs for KVM_SET_REGS: every field a u64; RFLAGS without reserved bits.

    A copy with RFLAGS bit 1 set is returned, as __set_regs() does (``regs->rflags |
    X86_EFLAGS_FIXED``). Decision: KVM stores reserved RFLAGS bits and the next VM entry fails
    (KVM_EXIT_FAIL_ENTRY); cetvm has no failed-entry exit and refuses them here.
    """
    regs = check_instance("KVM_SET_REGS: regs", regs, Regs)
    values = {f.name: check_u64(f"KVM_SET_REGS: {f.name}", getattr(regs, f.name)) for f in dataclasses.fields(Regs)}
    if values["rflags"] & RFLAGS_RESERVED:
        raise KvmInvalidArgument(f"KVM_SET_REGS: rflags {values['rflags']:#x} sets reserved bits "
                                 f"{values['rflags'] & RFLAGS_RESERVED:#x}")
    values["rflags"] |= RFLAGS_FIXED
    return Regs(**values)


def check_kvm_segment(what: str, seg: object) -> Segment:
    """struct kvm_segment as cetvm packs it: selector u16, base u64, limit u32, attributes u32
    (the descriptor-cache word the CPU keeps, see :mod:`cetvm.cpu.state`)."""
    seg = check_instance(what, seg, Segment)
    return Segment(check_u16(f"{what}.selector", seg.selector), check_u64(f"{what}.base", seg.base),
                   check_u32(f"{what}.limit", seg.limit), check_u32(f"{what}.attributes", seg.attributes))


def check_kvm_dtable(what: str, table: object) -> DescriptorTable:
    """struct kvm_dtable: base u64, limit u16."""
    table = check_instance(what, table, DescriptorTable)
    return DescriptorTable(check_u64(f"{what}.base", table.base), check_u16(f"{what}.limit", table.limit))


def check_kvm_sregs(sregs: object) -> Sregs:
    """struct kvm_sregs for KVM_SET_SREGS: the field types and widths (the architectural rules
    are :func:`cetvm.kvm.cr.kvm_is_valid_sregs_state`). Returns a checked copy."""
    sregs = check_instance("KVM_SET_SREGS: sregs", sregs, Sregs)
    fields: dict[str, object] = {}
    for name in SREGS_SEGMENTS:
        fields[name] = check_kvm_segment(f"KVM_SET_SREGS: {name}", getattr(sregs, name))
    for name in SREGS_DTABLES:
        fields[name] = check_kvm_dtable(f"KVM_SET_SREGS: {name}", getattr(sregs, name))
    for name in SREGS_CONTROL:
        fields[name] = check_u64(f"KVM_SET_SREGS: {name}", getattr(sregs, name))
    return Sregs(**fields)  # type: ignore[arg-type]
