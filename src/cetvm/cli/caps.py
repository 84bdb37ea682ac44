"""`cetvm caps`: what KVM (Linux 6.18) would offer guests on a host, and why.

Prints the SHSTK/IBT decision with the first KVM rule that cleared each one, the supported
XCR0/XSS, the guest xstate sizes, SMM (KVM_CAP_X86_SMM, and whether the SSP is saved in SMRAM),
the IA32_ARCH_CAPABILITIES value KVM gives guests and KVM_GET_MSR_INDEX_LIST; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json

from cetvm.arch.msr import ArchCapabilities
from cetvm.arch.xfeatures import xfeature_name
from cetvm.cpuid import model_names
from cetvm.kvm.caps import KvmCaps, kvm_caps_for_host, msr_name
from cetvm.kvm.host import Host
from cetvm.kvm.msr import kvm_get_arch_capabilities
from cetvm.kvm.nested_caps import nested_cet_offer
from cetvm.kvm.smm import kvm_smm_caps
from cetvm.kvm.xstate_size import host_fpu

ON_OFF = {"on": True, "off": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("caps", help="show what KVM would offer guests on a host (CET focus)",
                              description="What KVM (Linux 6.18) would offer guests on a host, and why: the SHSTK/IBT "
                                          "decision with the KVM rule that cleared each one, the supported "
                                          "XCR0/XSS, the guest xstate sizes and KVM_GET_MSR_INDEX_LIST. "
                                          "Exit status 1 when KVM would refuse to load on the host.")
    p.add_argument("--host", default="sapphire-rapids", metavar="MODEL|FILE",
                   help=f"built-in CPU model ({', '.join(model_names())}; 'host' is this machine) or a "
                        "CPUID dump/JSON file (default: sapphire-rapids)")
    p.add_argument("--kernel-cmdline", default="", metavar="STR", help="host kernel command line, e.g. 'ibt=off' (default empty)")
    p.add_argument("--no-user-shstk", action="store_true", help="host kernel built without CONFIG_X86_USER_SHADOW_STACK (default: with it)")
    p.add_argument("--supervisor-shstk", action="store_true", help="host kernel runs with supervisor shadow stacks: KVM refuses to load, exit status 1 "
                        "(default: off, as Linux)")
    p.add_argument("--virt", choices=("vmx", "svm"), help="vendor module (default: from the CPU vendor)")
    for flag, what in (("--vmx-basic-56", "IA32_VMX_BASIC[56]"),
                       ("--load-cet-controls", "VMX load-CET-state entry/exit controls"),
                       ("--unrestricted-guest", "VMX unrestricted guest"),
                       ("--tdp", "EPT/NPT (off = shadow paging)"),
                       ("--nested", "kvm_intel nested=1 (nested VMX for L1 hypervisors)")):
        p.add_argument(flag, choices=("on", "off"), default="on", help=f"{what} (default: on)")
    p.add_argument("--allow-smaller-maxphyaddr", action="store_true", help="load KVM with kvm.allow_smaller_maxphyaddr=1 (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys listed in README.md) instead of text")
    p.set_defaults(func=run)


def host_from_args(args: argparse.Namespace) -> Host:
    return Host.from_model_name(
        args.host,
        kernel_cmdline=args.kernel_cmdline,
        user_shstk=not args.no_user_shstk,
        supervisor_shstk=args.supervisor_shstk,
        virt=args.virt or "",
        vmx_basic_56=ON_OFF[args.vmx_basic_56],
        vmx_load_cet_controls=ON_OFF[args.load_cet_controls],
        unrestricted_guest=ON_OFF[args.unrestricted_guest],
        tdp=ON_OFF[args.tdp],
        allow_smaller_maxphyaddr=args.allow_smaller_maxphyaddr,
        nested=ON_OFF[getattr(args, "nested", "on")],
    )


def caps_to_json(caps: KvmCaps) -> dict[str, object]:
    host = caps.host
    return {
        "host": host.name,
        "vendor": host.vendor,
        "virt": host.virt,
        "features": {name: d.to_json() for name, d in caps.cet.items()},
        "supported_xcr0": caps.supported_xcr0,
        "supported_xss": caps.supported_xss,
        "guest_xstate_size": caps.guest_xstate_size(),
        "msr_index_list": caps.get_msr_index_list(),
        "guest_fpu_default": _guest_fpu(caps),
        "nested": nested_cet_offer(caps).to_json(),
        "smm": kvm_smm_caps(caps).to_json(),
        "arch_capabilities": kvm_get_arch_capabilities(host),
    }


def _guest_fpu(caps: KvmCaps) -> dict[str, int]:
    """The host kernel's guest_default_cfg (guest FPU buffer before any AMX permission)."""
    cfg = host_fpu(caps.host).guest_default_cfg
    return {"features": cfg.features, "size": cfg.size}


def _components(mask: int) -> str:
    names = [xfeature_name(i) for i in range(64) if mask >> i & 1]
    return ", ".join(names) if names else "none"


def _smm_lines(caps: KvmCaps) -> list[str]:
    smm = kvm_smm_caps(caps)
    return ["", f"SMM (KVM_CAP_X86_SMM): {'yes' if smm.supported else 'no'}; SSP saved in SMRAM: "
                f"{'yes' if smm.ssp_in_smram else 'no'}", f"  {smm.why}"]


def _arch_capabilities_lines(caps: KvmCaps) -> list[str]:
    value = kvm_get_arch_capabilities(caps.host)
    names = [bit.name for bit in ArchCapabilities if value & bit]
    return ["", f"IA32_ARCH_CAPABILITIES (emulated, CPUID.(7,0).EDX[29] always shown): {value:#x}",
            f"  {', '.join(names) if names else 'none'} (RDCL_NO: the guest needs no page-table isolation)"]


def format_caps(caps: KvmCaps) -> str:
    host = caps.host
    lines = [f"host: {host.name} ({host.vendor}, {host.virt.upper()})", "",
             f"{'feature':<8} {'offered':<8} why"]
    for name, d in caps.cet.items():
        lines.append(f"{name.upper():<8} {'yes' if d.offered else 'no':<8} {d.reason}")
    sizes = caps.guest_xstate_size()
    lines += ["",
              f"supported XCR0: {caps.supported_xcr0:#x} ({_components(caps.supported_xcr0)})",
              f"supported XSS:  {caps.supported_xss:#x} ({_components(caps.supported_xss)})",
              f"guest xstate size: standard {sizes['standard']} bytes, compacted {sizes['compacted']} bytes",
              *_smm_lines(caps),
              *_arch_capabilities_lines(caps),
              ""]
    lines += _nested_lines(caps) + ["", "KVM_GET_MSR_INDEX_LIST:"]
    lines += [f"  {index:#010x}  {msr_name(index)}" for index in caps.get_msr_index_list()]
    return "\n".join(lines)


def _nested_lines(caps: KvmCaps) -> list[str]:
    offer = nested_cet_offer(caps)
    yes = {True: "yes", False: "no"}
    lines = [f"nested VMX: {yes[offer.enabled]} ({offer.reason})"]
    if offer.enabled:
        why56 = ("as the host: L1 may inject #CP and other hardware exceptions into L2 with or without an "
                 "error code" if offer.vmx_basic_56 else "the host lacks it: injected error codes must match "
                 "the vector (and KVM offers no CET)")
        lines += [f"  IA32_VMX_BASIC[56] for L1: {yes[offer.vmx_basic_56]} ({why56})",
                  f"  load-CET-state entry/exit controls for L1: {yes[offer.load_cet_controls]} "
                  f"({offer.load_cet_reason})",
                  f"  vmcs12 GUEST/HOST_S_CET, _SSP, _INTR_SSP_TABLE: {yes[offer.vmcs12_cet_fields]} "
                  "(exist when the host VMX has the load-CET-state controls)"]
    return lines


def run(args: argparse.Namespace) -> int:
    caps = kvm_caps_for_host(host_from_args(args))
    print(json.dumps(caps_to_json(caps)) if args.json else format_caps(caps))
    return 0
