"""cetvm's vmcs12 layout in L1's memory (cetvm.kvm.vmcs12): every field round-trips through the
4 KiB region VMPTRLD names, 64-bit fields are reachable through their "high" encodings, and the
CET fields exist only when the host VMX has the load-CET-state controls."""

from cetvm.arch.vmx import VMCS_CET_FIELDS, VmcsField, vmcs_field_width
from cetvm.kvm.vmcs12 import VMCS12_FIELDS, VMCS12_REGION_BYTES, Vmcs12, field_access, vmcs12_fields


def test_region_fits_a_page_and_round_trips_every_field():
    assert VMCS12_REGION_BYTES <= 0x1000
    vmcs = Vmcs12(0x11E5_7ED0, launch_state=1)
    for i, field in enumerate(VMCS12_FIELDS):
        vmcs.write(field, 0x0123_4567_89AB_CDEF + i)
    again = Vmcs12.from_bytes(vmcs.to_bytes())
    assert (again.revision_id, again.launch_state) == (0x11E5_7ED0, 1)
    for i, field in enumerate(VMCS12_FIELDS):
        width = vmcs_field_width(VmcsField(field))
        assert again.read(field) == (0x0123_4567_89AB_CDEF + i) & ((1 << width) - 1)


def test_high_access_and_missing_fields():
    fields = vmcs12_fields(True)
    assert field_access(VmcsField.TSC_OFFSET + 1, fields) == (VmcsField.TSC_OFFSET, True)
    assert field_access(VmcsField.GUEST_RIP + 1, fields) is None  # natural width: no high access
    assert field_access(0x7FFE, fields) is None and field_access(1 << 32 | VmcsField.GUEST_RIP, fields) is None
    vmcs = Vmcs12(0)
    vmcs.write_access(VmcsField.TSC_OFFSET, False, 0x1111_2222)
    vmcs.write_access(VmcsField.TSC_OFFSET, True, 0x3333_4444)
    assert vmcs.read(VmcsField.TSC_OFFSET) == 0x3333_4444_1111_2222
    assert all(field_access(f, vmcs12_fields(False)) is None for f in VMCS_CET_FIELDS)
    assert all(field_access(f, fields) == (f, False) for f in VMCS_CET_FIELDS)
