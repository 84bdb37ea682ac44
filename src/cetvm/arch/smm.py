"""System-management mode facts [SDM Vol. 3 ch. 32 "System Management Mode"].

- SMRAM starts at SMBASE; RESET sets SMBASE to 30000H and INIT leaves it alone (§32.11
  "SMBASE relocation", Table 10-1).
- The SMI handler starts at SMBASE + 8000H in a real-mode-like state (§32.5.1): CS.selector =
  SMBASE >> 4, CS.base = SMBASE, 4-GiB segment limits, CR0.PE/EM/TS/PG clear, CR4 = 0 (so CET is
  off in SMM), EFER = 0, EIP = 8000H, RFLAGS = 2, DR7 = 400H.
- The processor saves its state in the state-save map at SMBASE + FE00H .. SMBASE + FFFFH
  (512 bytes) and RSM reloads it; the layout of the map is implementation-specific (KVM's is
  :mod:`cetvm.kvm.smm`).
- RSM (0F AA) outside SMM is #UD (SDM Vol. 2 "RSM").
"""

from __future__ import annotations

#: SMBASE after RESET.
SMBASE_RESET = 0x30000
#: Offset of the SMI handler's first instruction from SMBASE.
SMM_HANDLER_OFFSET = 0x8000
#: Offset of the state-save map from SMBASE, and its size.
SMRAM_STATE_OFFSET = 0xFE00
SMRAM_STATE_SIZE = 0x200
#: RSM's opcode bytes.
RSM_OPCODE = b"\x0f\xaa"
#: DR7 in SMM (its reserved bit 10 set, every breakpoint disabled).
DR7_FIXED_1 = 0x400
#: RFLAGS in SMM (only the reserved bit 1 set).
RFLAGS_FIXED = 0x2
