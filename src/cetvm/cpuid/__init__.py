"""CPU models: CPUID tables, dump parsing and leaf queries (layer above :mod:`cetvm.arch`).

Public API: :class:`CpuidModel`, :class:`CpuidEntry`, the loaders :func:`parse_instlatx64`,
:func:`parse_cpuid_raw`, :func:`load_cpuid_file`, and the built-in models
:func:`model_names`, :func:`get_model`, :func:`resolve_model`.
"""

from cetvm.cpuid.model import JSON_FORMAT, CpuidEntry, CpuidModel, is_subleaf_indexed
from cetvm.cpuid.models import HOST_MODEL, get_model, model_names, model_source, resolve_model
from cetvm.cpuid.parse import (
    detect_format,
    load_cpuid_file,
    parse_cpuid_json,
    parse_cpuid_raw,
    parse_cpuid_text,
    parse_instlatx64,
)

__all__ = [
    "JSON_FORMAT", "CpuidEntry", "CpuidModel", "is_subleaf_indexed",
    "detect_format", "load_cpuid_file", "parse_cpuid_json", "parse_cpuid_raw", "parse_cpuid_text",
    "parse_instlatx64", "HOST_MODEL", "get_model", "model_names", "model_source", "resolve_model",
]
