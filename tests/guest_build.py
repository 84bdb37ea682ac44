"""Guest code for the tests: our own C and assembly under guests/, built by make.

One helper for every test area (boot, cli, kvm_api, vmm loader): an image under guests/build is
(re)built with ``make -s -C <dir> <target>`` when it is missing or older than one of its sources.
Without make or gcc the test is skipped (with the reason); a failing build fails the test with
make's own error output, so a broken guest never hides as a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUESTS = REPO / "guests"
GUEST_BUILD = GUESTS / "build"


def _files(sources: tuple[Path, ...]) -> list[Path]:
    return [f for s in sources for f in ([s] if s.is_file() else s.rglob("*")) if f.is_file()]


def is_stale(target: Path, sources: tuple[Path, ...]) -> bool:
    """The target is missing or older than one of the files (or files under the folders) given."""
    if not target.exists():
        return True
    built = target.stat().st_mtime
    return any(f.stat().st_mtime > built for f in _files(sources))


def make(make_dir: Path, target: str = "all") -> None:
    """``make -s -C make_dir target``: skip without a toolchain, fail with make's output."""
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot build the guests: {' and '.join(missing)} not installed")
    proc = subprocess.run(["make", "-s", "-C", str(make_dir), target], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make -C {make_dir} {target} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def built_guest(relative: str, make_dir: Path, target: str = "all",
                sources: tuple[Path, ...] | None = None) -> Path:
    """guests/build/<relative>, built by ``make -C make_dir target`` when missing or older than
    ``sources`` (default: everything in ``make_dir``)."""
    path = GUEST_BUILD / relative
    if is_stale(path, sources if sources is not None else (make_dir,)):
        make(make_dir, target)
    return path


def tap_kernel(name: str) -> Path:
    """guests/build/tests/<name>.elf, a TAP test kernel (guests/tests/<name>.c + guests/lib),
    built with the other kernels and the demo (guests/Makefile target ``kernels``)."""
    return built_guest(f"tests/{name}.elf", GUESTS, "kernels", (GUESTS / "lib", GUESTS / "tests" / f"{name}.c"))


def demo_kernel() -> Path:
    """guests/build/demo.elf (guests/demo + guests/lib), built with the TAP kernels."""
    return built_guest("demo.elf", GUESTS, "kernels", (GUESTS / "lib", GUESTS / "demo"))
