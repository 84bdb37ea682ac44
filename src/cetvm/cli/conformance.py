"""`cetvm conformance --kut DIR`: run kvm-unit-tests' x86 suite through cetvm's QEMU front end
(and QEMU TCG when installed) and write docs/conformance.md (:mod:`cetvm.conformance`)."""

from __future__ import annotations

import argparse
import datetime
import shutil
import sys
import tempfile
from pathlib import Path

from cetvm import InputError
from cetvm.conformance import (EntryResult, check_kut, list_entries, qemu_tcg_wrapper, read_report_table, run_suite,
                               run_vmx_subtests, totals, write_report, write_vmx_section)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "conformance", help="run kvm-unit-tests x86 through cetvm (and QEMU TCG) and write docs/conformance.md",
        description="Run every entry of a built kvm-unit-tests tree's x86/unittests.cfg with its own "
                    "run_tests.sh, once with QEMU=cetvm-qemu-system-x86_64 and, when qemu-system-x86_64 is "
                    "installed, once with QEMU TCG (-cpu host replaced by -cpu max, -enable-kvm dropped, "
                    "ACCEL=tcg); write a Markdown report: entry, verdict, seconds, failing report lines, "
                    "totals, and the entries QEMU passes and cetvm does not. Example: cetvm conformance "
                    "--kut /work/ext/kut --jobs 2")
    p.add_argument("--kut", required=True, metavar="DIR", help="a configured and built kvm-unit-tests tree")
    p.add_argument("--output", default="docs/conformance.md", metavar="FILE",
                   help="the report to write (default docs/conformance.md)")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="N", help="entries run in parallel (default 1)")
    p.add_argument("--only", action="append", default=None, metavar="ENTRY",
                   help="run only this entry (repeatable, or several separated by commas; default every "
                        "entry); an unknown name is an error that lists the entries")
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU TCG comparison run")
    p.add_argument("--qemu", default="qemu-system-x86_64", metavar="BINARY",
                   help="the QEMU to compare with (default qemu-system-x86_64 on PATH)")
    p.add_argument("--qemu-from", default=None, metavar="REPORT",
                   help="reuse the QEMU TCG table of an earlier report instead of running QEMU again (default: run QEMU)")
    p.add_argument("--cetvm-from", default=None, metavar="REPORT",
                   help="rewrite the report from the cetvm table of an earlier report instead of running the "
                        "suite; with --only, rerun just those entries (default: run the suite)")
    p.add_argument("--frontend", default=None, metavar="BINARY",
                   help="cetvm's front end (default: cetvm-qemu-system-x86_64 beside this Python)")
    p.add_argument("--vmx-subtests", action="store_true",
                   help="run each sub-test of x86/vmx.flat alone (-cpu max,+vmx) and write its table as the "
                        "report's last section, keeping the rest of the report (default: the entries)")
    p.set_defaults(func=run)


def _frontend(args: argparse.Namespace) -> str:
    if args.frontend:
        return args.frontend
    beside = Path(sys.executable).parent / "cetvm-qemu-system-x86_64"
    found = str(beside) if beside.exists() else shutil.which("cetvm-qemu-system-x86_64")
    if not found:
        raise InputError("cetvm-qemu-system-x86_64 is not installed (pip install -e . installs it); "
                         "or give --frontend BINARY")
    return found


def _progress(label: str):
    def show(r: EntryResult) -> None:
        print(f"{label}: {r.verdict} {r.name} ({r.seconds:.1f} s) {r.detail}", file=sys.stderr, flush=True)
    return show


VMX_INTRO = ("Each sub-test of x86/vmx.flat (the kernel of the [vmx] entry and the vmx group) run alone "
             "through cetvm's front end: `x86/run x86/vmx.flat -cpu max,+vmx -append NAME` (nested VMX of the "
             "modeled KVM: kvm_intel nested=1 on sapphire-rapids; no EPT, VPID, APICv, preemption timer, "
             "interrupt/NMI windows, MTF or shadow VMCS are offered to L1, so those sub-tests skip or fail "
             "their feature probes). PASS = every report passed and the summary was reached; FAIL = a failing "
             "report, an abort, or no summary within 60 s. Regenerate with `cetvm conformance --kut DIR "
             "--vmx-subtests`.")


def selected_entries(kut: Path, only: list[str] | None) -> list[str] | None:
    """The --only names (commas split them too), each an entry of x86/unittests.cfg (InputError
    naming the unknown ones and the entries there are); None without --only."""
    if not only:
        return None
    names = [name.strip() for item in only for name in item.split(",") if name.strip()]
    entries = list_entries(kut)
    unknown = [name for name in names if name not in entries]
    if unknown:
        raise InputError(f"--only: no entry {', '.join(unknown)} in {kut / 'x86' / 'unittests.cfg'}; "
                         f"entries: {' '.join(entries)}")
    return names


def run(args: argparse.Namespace) -> int:
    kut = Path(args.kut).resolve()
    check_kut(kut)
    args.only = selected_entries(kut, args.only)
    if args.vmx_subtests:
        results = run_vmx_subtests(kut, _frontend(args), args.jobs, _progress("vmx"))
        write_vmx_section(Path(args.output), results, VMX_INTRO)
        t = totals(results)
        print(f"cetvm conformance (vmx sub-tests): {t['PASS']} PASS, {t['FAIL']} FAIL, {t['SKIP']} SKIP; "
              f"report in {args.output}")
        return 0
    if args.cetvm_from:
        cetvm = read_report_table(Path(args.cetvm_from), "cetvm")
        if args.only:  # rerun just these entries, keep the others from the earlier report
            fresh = {r.name: r for r in run_suite(kut, _frontend(args), {}, args.jobs, args.only,
                                                  _progress("cetvm"))}
            cetvm = [fresh.get(r.name, r) for r in cetvm]
    else:
        cetvm = run_suite(kut, _frontend(args), {}, args.jobs, args.only, _progress("cetvm"))
    qemu_results = None
    qemu = None if args.no_qemu or args.qemu_from else shutil.which(args.qemu)
    if args.qemu_from:
        qemu_results = read_report_table(Path(args.qemu_from), "QEMU TCG")
    elif qemu:
        with tempfile.TemporaryDirectory(prefix="cetvm-qemu-tcg-") as tmp:
            wrapper = qemu_tcg_wrapper(qemu, Path(tmp))
            qemu_results = run_suite(kut, str(wrapper), {"ACCEL": "tcg"}, args.jobs, args.only, _progress("qemu"))
    c, q = totals(cetvm), totals(qemu_results) if qemu_results else None
    header = (f"# kvm-unit-tests x86 conformance\n\n"
              f"Generated by `cetvm conformance --kut DIR` ({datetime.date.today().isoformat()}) from a "
              f"kvm-unit-tests tree built x86_64 with the system gcc. Each entry of x86/unittests.cfg runs "
              f"through the suite's own run_tests.sh (entries marked nodefault SKIP as there). cetvm: "
              f"`QEMU=cetvm-qemu-system-x86_64` (modeled host: sapphire-rapids).\n\n"
              f"Totals: cetvm {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP"
              + (f"; QEMU TCG {q['PASS']} PASS, {q['FAIL']} FAIL, {q['SKIP']} SKIP" if q else "") + ".\n"
              + ("\nThe QEMU TCG table is reused from an earlier run of this command on the same machine "
                 "(`--qemu-from`; QEMU does not change between cetvm builds).\n" if args.qemu_from else ""))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_report(output, cetvm, qemu_results, header)
    print(f"cetvm conformance: {c['PASS']} PASS, {c['FAIL']} FAIL, {c['SKIP']} SKIP; report in {output}")
    return 0
