"""VMX facts: VMCS field encodings, control bits, exit reasons [SDM Vol. 3 ch. 25, App. B, C]."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class VmcsField(enum.IntEnum):
    """VMCS field encodings [SDM Vol. 3 App. B] (bits 14:13 of an encoding give its width: 0
    16-bit, 1 64-bit, 2 32-bit, 3 natural width; bits 11:10 its type: 0 control, 1 read-only
    exit information, 2 guest state, 3 host state; bits 9:1 its index; bit 0 the access type,
    1 = the high 32 bits of a 64-bit field)."""

    # 16-bit control fields
    VIRTUAL_PROCESSOR_ID = 0x0000
    POSTED_INTR_NV = 0x0002
    # 16-bit guest-state fields
    GUEST_ES_SELECTOR = 0x0800
    GUEST_CS_SELECTOR = 0x0802
    GUEST_SS_SELECTOR = 0x0804
    GUEST_DS_SELECTOR = 0x0806
    GUEST_FS_SELECTOR = 0x0808
    GUEST_GS_SELECTOR = 0x080A
    GUEST_LDTR_SELECTOR = 0x080C
    GUEST_TR_SELECTOR = 0x080E
    GUEST_INTR_STATUS = 0x0810
    GUEST_PML_INDEX = 0x0812
    # 16-bit host-state fields
    HOST_ES_SELECTOR = 0x0C00
    HOST_CS_SELECTOR = 0x0C02
    HOST_SS_SELECTOR = 0x0C04
    HOST_DS_SELECTOR = 0x0C06
    HOST_FS_SELECTOR = 0x0C08
    HOST_GS_SELECTOR = 0x0C0A
    HOST_TR_SELECTOR = 0x0C0C
    # 64-bit control fields
    IO_BITMAP_A = 0x2000
    IO_BITMAP_B = 0x2002
    MSR_BITMAP = 0x2004
    VM_EXIT_MSR_STORE_ADDR = 0x2006
    VM_EXIT_MSR_LOAD_ADDR = 0x2008
    VM_ENTRY_MSR_LOAD_ADDR = 0x200A
    PML_ADDRESS = 0x200E
    TSC_OFFSET = 0x2010
    VIRTUAL_APIC_PAGE_ADDR = 0x2012
    APIC_ACCESS_ADDR = 0x2014
    POSTED_INTR_DESC_ADDR = 0x2016
    VM_FUNCTION_CONTROL = 0x2018
    EPT_POINTER = 0x201A
    EOI_EXIT_BITMAP0 = 0x201C
    EOI_EXIT_BITMAP1 = 0x201E
    EOI_EXIT_BITMAP2 = 0x2020
    EOI_EXIT_BITMAP3 = 0x2022
    EPTP_LIST_ADDRESS = 0x2024
    VMREAD_BITMAP = 0x2026
    VMWRITE_BITMAP = 0x2028
    XSS_EXIT_BITMAP = 0x202C
    ENCLS_EXITING_BITMAP = 0x202E
    TSC_MULTIPLIER = 0x2032
    # 64-bit read-only data fields
    GUEST_PHYSICAL_ADDRESS = 0x2400
    # 64-bit guest-state fields
    VMCS_LINK_POINTER = 0x2800
    GUEST_IA32_DEBUGCTL = 0x2802
    GUEST_IA32_PAT = 0x2804
    GUEST_IA32_EFER = 0x2806
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808
    GUEST_PDPTR0 = 0x280A
    GUEST_PDPTR1 = 0x280C
    GUEST_PDPTR2 = 0x280E
    GUEST_PDPTR3 = 0x2810
    GUEST_BNDCFGS = 0x2812
    # 64-bit host-state fields
    HOST_IA32_PAT = 0x2C00
    HOST_IA32_EFER = 0x2C02
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2C04
    # 32-bit control fields
    PIN_BASED_VM_EXEC_CONTROL = 0x4000
    CPU_BASED_VM_EXEC_CONTROL = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    VM_EXIT_CONTROLS = 0x400C
    VM_EXIT_MSR_STORE_COUNT = 0x400E
    VM_EXIT_MSR_LOAD_COUNT = 0x4010
    VM_ENTRY_CONTROLS = 0x4012
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014
    VM_ENTRY_INTR_INFO = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    VM_ENTRY_INSTRUCTION_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    SECONDARY_VM_EXEC_CONTROL = 0x401E
    PLE_GAP = 0x4020
    PLE_WINDOW = 0x4022
    # 32-bit read-only data fields
    VM_INSTRUCTION_ERROR = 0x4400
    VM_EXIT_REASON = 0x4402
    VM_EXIT_INTR_INFO = 0x4404
    VM_EXIT_INTR_ERROR_CODE = 0x4406
    IDT_VECTORING_INFO = 0x4408
    IDT_VECTORING_ERROR_CODE = 0x440A
    VM_EXIT_INSTRUCTION_LEN = 0x440C
    VMX_INSTRUCTION_INFO = 0x440E
    # 32-bit guest-state fields
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_AR_BYTES = 0x4814
    GUEST_CS_AR_BYTES = 0x4816
    GUEST_SS_AR_BYTES = 0x4818
    GUEST_DS_AR_BYTES = 0x481A
    GUEST_FS_AR_BYTES = 0x481C
    GUEST_GS_AR_BYTES = 0x481E
    GUEST_LDTR_AR_BYTES = 0x4820
    GUEST_TR_AR_BYTES = 0x4822
    GUEST_INTERRUPTIBILITY_INFO = 0x4824
    GUEST_ACTIVITY_STATE = 0x4826
    GUEST_SYSENTER_CS = 0x482A
    VMX_PREEMPTION_TIMER_VALUE = 0x482E
    # 32-bit host-state field
    HOST_IA32_SYSENTER_CS = 0x4C00
    # natural-width control fields
    CR0_GUEST_HOST_MASK = 0x6000
    CR4_GUEST_HOST_MASK = 0x6002
    CR0_READ_SHADOW = 0x6004
    CR4_READ_SHADOW = 0x6006
    CR3_TARGET_VALUE0 = 0x6008
    CR3_TARGET_VALUE1 = 0x600A
    CR3_TARGET_VALUE2 = 0x600C
    CR3_TARGET_VALUE3 = 0x600E
    # natural-width read-only data fields
    EXIT_QUALIFICATION = 0x6400
    GUEST_LINEAR_ADDRESS = 0x640A
    # natural-width guest-state fields
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822
    GUEST_SYSENTER_ESP = 0x6824
    GUEST_SYSENTER_EIP = 0x6826
    GUEST_S_CET = 0x6828
    GUEST_SSP = 0x682A
    GUEST_INTR_SSP_TABLE = 0x682C
    # natural-width host-state fields
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_IA32_SYSENTER_ESP = 0x6C10
    HOST_IA32_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16
    HOST_S_CET = 0x6C18
    HOST_SSP = 0x6C1A
    HOST_INTR_SSP_TABLE = 0x6C1C


#: The CET fields (they exist with the load-CET-state controls) [SDM Vol. 3 App. B.4.3, B.4.4].
VMCS_CET_FIELDS: frozenset[int] = frozenset({
    VmcsField.GUEST_S_CET, VmcsField.GUEST_SSP, VmcsField.GUEST_INTR_SSP_TABLE,
    VmcsField.HOST_S_CET, VmcsField.HOST_SSP, VmcsField.HOST_INTR_SSP_TABLE})


def vmcs_field_type(field: int) -> int:
    """Type of a VMCS field from its encoding: 0 control, 1 read-only data, 2 guest, 3 host."""
    return (field >> 10) & 3


def vmcs_field_index(field: int) -> int:
    """Index of a VMCS field (encoding bits 9:1), as IA32_VMX_VMCS_ENUM reports the highest."""
    return (field >> 1) & 0x1FF


def vmcs_field_readonly(field: int) -> bool:
    """A read-only (VM-exit information) field [SDM Vol. 3 §25.11.2]."""
    return vmcs_field_type(field) == 1


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
    """VM-entry controls [SDM Vol. 3 Table 25-15]."""

    LOAD_DEBUG_CONTROLS = 1 << 2
    IA32E_MODE_GUEST = 1 << 9
    LOAD_IA32_PAT = 1 << 14
    LOAD_IA32_EFER = 1 << 15
    LOAD_CET_STATE = 1 << 20


class VmExitControls(enum.IntFlag):
    """VM-exit controls [SDM Vol. 3 Table 25-13]."""

    SAVE_DEBUG_CONTROLS = 1 << 2
    HOST_ADDR_SPACE_SIZE = 1 << 9
    ACK_INTR_ON_EXIT = 1 << 15
    SAVE_IA32_PAT = 1 << 18
    LOAD_IA32_PAT = 1 << 19
    SAVE_IA32_EFER = 1 << 20
    LOAD_IA32_EFER = 1 << 21
    LOAD_CET_STATE = 1 << 28


#: The "default1" bits of each control MSR pair without the TRUE_ MSRs [SDM Vol. 3 App. A.2-A.5]:
#: pin-based 1, 2, 4; primary processor-based 1, 4-6, 8, 13-16, 26; VM-exit 0-8, 10, 11, 13,
#: 14, 16, 17; VM-entry 0-8, 12.
PIN_BASED_DEFAULT1 = 0x0000_0016
PROC_BASED_DEFAULT1 = 0x0401_E172
VM_EXIT_DEFAULT1 = 0x0003_6DFF
VM_ENTRY_DEFAULT1 = 0x0000_11FF

#: IA32_VMX_BASIC fields [SDM Vol. 3 App. A.1]: VMCS region size (44:32), memory type (53:50,
#: 6 = write-back), INS/OUTS exit information (54), TRUE_ control MSRs (55), no error-code
#: consistency check on injected hardware exceptions (56).
VMX_BASIC_VMCS_SIZE_SHIFT = 32
VMX_BASIC_MEM_TYPE_SHIFT = 50
VMX_BASIC_MEM_TYPE_WB = 6
VMX_BASIC_INOUT = 1 << 54
VMX_BASIC_TRUE_CTLS = 1 << 55

#: IA32_VMX_MISC bits [SDM Vol. 3 App. A.6]: VM exit stores EFER.LMA into the IA-32e mode
#: guest entry control (5); VMWRITE may write any field, the exit-information ones too (29).
VMX_MISC_SAVE_EFER_LMA = 1 << 5
#: IA32_VMX_MISC[6]: the HLT activity state is supported [SDM Vol. 3 App. A.6].
VMX_MISC_ACTIVITY_HLT = 1 << 6
VMX_MISC_VMWRITE_ANY_FIELD = 1 << 29


class GuestActivityState(enum.IntEnum):
    """The guest activity-state field [SDM Vol. 3 §25.4.2 Table 25-3]."""

    ACTIVE = 0
    HLT = 1
    SHUTDOWN = 2
    WAIT_SIPI = 3


class VmxInsnError(enum.IntEnum):
    """VM-instruction error numbers of VMfailValid [SDM Vol. 3 §31.4 Table 31-1]."""

    VMCALL_IN_VMX_ROOT = 1
    VMCLEAR_INVALID_ADDRESS = 2
    VMCLEAR_VMXON_POINTER = 3
    VMLAUNCH_NONCLEAR_VMCS = 4
    VMRESUME_NONLAUNCHED_VMCS = 5
    VMRESUME_AFTER_VMXOFF = 6
    ENTRY_INVALID_CONTROL_FIELD = 7
    ENTRY_INVALID_HOST_STATE_FIELD = 8
    VMPTRLD_INVALID_ADDRESS = 9
    VMPTRLD_VMXON_POINTER = 10
    VMPTRLD_INCORRECT_VMCS_REVISION_ID = 11
    UNSUPPORTED_VMCS_COMPONENT = 12
    VMWRITE_READ_ONLY_VMCS_COMPONENT = 13
    VMXON_IN_VMX_ROOT_OPERATION = 15
    ENTRY_EVENTS_BLOCKED_BY_MOV_SS = 26
    INVALID_OPERAND_TO_INVEPT_INVVPID = 28


#: Exit qualifications of a VM-entry failure due to invalid guest state [SDM Vol. 3 §28.8]:
#: 0 no further detail, 4 the VMCS link pointer.
ENTRY_FAIL_DEFAULT = 0
ENTRY_FAIL_PDPTE = 2
ENTRY_FAIL_VMCS_LINK_PTR = 4

#: VM_ENTRY_INTR_INFO / VM_EXIT_INTR_INFO interruption types [SDM Vol. 3 Table 25-17].
INTR_TYPE_EXT_INTR = 0
INTR_TYPE_NMI = 2
INTR_TYPE_SOFT_INTR = 4
INTR_TYPE_PRIV_SW_EXCEPTION = 5
INTR_TYPE_SOFT_EXCEPTION = 6
INTR_TYPE_OTHER_EVENT = 7


class ExitReason(enum.IntEnum):
    """Basic VM-exit reasons [SDM Vol. 3 App. C]."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT_SIGNAL = 3
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    HLT = 12
    INVD = 13
    CPUID = 10
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMOFF = 26
    VMON = 27
    CR_ACCESS = 28
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    ENTRY_FAIL_GUEST_STATE = 33
    MSR_LOAD_FAIL = 34
    TPR_BELOW_THRESHOLD = 43
    EPT_VIOLATION = 48
    INVEPT = 50
    INVVPID = 53
    XSETBV = 55
    XSAVES = 63
    XRSTORS = 64


class VmxAbort(enum.IntEnum):
    """VMX-abort indicators [SDM Vol. 3 §29.7]."""

    SAVE_GUEST_MSR_FAIL = 1
    LOAD_HOST_PDPTE_FAIL = 2
    LOAD_HOST_MSR_FAIL = 4


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


#: VMX segment access rights [SDM Vol. 3 Table 25-2]: type 3:0 (bit 0 accessed, 1 readable for
#: code, 3 code), S 4 (code/data), DPL 6:5, P 7, reserved 11:8, L 13, D/B 14, G 15, unusable 16,
#: reserved 31:17.
AR_TYPE = 0xF
AR_TYPE_ACCESSED = 1 << 0
AR_TYPE_READABLE = 1 << 1
AR_TYPE_CODE = 1 << 3
AR_S = 1 << 4
AR_DPL_SHIFT = 5
AR_P = 1 << 7
AR_RESERVED_11_8 = 0xF00
AR_L = 1 << 13
AR_DB = 1 << 14
AR_G = 1 << 15
AR_UNUSABLE = 1 << 16
AR_RESERVED_31_17 = 0xFFFE_0000

#: VM_EXIT_INTR_INFO [SDM Vol. 3 Table 25-19]: bits 7:0 vector, 10:8 type (3 = hardware
#: exception), bit 11 error code valid, bit 31 valid.
INTR_TYPE_HARD_EXCEPTION = 3
INTR_INFO_VECTOR_MASK = 0xFF
INTR_INFO_TYPE_SHIFT = 8
INTR_INFO_DELIVER_CODE = 1 << 11
INTR_INFO_VALID = 1 << 31
#: GUEST_INTERRUPTIBILITY_INFO [SDM Vol. 3 Table 25-3]: blocking by STI (bit 0), by MOV SS (1),
#: by SMI (2), by NMI (3; "virtual-NMI blocking" with the virtual-NMIs control).
GUEST_INTR_STATE_STI = 1 << 0
GUEST_INTR_STATE_MOV_SS = 1 << 1
GUEST_INTR_STATE_SMI = 1 << 2
GUEST_INTR_STATE_NMI = 1 << 3
#: EPT-violation exit qualification bits [SDM Vol. 3 Table 28-7]: the access was a read / a write.
EPT_VIOLATION_READ = 1 << 0
EPT_VIOLATION_WRITE = 1 << 1


#: KVM_GET/SET_ONE_REG id of the guest SSP: KVM_X86_REG_KVM(KVM_REG_GUEST_SSP) [K].
KVM_REG_GUEST_SSP_ID = 0x2030000300000000

#: AMD VMCB save-area offsets of the CET state [AMD APM Vol. 2 Table B-2].
VMCB_SAVE_S_CET = 0x1E0
VMCB_SAVE_SSP = 0x1E8
VMCB_SAVE_ISST_ADDR = 0x1F0


@dataclass(frozen=True)
class VmxInstructionInfo:
    """VMX_INSTRUCTION_INFO of a VM exit by a VMX instruction [SDM Vol. 3 §28.2.5, Tables
    28-12..28-14]: scaling (1:0), register 1 (6:3: VMREAD destination / VMWRITE source when
    ``reg_form``), address size (9:7: 0 16-bit, 1 32-bit, 2 64-bit), 10 register form,
    segment (17:15), index (21:18, invalid 22), base (26:23, invalid 27), register 2 (31:28:
    the field-encoding register of VMREAD/VMWRITE, the type register of INVEPT/INVVPID).
    ``None`` = invalid index / base."""

    scaling: int = 0
    reg1: int = 0
    address_size: int = 2
    reg_form: bool = False
    segment: int = 3
    index: int | None = None
    base: int | None = None
    reg2: int = 0

    def encode(self) -> int:
        return ((self.scaling & 3) | (self.reg1 & 0xF) << 3 | (self.address_size & 7) << 7
                | int(self.reg_form) << 10 | (self.segment & 7) << 15
                | ((self.index & 0xF) << 18 if self.index is not None else 1 << 22)
                | ((self.base & 0xF) << 23 if self.base is not None else 1 << 27) | (self.reg2 & 0xF) << 28)

    @classmethod
    def decode(cls, info: int) -> "VmxInstructionInfo":
        return cls(info & 3, (info >> 3) & 0xF, (info >> 7) & 7, bool(info >> 10 & 1), (info >> 15) & 7,
                   None if info >> 22 & 1 else (info >> 18) & 0xF,
                   None if info >> 27 & 1 else (info >> 23) & 0xF, (info >> 28) & 0xF)
