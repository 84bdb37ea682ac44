"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest

from cli_support import elf64_kernel


@pytest.fixture
def kernel(tmp_path):
    """``kernel(code)``: the path of an ELF64 kernel of ``code`` (64-bit, identity-mapped low 4 GiB)."""
    def make(code: bytes) -> str:
        path = tmp_path / "k.elf"
        path.write_bytes(elf64_kernel(code))
        return str(path)
    return make
