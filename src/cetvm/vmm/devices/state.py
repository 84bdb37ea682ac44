"""Checking device state read back from a snapshot: a bad field is a precise InputError."""

from __future__ import annotations

from typing import Any, Mapping

from cetvm import InputError


def state_field(state: Mapping[str, Any], key: str, device: str) -> Any:
    """``state[key]``, present in a state that is an object (the check every field shares)."""
    if not isinstance(state, Mapping):
        raise InputError(f"{device} state must be an object, got {type(state).__name__}")
    if key not in state:
        raise InputError(f"{device} state has no '{key}'")
    return state[key]


def state_int(state: Mapping[str, Any], key: str, device: str, bits: int = 64) -> int:
    """``state[key]`` as an unsigned integer of at most ``bits`` bits."""
    value = state_field(state, key, device)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{device} state '{key}' must be an integer, got {value!r}")
    if not 0 <= value < (1 << bits):
        raise InputError(f"{device} state '{key}' = {value:#x} does not fit in {bits} bits")
    return value


def state_bool(state: Mapping[str, Any], key: str, device: str) -> bool:
    value = state_field(state, key, device)
    if not isinstance(value, bool):
        raise InputError(f"{device} state '{key}' must be true or false, got {value!r}")
    return value


def state_bytes(state: Mapping[str, Any], key: str, device: str) -> bytes:
    """Bytes stored as a hex string."""
    value = state_field(state, key, device)
    try:
        return bytes.fromhex(value)
    except (TypeError, ValueError):
        raise InputError(f"{device} state '{key}' must be a hex string, got {value!r}") from None
