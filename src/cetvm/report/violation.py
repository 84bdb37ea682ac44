"""CET violations as the VMM saw them, and their text / JSON reports.

A :class:`CetViolation` is one #CP (vector 21) the guest took, captured before delivery: the
kind (from the error code, SDM Vol. 1 §18.2: 1 NEAR-RET, 2 FAR-RET/IRET,
3 ENDBRANCH, 4 RSTORSSP, 5 SETSSBSY; bit 15 ENCL), where (RIP, CPL), when (instructions retired
before the faulting one) and what the stacks held: the qword at [RSP] and the entry at [SSP]
(for a near RET these are the two return addresses that disagreed), and for ENDBRANCH the first
bytes at RIP (the indirect-branch target that does not start with ENDBR64/ENDBR32).
Values the VMM could not read (unmapped page) are None.
"""

from __future__ import annotations

from dataclasses import dataclass

from cetvm.arch import CP_ERR_ENCL, ENDBR32, ENDBR64, CpError
from cetvm.report.symtab import Symbolizer

#: Kind names for the #CP error codes [SDM Vol. 1 §18.2].
KIND_NAMES = {
    CpError.NEAR_RET: "near-ret",
    CpError.FAR_RET_IRET: "far-ret/iret",
    CpError.ENDBRANCH: "endbranch",
    CpError.RSTORSSP: "rstorssp",
    CpError.SETSSBSY: "setssbsy",
}


def violation_kind(error_code: int) -> str:
    """The kind of a #CP error code (bits 14:0; an unknown code is ``code-N``)."""
    code = error_code & (CP_ERR_ENCL - 1)
    try:
        return KIND_NAMES[CpError(code)]
    except ValueError:
        return f"code-{code}"


@dataclass(frozen=True)
class CetViolation:
    """One #CP, before delivery (module docstring)."""

    error_code: int
    rip: int
    cpl: int
    rsp: int
    ssp: int
    instructions: int
    data_top: int | None = None      # the qword at [RSP]
    shadow_top: int | None = None    # the shadow-stack entry at [SSP]
    target_bytes: bytes | None = None  # ENDBRANCH: the first bytes at RIP

    @property
    def kind(self) -> str:
        return violation_kind(self.error_code)

    @property
    def in_enclave(self) -> bool:
        return bool(self.error_code & CP_ERR_ENCL)

    def to_json(self, symbols: Symbolizer | None = None) -> dict:
        def sym(addr: int | None) -> str | None:
            return None if symbols is None or addr is None else symbols.name_of(addr)

        return {
            "vector": 21, "error_code": self.error_code, "kind": self.kind, "rip": self.rip,
            "symbol": sym(self.rip), "cpl": self.cpl, "instructions": self.instructions,
            "rsp": self.rsp, "ssp": self.ssp,
            "data_stack_top": self.data_top, "data_stack_symbol": sym(self.data_top),
            "shadow_stack_top": self.shadow_top, "shadow_stack_symbol": sym(self.shadow_top),
            "target_bytes": None if self.target_bytes is None else self.target_bytes.hex(),
        }


def _value(addr: int | None, symbols: Symbolizer | None) -> str:
    if addr is None:
        return "<unreadable>"
    name = symbols.name_of(addr) if symbols is not None else None
    return f"{addr:#x}" + (f" <{name}>" if name else "")


def _where(addr: int, symbols: Symbolizer | None) -> str:
    name = symbols.name_of(addr) if symbols is not None else None
    return f"{addr:#x}" + (f" <{name}>" if name else "")


def format_violation(v: CetViolation, symbols: Symbolizer | None = None) -> str:
    """One line, e.g. ``#CP(1) near-ret at 0x1040e2 <user_service+0x32> CPL3: data stack
    [rsp=0x...] = 0x104100 <win>, shadow stack [ssp=0x...] = 0x1040f7 <main_user+0x17>``."""
    head = f"#CP({v.error_code}) {v.kind} at {_where(v.rip, symbols)} CPL{v.cpl}"
    if v.kind == "endbranch":
        shown = "<unreadable>" if v.target_bytes is None else v.target_bytes.hex(" ")
        note = "" if v.target_bytes is None or v.target_bytes[:4] in (ENDBR64, ENDBR32) else " (no ENDBR)"
        body = f"target bytes {shown}{note}"
    else:
        body = (f"data stack [rsp={v.rsp:#x}] = {_value(v.data_top, symbols)}, "
                f"shadow stack [ssp={v.ssp:#x}] = {_value(v.shadow_top, symbols)}")
    return f"{head}: {body} (after {v.instructions} instructions)"


def format_report(violations: list[CetViolation], symbols: Symbolizer | None = None) -> str:
    """The text report: a count line, then one line per violation."""
    lines = [f"cetvm: {len(violations)} CET violation{'s' if len(violations) != 1 else ''} (#CP)"]
    lines += ["  " + format_violation(v, symbols) for v in violations]
    return "\n".join(lines) + "\n"


def report_json(violations: list[CetViolation], symbols: Symbolizer | None = None) -> list[dict]:
    return [v.to_json(symbols) for v in violations]
