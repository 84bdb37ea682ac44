"""Built-in CPU models by name, the "host" model, and resolving a CLI ``MODEL|FILE`` spec."""

from __future__ import annotations

import difflib
from pathlib import Path

from cetvm import InputError
from cetvm.arch.msr import ArchCapabilities
from cetvm.cpuid.builtin_data import MODEL_ROWS, SOURCES
from cetvm.cpuid.model import CpuidModel
from cetvm.cpuid.host import read_host_model
from cetvm.cpuid.parse import load_cpuid_file

#: The model read from this machine's CPU (see :mod:`cetvm.cpuid.host`).
HOST_MODEL = "host"

_A = ArchCapabilities
_NOT_AFFECTED_ICX = _A.RDCL_NO | _A.IBRS_ALL | _A.SKIP_L1DFL_VMENTRY | _A.MDS_NO | _A.IF_PSCHANGE_MC_NO | _A.TAA_NO
#: IA32_ARCH_CAPABILITIES of the built-in Intel models (CPUID dumps do not carry MSRs). Decision,
#: from Intel's affected-processor tables: Ice Lake and later are not susceptible to Meltdown,
#: MDS or TAA (Sapphire/Emerald Rapids and Alder Lake not to the MMIO stale-data, GDS and RFDS
#: issues either); Skylake-SP predates the MSR (0: susceptible to all). AMD models: no MSR (0).
ARCH_CAPABILITIES: dict[str, int] = {
    "sapphire-rapids": int(_NOT_AFFECTED_ICX | _A.SBDR_SSDP_NO | _A.FBSDP_NO | _A.PSDP_NO | _A.GDS_NO | _A.RFDS_NO),
    "emerald-rapids": int(_NOT_AFFECTED_ICX | _A.SBDR_SSDP_NO | _A.FBSDP_NO | _A.PSDP_NO | _A.GDS_NO | _A.RFDS_NO),
    "alder-lake": int(_NOT_AFFECTED_ICX | _A.SBDR_SSDP_NO | _A.FBSDP_NO | _A.PSDP_NO | _A.GDS_NO),
    "tiger-lake": int(_NOT_AFFECTED_ICX),
    "ice-lake": int(_NOT_AFFECTED_ICX),
    "skylake-sp": 0,
}


def arch_capabilities(name: str) -> int:
    """IA32_ARCH_CAPABILITIES of the CPU model ``name`` (0 for AMD models, dump files and the
    host model, whose MSR cetvm cannot read: treated as susceptible to everything)."""
    return ARCH_CAPABILITIES.get(name, 0)


def model_names() -> list[str]:
    """Names accepted by :func:`get_model`: the built-in models, then "host"."""
    return [*MODEL_ROWS, HOST_MODEL]


def model_source(name: str) -> str:
    """Where a built-in model's register values come from (an InstLatx64 file, or the CPU)."""
    if name == HOST_MODEL:
        return "this machine's CPUID instruction"
    _check_name(name)
    return f"InstLatx64 {SOURCES[name]} (logical CPU #0)"


def get_model(name: str) -> CpuidModel:
    """A fresh CpuidModel for built-in model ``name`` (or "host"); unknown → InputError."""
    if name == HOST_MODEL:
        return read_host_model()
    _check_name(name)
    model = CpuidModel(name)
    for row in MODEL_ROWS[name]:
        model.set(*row)
    return model


def resolve_model(spec: str) -> CpuidModel:
    """A built-in model name, or a path to a dump file (InstLatx64, ``cpuid -r`` or JSON).

    Names win over files; a spec that is neither names both the file and the known models.
    """
    if spec in MODEL_ROWS or spec == HOST_MODEL:
        return get_model(spec)
    path = Path(spec)
    if path.exists():
        return load_cpuid_file(path)
    raise InputError(f"{spec!r} is neither a CPU model ({', '.join(model_names())}) "
                     f"nor an existing dump file{_suggest(spec)}")


def _check_name(name: str) -> None:
    if name not in MODEL_ROWS:
        raise InputError(f"unknown CPU model {name!r}{_suggest(name)}; "
                         f"known: {', '.join(model_names())}")


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, model_names(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""
