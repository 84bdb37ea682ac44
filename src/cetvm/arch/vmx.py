"""VMX facts for CET: VMCS field encodings and control bits [SDM Vol. 3 App. B]."""

from __future__ import annotations

import enum


class VmcsField(enum.IntEnum):
    """VMCS field encodings used by cetvm (natural width unless noted)."""

    VM_ENTRY_CONTROLS = 0x4012
    VM_EXIT_CONTROLS = 0x400C
    VM_ENTRY_INTR_INFO = 0x4016
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018
    EXCEPTION_BITMAP = 0x4004
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


#: KVM_GET/SET_ONE_REG id of the guest SSP: KVM_X86_REG_KVM(KVM_REG_GUEST_SSP) [K].
KVM_REG_GUEST_SSP_ID = 0x2030000300000000

#: AMD VMCB save-area offsets of the CET state [AMD APM Vol. 2 Table B-2].
VMCB_SAVE_S_CET = 0x1E0
VMCB_SAVE_SSP = 0x1E8
VMCB_SAVE_ISST_ADDR = 0x1F0
