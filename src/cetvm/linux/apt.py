"""Downloading pinned Debian packages with ``apt-get download`` (no root needed once the
package lists exist), and checking them against their pinned SHA-256.

A :data:`Downloader` is any ``(package, directory) -> path of the .deb`` callable, so the
recipe's cache logic can be tested with a fake one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from cetvm.linux.errors import RecipeError
from cetvm.linux.packages import DebPackage

#: ``(package, directory) -> the downloaded .deb`` (inside ``directory``).
Downloader = Callable[[DebPackage, Path], Path]
#: apt's messages when the package lists do not know the package or version (lists missing or
#: stale): as root, ``apt-get update`` and one more try.
UNKNOWN_PACKAGE_MARKERS = ("Unable to locate package", "was not found", "has no installation candidate")
HASH_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(package: DebPackage, deb: Path) -> str:
    """The SHA-256 of ``deb``, which must be the pinned one (else the file is deleted)."""
    actual = sha256_of(deb)
    if actual != package.sha256:
        deb.unlink(missing_ok=True)
        raise RecipeError(f"{package.label}: the download is corrupt or not the pinned package "
                          f"(sha256 {actual}, expected {package.sha256}); deleted it, run again")
    return actual


def _apt_error(output: str) -> str:
    """apt's own complaint: its last ``E:`` line (else the last line)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def _run_apt(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["apt-get", *arguments], cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise RecipeError(f"cannot run apt-get: {exc.strerror or exc}") from None


def apt_get_download(package: DebPackage, directory: Path) -> Path:
    """``apt-get download NAME=VERSION`` into ``directory``; the path of the .deb. When apt does
    not know the package: as root, ``apt-get update`` and retry; otherwise say how to fix it."""
    if shutil.which("apt-get") is None:
        raise RecipeError(f"cannot download {package.label}: apt-get not found (the Linux guest recipe "
                          "downloads Debian packages with apt; run it on Debian or Ubuntu)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".apt-") as scratch:
        work = Path(scratch)
        os.chmod(work, 0o755)  # apt's sandbox user may write here
        proc = _run_apt(["download", "-q", package.spec], work)
        if proc.returncode != 0 and any(m in proc.stderr for m in UNKNOWN_PACKAGE_MARKERS):
            if os.geteuid() != 0:
                raise RecipeError(f"apt does not know {package.spec} ({_apt_error(proc.stderr)}): "
                                  "the package lists are missing or old; run 'sudo apt-get update' first")
            update = _run_apt(["update", "-q"], work)
            if update.returncode != 0:
                raise RecipeError(f"apt-get update failed: {_apt_error(update.stderr + update.stdout)}")
            proc = _run_apt(["download", "-q", package.spec], work)
        if proc.returncode != 0:
            raise RecipeError(f"apt-get download {package.spec} failed: {_apt_error(proc.stderr + proc.stdout)}")
        debs = sorted(work.glob("*.deb"))
        if len(debs) != 1:
            raise RecipeError(f"apt-get download {package.spec} left {len(debs)} .deb files, expected one")
        target = directory / f"{package.name}_{package.version.replace(':', '%3a')}.deb"
        debs[0].replace(target)
    return target
