"""CET violation reports: what each #CP was, where, and what the two stacks held, symbolized.

Pure (imports :mod:`cetvm.arch` only): the VMM records :class:`CetViolation` values through the
KVM API's exception intercepts (:mod:`cetvm.vmm.cet_report`) and formats them with these.
"""

from cetvm.report.symtab import Symbol, Symbolizer, read_symbols
from cetvm.report.violation import CetViolation, format_report, format_violation, report_json, violation_kind

__all__ = ["CetViolation", "Symbol", "Symbolizer", "format_report", "format_violation", "read_symbols",
           "report_json", "violation_kind"]
