"""vmcs12: the VMCS L1 sees, kept in L1's memory at the address VMPTRLD named [K vmcs12.h].

KVM caches the current vmcs12 in the kernel (cached_vmcs12): VMPTRLD copies it in from guest
memory, VMREAD/VMWRITE work on the cache, and VMCLEAR / a VMPTRLD of another VMCS / VMXOFF
write it back (nested_release_vmcs12). Only VMREAD/VMWRITE see the layout, which is the
implementation's choice [SDM Vol. 3 §25.2]; cetvm's (decision) is:

    offset 0   revision identifier (u32; bit 31: shadow-VMCS indicator)
    offset 4   VMX-abort indicator (u32)
    offset 8   launch state (u32: 0 clear, 1 launched)
    offset 16  one u64 per supported field, in the order of :data:`VMCS12_FIELDS`

A field outside the table does not exist: VMREAD/VMWRITE fail with
VMXERR_UNSUPPORTED_VMCS_COMPONENT. The CET fields exist when the host's VMX has the
load-CET-state controls (:func:`cetvm.kvm.nested_caps.vmcs12_cet_fields_exist`). A 64-bit
field's high half is reachable with its encoding | 1 ("high" access type) [SDM Vol. 3
§25.11.2].
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cetvm.arch.vmx import VMCS_CET_FIELDS, VmcsField, vmcs_field_width

#: Every field of KVM's vmcs12 cetvm keeps (all of :class:`VmcsField`).
VMCS12_FIELDS: tuple[int, ...] = tuple(int(f) for f in VmcsField)
_SLOT: dict[int, int] = {f: i for i, f in enumerate(VMCS12_FIELDS)}
HEADER_SIZE = 16
LAUNCH_STATE_OFFSET = 8
REVISION_MASK = 0x7FFF_FFFF
SHADOW_VMCS_BIT = 1 << 31


def vmcs12_fields(cet_fields: bool) -> frozenset[int]:
    """The encodings that exist in this KVM's vmcs12 (full-access encodings)."""
    fields = frozenset(VMCS12_FIELDS)
    return fields if cet_fields else fields - VMCS_CET_FIELDS


def field_access(encoding: int, existing: frozenset[int]) -> tuple[int, bool] | None:
    """(field, high) for a VMREAD/VMWRITE encoding, or None when no such field exists
    (get_vmcs12_field_offset() < 0). Bits 63:32 of the encoding must be 0 [SDM VMREAD]."""
    if encoding >> 32:
        return None
    if encoding in existing:
        return encoding, False
    full = encoding & ~1
    if encoding & 1 and full in existing and (full >> 13) & 3 == 1:  # only 64-bit fields have a high half
        return full, True
    return None


@dataclass
class Vmcs12:
    """The cached vmcs12: header and field values (unwritten fields read 0)."""

    revision_id: int
    abort: int = 0
    launch_state: int = 0
    fields: dict[int, int] = field(default_factory=dict)

    def read(self, encoding: int) -> int:
        return self.fields.get(int(encoding), 0)

    def write(self, encoding: int, value: int) -> None:
        """vmcs12_write_any(): the value truncated to the field's width."""
        width = vmcs_field_width(VmcsField(encoding))
        self.fields[int(encoding)] = value & ((1 << width) - 1)

    def read_access(self, encoding: int, high: bool) -> int:
        value = self.read(encoding)
        return value >> 32 if high else value

    def write_access(self, encoding: int, high: bool, value: int) -> None:
        if high:
            value = (self.read(encoding) & 0xFFFF_FFFF) | (value & 0xFFFF_FFFF) << 32
        self.write(encoding, value)

    def to_bytes(self) -> bytes:
        """The region as cetvm lays it out in guest memory (module docstring)."""
        out = bytearray(HEADER_SIZE + 8 * len(VMCS12_FIELDS))
        out[0:4] = self.revision_id.to_bytes(4, "little")
        out[4:8] = self.abort.to_bytes(4, "little")
        out[8:12] = self.launch_state.to_bytes(4, "little")
        for encoding, value in self.fields.items():
            off = HEADER_SIZE + 8 * _SLOT[encoding]
            out[off:off + 8] = value.to_bytes(8, "little")
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Vmcs12":
        """A region read from guest memory (fields whose slot is 0 are left out)."""
        fields = {}
        for encoding, slot in _SLOT.items():
            off = HEADER_SIZE + 8 * slot
            value = int.from_bytes(data[off:off + 8], "little")
            if value:
                fields[encoding] = value & ((1 << vmcs_field_width(VmcsField(encoding))) - 1)
        return cls(int.from_bytes(data[0:4], "little"), int.from_bytes(data[4:8], "little"),
                   int.from_bytes(data[8:12], "little"), fields)


#: Bytes of the region cetvm's layout uses (fits one 4 KiB page).
VMCS12_REGION_BYTES = HEADER_SIZE + 8 * len(VMCS12_FIELDS)
