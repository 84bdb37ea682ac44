"""``python -m tests.fuzz [--long] [--examples N] [--area NAME]``: run the fuzz properties.

Without options: the CI slice (derandomized, :data:`tests.fuzz.conftest.CI_EXAMPLES` per area).
``--long``: ≥ 10,000 random inputs per area (``--examples`` changes the count), a fresh seed each
run; hypothesis prints the failing input and a ``@reproduce_failure`` line if the property breaks.
Run from the repository root with the project's Python (``.venv/bin/python -m tests.fuzz --long``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

AREAS = {"cpuid": "test_cpuid_files", "images": "test_boot_images", "manifests": "test_snapshot_manifests",
         "sections": "test_snapshot_sections", "guests": "test_hostile_guests"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="the long run: 10,000 random inputs per area")
    parser.add_argument("--examples", type=int, default=None, help="inputs per area (with --long)")
    parser.add_argument("--area", choices=sorted(AREAS), action="append", help="only this area (repeatable)")
    args = parser.parse_args(argv)
    if args.long:
        os.environ["CETVM_FUZZ_PROFILE"] = "long"
        if args.examples:
            os.environ["CETVM_FUZZ_EXAMPLES"] = str(args.examples)
    here = Path(__file__).resolve().parent
    selected = [f"{here / 'test_fuzz.py'}::{AREAS[a]}" for a in args.area] if args.area else [str(here)]
    started = time.monotonic()
    status = pytest.main(["-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics", *selected])
    print(f"fuzz: {'long' if args.long else 'ci'} run finished in {time.monotonic() - started:.0f} s, "
          f"pytest status {int(status)}", file=sys.stderr)
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main())
