"""Where the test oracles live: ../shared beside the checkout (CI and developers).

Set CETVM_SHARED_DIR to point elsewhere. When the directory is missing, the oracle tests fail
loudly with a message rather than silently collecting nothing: the dumps are the acceptance oracle.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CETVM_SHARED_DIR", REPO / ".." / "shared")).resolve()
DUMPS = SHARED / "data" / "cpuid"


def dump_files() -> list[Path]:
    """Every CPUID dump; raises if the oracle directory is absent (a broken checkout, not a skip)."""
    files = sorted(DUMPS.glob("*.txt"))
    if not files:
        raise RuntimeError(f"no CPUID dumps found in {DUMPS}: clone cetvm beside shared/ or set CETVM_SHARED_DIR")
    return files
