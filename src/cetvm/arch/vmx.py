"""VMX facts: VMCS field encodings, control bits, exit reasons [SDM Vol. 3 ch. 25, App. B, C]."""

from __future__ import annotations

import enum


class VmcsField(enum.IntEnum):
    """VMCS field encodings used by cetvm [SDM Vol. 3 App. B] (bits 14:13 of an encoding give
    its width: 0 16-bit, 1 64-bit, 2 32-bit, 3 natural width; bits 11:10 its type: 0 control,
    1 read-only exit information, 2 guest state, 3 host state)."""

    # 64-bit control fields
    MSR_BITMAP = 0x2004
    # 64-bit read-only data fields
    GUEST_PHYSICAL_ADDRESS = 0x2400
    # 32-bit control fields
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    VM_EXIT_CONTROLS = 0x400C
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_INTR_INFO = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    # 32-bit read-only data fields
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E
    # natural-width control fields
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    # natural-width read-only data fields
    EXIT_QUALIFICATION = 0x6400
    # natural-width guest-state fields
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_S_CET = 0x6828
    GUEST_SSP = 0x682A
    GUEST_INTR_SSP_TABLE = 0x682C
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_S_CET = 0x6C18
    HOST_SSP = 0x6C1A
    HOST_INTR_SSP_TABLE = 0x6C1C
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16


def vmcs_field_width(field: VmcsField) -> int:
    """Width in bits of a VMCS field, from its encoding [SDM Vol. 3 §25.11.2]."""
    return (16, 64, 32, 64)[(int(field) >> 13) & 3]


class PinBasedControls(enum.IntFlag):
    """Pin-based VM-execution controls [SDM Vol. 3 §25.6.1, Table 25-5]."""

    EXTERNAL_INTERRUPT_EXITING = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    PREEMPTION_TIMER = 1 << 6
    POSTED_INTERRUPTS = 1 << 7


class CpuBasedControls(enum.IntFlag):
    """Primary processor-based VM-execution controls [SDM Vol. 3 §25.6.2, Table 25-6]."""

    INTERRUPT_WINDOW_EXITING = 1 << 2
    USE_TSC_OFFSETTING = 1 << 3
    HLT_EXITING = 1 << 7
    INVLPG_EXITING = 1 << 9
    MWAIT_EXITING = 1 << 10
    RDPMC_EXITING = 1 << 11
    RDTSC_EXITING = 1 << 12
    CR3_LOAD_EXITING = 1 << 15
    CR3_STORE_EXITING = 1 << 16
    CR8_LOAD_EXITING = 1 << 19
    CR8_STORE_EXITING = 1 << 20
    USE_TPR_SHADOW = 1 << 21
    NMI_WINDOW_EXITING = 1 << 22
    MOV_DR_EXITING = 1 << 23
    UNCONDITIONAL_IO_EXITING = 1 << 24
    USE_IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    USE_MSR_BITMAPS = 1 << 28
    MONITOR_EXITING = 1 << 29
    PAUSE_EXITING = 1 << 30
    ACTIVATE_SECONDARY_CONTROLS = 1 << 31


class SecondaryControls(enum.IntFlag):
    """Secondary processor-based VM-execution controls [SDM Vol. 3 §25.6.2, Table 25-7]."""

    VIRTUALIZE_APIC_ACCESSES = 1 << 0
    ENABLE_EPT = 1 << 1
    DESCRIPTOR_TABLE_EXITING = 1 << 2
    ENABLE_RDTSCP = 1 << 3
    ENABLE_VPID = 1 << 5
    UNRESTRICTED_GUEST = 1 << 7
    ENABLE_INVPCID = 1 << 12
    ENABLE_XSAVES = 1 << 20


class VmEntryControls(enum.IntFlag):
    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE_GUEST = 1 << 9
    LOAD_IA32_EFER = 1 << 15
    LOAD_CET_STATE = 1 << 20


class VmExitControls(enum.IntFlag):
    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDR_SPACE_SIZE = 1 << 9
    ACK_INTR_ON_EXIT = 1 << 15
    SAVE_IA32_EFER = 1 << 20
    LOAD_IA32_EFER = 1 << 21
    LOAD_CET_STATE = 1 << 28


class ExitReason(enum.IntEnum):
    """Basic VM-exit reasons [SDM Vol. 3 App. C]."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    INTERRUPT_WINDOW = 7
    HLT = 12
    CPUID = 10
    VMCALL = 18
    CR_ACCESS = 28
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    ENTRY_FAIL_GUEST_STATE = 33
    EPT_VIOLATION = 48
    XSETBV = 55
    XSAVES = 63
    XRSTORS = 64


#: VM_EXIT_REASON bit 31: the exit is a VM-entry failure [SDM Vol. 3 §25.9.1, §27.8].
VMX_EXIT_REASONS_FAILED_VMENTRY = 1 << 31

#: Exit qualification of a control-register access [SDM Vol. 3 Table 28-3]: bits 3:0 the CR
#: number, 5:4 the access type (0 = MOV to CR, 1 = MOV from CR, 2 = CLTS, 3 = LMSW), 11:8 the
#: general-purpose register (0 RAX ... 15 R15).
CR_ACCESS_TYPE_MOV_TO_CR = 0


def cr_access_qualification(cr: int, access_type: int, gpr: int) -> int:
    """The exit qualification of a MOV to/from CR exit."""
    return (cr & 0xF) | (access_type & 3) << 4 | (gpr & 0xF) << 8


def io_qualification(size: int, is_in: bool, port: int, *, string: bool = False, rep: bool = False,
                     immediate: bool = False) -> int:
    """The exit qualification of an I/O instruction [SDM Vol. 3 Table 28-5]: bits 2:0 size - 1,
    bit 3 direction (1 = IN), bit 4 string, bit 5 REP, bit 6 operand encoding (1 = immediate),
    bits 31:16 the port."""
    return (((size - 1) & 7) | int(is_in) << 3 | int(string) << 4 | int(rep) << 5 | int(immediate) << 6
            | (port & 0xFFFF) << 16)


#: VM_EXIT_INTR_INFO [SDM Vol. 3 Table 25-19]: bits 7:0 vector, 10:8 type (3 = hardware
#: exception), bit 11 error code valid, bit 31 valid.
INTR_TYPE_HARD_EXCEPTION = 3
INTR_INFO_DELIVER_CODE = 1 << 11
INTR_INFO_VALID = 1 << 31
#: EPT-violation exit qualification bits [SDM Vol. 3 Table 28-7]: the access was a read / a write.
EPT_VIOLATION_READ = 1 << 0
EPT_VIOLATION_WRITE = 1 << 1


#: KVM_GET/SET_ONE_REG id of the guest SSP: KVM_X86_REG_KVM(KVM_REG_GUEST_SSP) [K].
KVM_REG_GUEST_SSP_ID = 0x2030000300000000

#: AMD VMCB save-area offsets of the CET state [AMD APM Vol. 2 Table B-2].
VMCB_SAVE_S_CET = 0x1E0
VMCB_SAVE_SSP = 0x1E8
VMCB_SAVE_ISST_ADDR = 0x1F0
