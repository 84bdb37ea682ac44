"""The machine snapshot manifest's schema: one validation of every field, before anything is built.

A snapshot is user input: its CRCs only prove that the file is what was written, not that what
was written (or edited, with the CRCs recomputed) is a machine cetvm can run. So a manifest is
checked once, here, against the types, required keys and ranges below, and the first problem is
an :class:`~cetvm.InputError` naming the field (``snapshot vcpus[0].regs.rip = 0x40...: not a
64-bit value``); on the command line that is one ``cetvm: error:`` line, exit status 2. Nothing
downstream sees a value of the wrong type, a missing register or a number the hardware cannot
hold (no silent truncation of RIP 2^70 to 0).

What is checked here is what the *format* promises (shape and width of each field, and the bits a
register can hold at all); what KVM accepts for a value of the right shape (CR0.PG without PE,
an XCR0 the CPU lacks, a CET MSR's reserved bits) stays KVM's to refuse when the state is put
back (:mod:`cetvm.vmm.snapshot_io`), and each device checks its own registers
(:mod:`cetvm.vmm.devices.state`).

=====================  ==============================================================
field                  rule
=====================  ==============================================================
kind                   "cetvm-machine"
machine                object: memory (int), cet (str), cmdline (str), modules (list of
                       str), and either cpu (built-in model name) or cpu_model (CPUID
                       JSON object) with an optional host object
run                    instructions, exits, halted_ns: 0..2^64-1
vcpus                  a list of machine.smp (1..8) vCPU states
vcpus[0].regs          every general-purpose register, rip and rflags: 0..2^64-1
vcpus[0].sregs         segments {selector 16 bits, base 64, limit 32, attributes 32
                       bits (the engine's segment-cache flags)}; gdt/idt {base 64 bits,
                       limit 16}; cr0, cr2, cr3, cr4: 64 bits; efer: only SCE, LME, LMA,
                       NXE (the EFER bits the CPU implements)
vcpus[0].xcrs          at most 16 pairs [index 32 bits, value 64 bits]
vcpus[0].msrs          at most 1024 entries "0xINDEX" (32-bit index) -> 64-bit value;
                       IA32_EFER as sregs.efer
vcpus[0] others        fpstate_xstate_bv 64 bits; guest_ssp null or 64 bits; mp_state a
                       KVM_MP_STATE name; events null or {vector 0..31, error_code null or
                       32 bits}; smi null or {smm, pending, smm_inside_nmi,
                       latched_init: booleans}; nmi null or {injected, masked: booleans,
                       pending 0..255}; nested null or KVM_GET_NESTED_STATE {vmxon_pa,
                       vmcs12_pa, vmcs12 (hex), guest_mode, pre_vmenter_s_cet/ssp/ssp_tbl}
devices                serial, shutdown, fw_cfg, pic (objects), lapics (one per vCPU), and
                       ioapic, pit, pm1, irq_lines, apm (objects; absent in snapshots of a cetvm
                       before the interrupt platform: those devices restore in their reset
                       state); each device checks its own fields
ram                    the machine's RAM regions, as the memory size implies
=====================  ==============================================================

Unknown keys are refused too: a field cetvm would ignore is a field the user thinks matters.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Callable, Mapping

from cetvm import InputError
from cetvm.arch.msr import Efer, Msr
from cetvm.kvm.api import KVM_MAX_VCPUS as MAX_VCPUS, MpState, Regs
from cetvm.vmm.layout import check_ram_size

#: A check of one value at a labelled place; raises InputError.
Check = Callable[[Any, str], None]

SNAPSHOT_KIND = "cetvm-machine"
MAX_XCRS = 16
MAX_MSRS = 1024
MAX_STRING = 1 << 20
MAX_MODULES = 256
_MSR_KEY = re.compile(r"0x[0-9a-f]{1,8}")
_EFER_BITS = int(Efer.SCE | Efer.LME | Efer.LMA | Efer.NXE)
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def refuse(where: str, value: Any, why: str) -> InputError:
    """The one error format: ``snapshot WHERE = VALUE is refused: WHY``."""
    shown = (f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool)
             else f"a list of {len(value)}" if isinstance(value, list)
             else "an object" if isinstance(value, Mapping) else f"{value!r:.60}")
    return InputError(f"snapshot {where} = {shown} is refused: {why}")


# --------------------------------------------------------------------------- leaf checks
def unsigned(bits: int) -> Check:
    """An integer (not a bool) in 0..2^bits-1."""
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse(where, value, "not an integer")
        if not 0 <= value < 1 << bits:
            raise refuse(where, value, f"not a {bits}-bit value (0..{(1 << bits) - 1:#x})")
    return check


def only_bits(mask: int, what: str) -> Check:
    """A 64-bit integer with no bit outside ``mask``."""
    def check(value: Any, where: str) -> None:
        unsigned(64)(value, where)
        if value & ~mask:
            raise refuse(where, value, f"bits {value & ~mask:#x} are not {what} ({mask:#x})")
    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or value not in choices:
            raise refuse(where, value, f"expected one of {', '.join(map(str, choices))}")
    return check


def text(max_len: int = MAX_STRING) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise refuse(where, value, "not a string")
        if len(value) > max_len:
            raise refuse(where, value, f"longer than {max_len} characters")
    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise refuse(where, value, "not true or false")


def nullable(check: Check) -> Check:
    def maybe(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)
    return maybe


def any_object(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise refuse(where, value, "not an object")


# --------------------------------------------------------------------------- structure
def _child(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def obj(required: Mapping[str, Check], optional: Mapping[str, Check] | None = None) -> Check:
    """An object with every ``required`` key, any ``optional`` one, and nothing else."""
    optional = optional or {}

    def check(value: Any, where: str) -> None:
        if not isinstance(value, Mapping):
            raise refuse(where, value, "not an object")
        for key, sub in required.items():
            if key not in value:
                raise InputError(f"snapshot {where + ' ' if where else ''}has no '{key}'")
            sub(value[key], _child(where, key))
        for key, sub in optional.items():
            if key in value:
                sub(value[key], _child(where, key))
        unknown = sorted(set(value) - set(required) - set(optional), key=str)
        if unknown:
            raise InputError(f"snapshot {where + ' ' if where else ''}has unknown field {unknown[0]!r:.60}")
    return check


def list_of(item: Check, min_len: int, max_len: int) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list):
            raise refuse(where, value, "not a list")
        if not min_len <= len(value) <= max_len:
            raise refuse(where, value, f"expected {min_len}..{max_len} entries, got {len(value)}")
        for i, element in enumerate(value):
            item(element, f"{where}[{i}]")
    return check


def pair(first: Check, second: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) != 2:
            raise refuse(where, value, "not a pair [index, value]")
        first(value[0], f"{where}[0]")
        second(value[1], f"{where}[1]")
    return check


# --------------------------------------------------------------------------- the vCPU
#: A segment's attributes are (the attribute bits of) a descriptor's high dword: 32 bits. The CPU
#: keeps what the guest's descriptor held there (limit 19:16, for a TSS even base bits), so no
#: narrower mask is a format rule.
SEGMENT = obj({"selector": unsigned(16), "base": unsigned(64), "limit": unsigned(32), "attributes": unsigned(32)})
DESCRIPTOR_TABLE = obj({"base": unsigned(64), "limit": unsigned(16)})
EFER = only_bits(_EFER_BITS, "EFER bits cetvm's CPU implements: SCE, LME, LMA, NXE")
REGS = obj({f.name: unsigned(64) for f in fields(Regs)})
SREGS = obj({**{name: SEGMENT for name in _SEGMENTS}, "gdt": DESCRIPTOR_TABLE, "idt": DESCRIPTOR_TABLE,
             "cr0": unsigned(64), "cr2": unsigned(64), "cr3": unsigned(64), "cr4": unsigned(64), "efer": EFER})


def msr_table(value: Any, where: str) -> None:
    """``{"0xINDEX": value}``: lower-case hex keys of 32-bit indexes, 64-bit values, EFER's bits."""
    any_object(value, where)
    if len(value) > MAX_MSRS:
        raise refuse(where, f"{len(value)} entries", f"more than {MAX_MSRS} MSRs")
    for key, data in value.items():
        if not isinstance(key, str) or not _MSR_KEY.fullmatch(key):
            raise InputError(f"snapshot {where} has key {key!r:.40}: expected an MSR index like '0x6a0'")
        check = EFER if int(key, 16) == Msr.IA32_EFER else unsigned(64)
        check(data, f"{where}.{key}")


EVENT = obj({"vector": unsigned(5)}, {"error_code": nullable(unsigned(32))})
#: KVM_GET_NESTED_STATE (cetvm.kvm.nested_state.NestedState.to_json); KVM_SET_NESTED_STATE checks
#: the values themselves.
NESTED = obj({"vmxon_pa": unsigned(64), "vmcs12_pa": unsigned(64), "vmcs12": text(16384), "guest_mode": boolean},
             {"pre_vmenter_s_cet": unsigned(64), "pre_vmenter_ssp": unsigned(64), "pre_vmenter_ssp_tbl": unsigned(64),
              "irq_for_l1": nullable(unsigned(8))})
SMI = obj({"smm": boolean, "pending": boolean, "smm_inside_nmi": boolean, "latched_init": boolean})
NMI = obj({"injected": boolean, "pending": unsigned(8), "masked": boolean})
VCPU = obj(
    {"regs": REGS, "sregs": SREGS, "xcrs": list_of(pair(unsigned(32), unsigned(64)), 0, MAX_XCRS),
     "msrs": msr_table, "mp_state": one_of(*(m.name for m in MpState))},
    {"fpstate_xstate_bv": unsigned(64), "guest_ssp": nullable(unsigned(64)), "events": nullable(EVENT),
     "smi": nullable(SMI), "nmi": nullable(NMI), "tsc_offset": unsigned(64), "nested": nullable(NESTED)},
)


# --------------------------------------------------------------------------- the machine
HOST = obj({}, {"kernel_cmdline": text(4096), "user_shstk": boolean, "kernel_ibt": boolean,
                "virt": one_of("vmx", "svm")})
def ram_size(value: Any, where: str) -> None:
    """A RAM size cetvm can build (:func:`cetvm.vmm.layout.check_ram_size`)."""
    unsigned(64)(value, where)
    try:
        check_ram_size(value)
    except InputError as exc:
        raise refuse(where, value, str(exc)) from None


def vcpu_count(value: Any, where: str) -> None:
    """A machine's vCPU count, 1..MAX_VCPUS."""
    unsigned(8)(value, where)
    if not 1 <= value <= MAX_VCPUS:
        raise refuse(where, value, f"a cetvm machine has 1 to {MAX_VCPUS} vCPUs")


MACHINE_FIELDS = obj({"memory": ram_size, "cet": text(16)},
                     {"cmdline": text(), "modules": list_of(text(4096), 0, MAX_MODULES), "cpu": text(256),
                      "cpu_model": any_object, "host": HOST, "force_emulation_prefix": boolean,
                      "smp": vcpu_count, "guest_cpu": text(4096), "wall_clock": unsigned(64)})


def machine(value: Any, where: str) -> None:
    """The machine config: its fields, and exactly one of ``cpu`` / ``cpu_model``."""
    MACHINE_FIELDS(value, where)
    if ("cpu" in value) == ("cpu_model" in value):
        raise InputError(f"snapshot {where} must have exactly one of 'cpu' (a built-in model) and "
                         "'cpu_model' (a CPUID table)")
    if "host" in value and "cpu_model" not in value:
        raise InputError(f"snapshot {where}.host needs {where}.cpu_model")



def vcpus(value: Any, where: str) -> None:
    """A list of 1..MAX_VCPUS vCPU states (their number is checked against machine.smp)."""
    list_of(VCPU, 1, MAX_VCPUS)(value, where)


DEVICES = obj({"serial": any_object, "shutdown": any_object, "fw_cfg": any_object, "pic": any_object,
               "lapics": list_of(any_object, 1, MAX_VCPUS)},
              {"rtc": any_object, "ioapic": any_object, "pit": any_object, "pm1": any_object,
                "irq_lines": any_object, "apm": any_object})
RUN = obj({"instructions": unsigned(64)}, {"exits": unsigned(64), "halted_ns": unsigned(64), "kvmclock": unsigned(64),
                                           "scheduler": any_object})
RAM_REGION = obj({"addr": unsigned(64), "size": unsigned(64), "section": text(64)})
MANIFEST = obj({"kind": one_of(SNAPSHOT_KIND), "machine": machine, "run": RUN,
                "vcpus": vcpus, "devices": DEVICES},
               {"ram": list_of(RAM_REGION, 1, 8)})


def check_machine_manifest(manifest: Any) -> None:
    """InputError naming the first field of a machine snapshot manifest that breaks the schema
    (module docstring). A manifest of another kind is refused by its kind first."""
    if isinstance(manifest, Mapping) and manifest.get("kind") != SNAPSHOT_KIND:
        raise InputError(f"not a cetvm machine snapshot (kind {manifest.get('kind')!r:.60})")
    MANIFEST(manifest, "")
    smp = manifest["machine"].get("smp", 1)
    if len(manifest["vcpus"]) != smp:
        raise InputError(f"snapshot vcpus: the machine has {smp} vCPU(s) but the snapshot holds "
                         f"{len(manifest['vcpus'])} vCPU states")
