"""`cetvm migrate-check`: can a VM's state migrate from one host to another under KVM 6.18?

Each side takes the host options of ``cetvm caps`` with a ``--from-`` / ``--to-`` prefix. Prints
the findings (blocker / warning, what, why) and a verdict line; with blockers, what a restricted
(intersection) guest CPUID would lose. Exit status 0 migratable, 1 not migratable, 2 bad input.
"""

from __future__ import annotations

import argparse
import json

from cetvm.cli.caps import ON_OFF
from cetvm.cpuid import model_names
from cetvm.kvm.host import Host
from cetvm.kvm.migration import MigrationReport, check_migration

SIDES = {"from": "source", "to": "destination"}
_ON_OFF_OPTIONS = (("vmx-basic-56", "IA32_VMX_BASIC[56]"),
                   ("load-cet-controls", "VMX load-CET-state entry/exit controls"),
                   ("unrestricted-guest", "VMX unrestricted guest"),
                   ("tdp", "EPT/NPT (off = shadow paging)"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "migrate-check", help="check whether a VM can migrate between two hosts (CET focus)",
        description="Whether a guest started on the source host with '-cpu host' (the source KVM's "
                    "supported CPUID) can be restored on the destination host by KVM (Linux 6.18) and a "
                    "VMM like QEMU: CPUID features, XCR0/IA32_XSS components, MSRs, xstate size. "
                    "Exit status 0 migratable, 1 not migratable, 2 bad input.")
    for side, what in SIDES.items():
        add_host_options(p, side, what)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def add_host_options(p: argparse.ArgumentParser, side: str, what: str) -> None:
    """The host options of ``cetvm caps``, prefixed with ``--<side>-``."""
    p.add_argument(f"--{side}", required=True, metavar="MODEL|FILE", dest=f"{side}_host",
                   help=f"{what} CPU: built-in model ({', '.join(model_names())}) or a CPUID dump/JSON file")
    p.add_argument(f"--{side}-kernel-cmdline", default="", metavar="STR",
                   help=f"{what} kernel command line, e.g. 'ibt=off' (default empty)")
    p.add_argument(f"--{side}-no-user-shstk", action="store_true",
                   help=f"{what} kernel built without CONFIG_X86_USER_SHADOW_STACK")
    p.add_argument(f"--{side}-supervisor-shstk", action="store_true",
                   help=f"{what} kernel runs with supervisor shadow stacks (KVM refuses to load)")
    p.add_argument(f"--{side}-virt", choices=("vmx", "svm"),
                   help=f"{what} vendor module (default: from the CPU vendor)")
    for flag, help_text in _ON_OFF_OPTIONS:
        p.add_argument(f"--{side}-{flag}", choices=("on", "off"), default="on",
                       help=f"{what} {help_text} (default: on)")
    p.add_argument(f"--{side}-allow-smaller-maxphyaddr", action="store_true",
                   help=f"{what} KVM loaded with kvm.allow_smaller_maxphyaddr=1")


def host_from_args(args: argparse.Namespace, side: str) -> Host:
    """The :class:`Host` described by one side's options (as ``cetvm caps --host ...``)."""
    opt = lambda name: getattr(args, f"{side}_{name}")  # noqa: E731
    return Host.from_model_name(
        opt("host"),
        kernel_cmdline=opt("kernel_cmdline"),
        user_shstk=not opt("no_user_shstk"),
        supervisor_shstk=opt("supervisor_shstk"),
        virt=opt("virt") or "",
        vmx_basic_56=ON_OFF[opt("vmx_basic_56")],
        vmx_load_cet_controls=ON_OFF[opt("load_cet_controls")],
        unrestricted_guest=ON_OFF[opt("unrestricted_guest")],
        tdp=ON_OFF[opt("tdp")],
        allow_smaller_maxphyaddr=opt("allow_smaller_maxphyaddr"),
    )


def format_report(report: MigrationReport) -> str:
    lines = [f"migrate: {report.source} -> {report.destination}", ""]
    if report.findings:
        lines.append(f"{'severity':<9} what / why")
        for f in report.findings:
            lines += [f"{f.severity.value:<9} {f.what}", f"{'':<9}   why: {f.why}"]
    else:
        lines.append("no findings")
    lines.append("")
    if report.migratable:
        warnings = len(report.findings)
        lines.append("verdict: MIGRATABLE" + (f" ({warnings} warning{'s' * (warnings != 1)})" if warnings else ""))
        return "\n".join(lines)
    if report.restricted_cpuid_loses:
        lines.append("a restricted (intersection) guest CPUID would lose:")
        lines += [f"  - {item}" for item in report.restricted_cpuid_loses]
        lines.append("  which " + ("would make the migration possible" if report.restricted_cpuid_suffices
                                   else "is not enough: other blockers remain"))
        lines.append("")
    lines.append(f"verdict: NOT MIGRATABLE ({len(report.blockers)} blocker{'s' * (len(report.blockers) != 1)})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = check_migration(host_from_args(args, "from"), host_from_args(args, "to"))
    print(json.dumps(report.to_json()) if args.json else format_report(report))
    return 0 if report.migratable else 1
