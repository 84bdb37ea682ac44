"""`cetvm cpuid FILE|MODEL [--json]`: the CET and XSAVE facts of a CPUID dump or CPU model."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from cetvm.arch.xfeatures import xfeature_name
from cetvm.cpuid import CpuidModel, model_names, resolve_model
from cetvm.xstate import XsaveLayout
from cetvm.xstate.layout import bits_of


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cpuid",
        help="decode the CET and XSAVE facts of a CPUID dump or built-in CPU model",
        description=(
            "Decode a CPUID dump (InstLatx64 text, 'cpuid -r' output or cetvm-cpuid/1 JSON) "
            "or a built-in CPU model: vendor, SHSTK/IBT/CET_SSS, XSAVEC/XSAVES, the XCR0 and "
            "IA32_XSS masks, every XSAVE component, and the standard/compacted sizes computed "
            "from leaf 0xD next to the sizes the dump reports. Models: " + ", ".join(model_names())
        ),
    )
    parser.add_argument("spec", metavar="FILE|MODEL", help="a dump file or a built-in model name")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the decoded facts as one JSON object")
    out.add_argument("--export", action="store_true",
                     help="print the CPUID table itself as cetvm-cpuid/1 JSON (edit it and pass it back as FILE)")
    parser.set_defaults(func=run)


@dataclass
class SizeCheck:
    """A size computed from the layout next to the one CPUID reports."""

    what: str
    computed: int | None
    reported: int
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.computed == self.reported


def _names(mask: int) -> list[str]:
    return [xfeature_name(n) for n in bits_of(mask)]


def describe(model: CpuidModel) -> dict[str, Any]:
    """Everything the command prints, as plain data (the --json object)."""
    facts: dict[str, Any] = {
        "name": model.name,
        "vendor": model.vendor,
        "vendor_string": model.vendor_string,
        "features": {f: model.has(f) for f in ("shstk", "ibt", "cet_sss", "xsave", "xsavec", "xsaves", "xfd")},
        "xcr0_mask": model.xcr0_mask,
        "xss_mask": model.xss_mask,
        "components": [],
        "sizes": [],
    }
    if not model.has("xsave") or not model.contains(0xD, 0):
        return facts
    layout = XsaveLayout.from_cpuid(model)
    everything = model.xcr0_mask | model.xss_mask
    facts["components"] = [
        {"number": c.number, "name": c.name, "size": c.size,
         "std_offset": None if c.supervisor else c.std_offset,
         "compacted_offset": layout.compacted_offset(c.number, everything),
         "xss": c.supervisor, "align64": c.align64, "xfd": c.xfd}
        for c in layout.components
    ]
    _, std_ebx, std_ecx, _ = model.get(0xD, 0)
    checks = [SizeCheck("standard size, every XCR0 bit (0xD.0 ECX)", layout.max_standard_size(), std_ecx)]
    xcr0 = layout.infer_os_xcr0(std_ebx)
    checks.append(SizeCheck("standard size, OS XCR0 (0xD.0 EBX)",
                            None if xcr0 is None else layout.standard_size(xcr0), std_ebx,
                            "no valid XCR0 matches" if xcr0 is None else f"XCR0 0x{xcr0:x}"))
    facts["os_xcr0"] = xcr0
    if model.has("xsaves") or model.has("xsavec"):
        cmp_ebx = model.get(0xD, 1)[1]
        candidates = layout.infer_os_xss(xcr0, cmp_ebx) if xcr0 is not None else []
        fitting = layout.count_os_xss(xcr0, cmp_ebx) if candidates else 0
        xss = candidates[0] if candidates else None
        note = "no XSS subset matches" if xss is None else (
            f"XCR0|XSS 0x{xcr0 | xss:x}, XSS 0x{xss:x}" + (f" ({fitting} XSS subsets fit)" if fitting > 1 else ""))
        checks.append(SizeCheck("compacted size, OS XCR0|XSS (0xD.1 EBX)",
                                None if xss is None else layout.compacted_size(xcr0 | xss), cmp_ebx, note))
        facts["os_xss_candidates"] = candidates  # the first MAX_XSS_CANDIDATES, in order
        facts["os_xss_count"] = fitting
        facts["max_compacted_size"] = layout.max_compacted_size()
    facts["sizes"] = [{"what": c.what, "computed": c.computed, "reported": c.reported, "ok": c.ok, "note": c.note}
                      for c in checks]
    return facts


def _yn(value: bool) -> str:
    return "yes" if value else "no"


def render_text(facts: dict[str, Any]) -> str:
    f = facts["features"]
    lines = [
        f"model      {facts['name']}",
        f"vendor     {facts['vendor_string'] or '?'} ({facts['vendor']})",
        f"CET        SHSTK {_yn(f['shstk'])}  IBT {_yn(f['ibt'])}  CET_SSS {_yn(f['cet_sss'])}",
        f"XSAVE      XSAVE {_yn(f['xsave'])}  XSAVEC {_yn(f['xsavec'])}  XSAVES {_yn(f['xsaves'])}  XFD {_yn(f['xfd'])}",
        f"XCR0 mask  0x{facts['xcr0_mask']:x}  {', '.join(_names(facts['xcr0_mask']))}",
        f"XSS mask   0x{facts['xss_mask']:x}  {', '.join(_names(facts['xss_mask'])) or '-'}",
    ]
    if not facts["components"]:
        lines.append("no XSAVE state components enumerated (CPUID leaf 0xD)")
        return "\n".join(lines)
    lines += ["", "  n  name                 size  std-off  cmp-off  XSS  align64  XFD"]
    for c in facts["components"]:
        std = "-" if c["std_offset"] is None else f"0x{c['std_offset']:x}"
        lines.append(f" {c['number']:2d}  {c['name']:<19} {c['size']:5d}  {std:>7}  0x{c['compacted_offset']:<5x}  "
                     f"{'yes' if c['xss'] else 'no':>3}  {'yes' if c['align64'] else 'no':>7}  {'yes' if c['xfd'] else 'no':>3}")
    lines.append("  (cmp-off: offset in a compacted area holding every XCR0 and XSS component)")
    lines += ["", "sizes (computed from leaf 0xD / reported by the dump):"]
    for s in facts["sizes"]:
        computed = "none" if s["computed"] is None else f"0x{s['computed']:x}"
        status = "ok" if s["ok"] else "MISMATCH"
        note = f"  [{s['note']}]" if s["note"] else ""
        lines.append(f"  {s['what']:<42} {computed:>7} / 0x{s['reported']:x}  {status}{note}")
    if "max_compacted_size" in facts:
        lines.append(f"  {'compacted size, every XCR0 and XSS bit':<42} {'0x%x' % facts['max_compacted_size']:>7}")
    return "\n".join(lines)


def _json_ready(facts: dict[str, Any]) -> dict[str, Any]:
    out = dict(facts)
    out["xcr0_mask"] = f"0x{facts['xcr0_mask']:x}"
    out["xss_mask"] = f"0x{facts['xss_mask']:x}"
    out["xcr0_components"] = _names(facts["xcr0_mask"])
    out["xss_components"] = _names(facts["xss_mask"])
    if facts.get("os_xcr0") is not None:
        out["os_xcr0"] = f"0x{facts['os_xcr0']:x}"
    if "os_xss_candidates" in facts:
        out["os_xss_candidates"] = [f"0x{m:x}" for m in facts["os_xss_candidates"]]
    return out


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.spec)
    if args.export:
        print(json.dumps(model.to_json(), indent=1))
        return 0
    facts = describe(model)
    if args.json:
        print(json.dumps(_json_ready(facts), indent=2))
    else:
        print(render_text(facts))
    return 0
