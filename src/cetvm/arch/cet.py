"""CET instruction facts: #CP error codes, encodings, tokens [SDM Vol. 1 ch. 17]."""

from __future__ import annotations

import enum


class CpError(enum.IntEnum):
    """Error codes pushed with #CP (vector 21)."""

    NEAR_RET = 1
    FAR_RET_IRET = 2
    ENDBRANCH = 3
    RSTORSSP = 4
    SETSSBSY = 5


#: Bit 15 of the #CP error code: the violation happened inside an enclave.
CP_ERR_ENCL = 1 << 15

#: Linux delivers a user-mode #CP as SIGSEGV with si_code SEGV_CPERR.
SEGV_CPERR = 10

ENDBR64 = bytes.fromhex("f30f1efa")
ENDBR32 = bytes.fromhex("f30f1efb")

#: Bits of a supervisor shadow-stack token.
SUPERVISOR_TOKEN_BUSY = 1 << 0
#: Bits of a restore / previous-SSP token (RSTORSSP / SAVEPREVSSP).
RESTORE_TOKEN_MODE64 = 1 << 0
PREV_SSP_TOKEN = 1 << 1


def supervisor_token(ssp: int, busy: bool = False) -> int:
    """Supervisor shadow-stack token at address ``ssp``: bits 63:3 = its own address, bit 0 = busy."""
    return (ssp & ~7 & 0xFFFF_FFFF_FFFF_FFFF) | (SUPERVISOR_TOKEN_BUSY if busy else 0)


def is_valid_supervisor_token(token: int, ssp: int) -> bool:
    """A free or busy supervisor token must name its own address with bits 2:1 clear."""
    return (token & ~1) == ssp and ssp & 7 == 0


def restore_token(ssp_before_pivot: int, mode64: bool = True) -> int:
    """Restore token as SAVEPREVSSP / the kernel write it: the address above the token | mode bit.

    RSTORSSP m accepts a token at m whose address field (token & ~1) - 8, aligned down to 8, is m.
    """
    return (ssp_before_pivot & 0xFFFF_FFFF_FFFF_FFFF) | (RESTORE_TOKEN_MODE64 if mode64 else 0)


def shadow_stack_entry_width(long_mode: bool) -> int:
    """Width of a near-call shadow-stack entry: 8 bytes in 64-bit mode, else 4."""
    return 8 if long_mode else 4
