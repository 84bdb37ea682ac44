"""Where the test oracles live: ../shared beside the checkout (CI and developers).

Set CETVM_SHARED_DIR to point elsewhere. When the directory is missing (a clone somewhere on its
own), the tests that need the dumps are skipped with a message naming the directory looked in,
so a lone clone's `make test` still runs everything else; CI and developers have shared/ beside
the checkout and run them all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CETVM_SHARED_DIR", REPO / ".." / "shared")).resolve()
DUMPS = SHARED / "data" / "cpuid"


def dump_files() -> list[Path]:
    """Every CPUID dump; without the oracle directory the calling test module is skipped."""
    files = sorted(DUMPS.glob("*.txt"))
    if not files:
        pytest.skip(f"no CPUID dumps in {DUMPS} (the oracle lives in shared/ beside the checkout; set "
                    "CETVM_SHARED_DIR to point elsewhere)", allow_module_level=True)
    return files


def dump(name: str) -> Path:
    """One CPUID dump of the oracle by file name; without it the test (or, called at import, the
    whole module) is skipped."""
    path = DUMPS / name
    if not path.is_file():
        pytest.skip(f"no CPUID dump {path} (the oracle lives in shared/ beside the checkout; set "
                    "CETVM_SHARED_DIR to point elsewhere)", allow_module_level=True)
    return path
