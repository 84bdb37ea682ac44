"""Build the native CET fast path: ``python -m cetvm.cpu.native.build [--force] [--quiet]``.

(``pip install`` builds the same library at install time: setup.py's build_ext, with
:data:`COMPILE_FLAGS` and :func:`unicorn_include_dir` from here.)

Compiles ``cetfast.c`` with the system C compiler (``$CC``, default ``gcc``) against the Unicorn
headers that ship inside the ``unicorn`` wheel (``unicorn/include``) into ``libcetfast.so`` next
to the source. Idempotent: a stamp file records a hash of the source, the compiler command and
the Unicorn header; nothing is rebuilt when it matches. The library is written to a temporary
file and renamed, so concurrent builds never leave a half-written library. The .so is not linked
against libunicorn: it receives Unicorn's function pointers from the Python binding at run time
(so it uses the same libunicorn instance as the ``Uc`` object).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cetvm import CetvmError

NATIVE_DIR = Path(__file__).resolve().parent
SOURCE = NATIVE_DIR / "cetfast.c"
LIBRARY = NATIVE_DIR / "libcetfast.so"
STAMP = NATIVE_DIR / "libcetfast.so.stamp"
#: Compiler flags of cetfast.c, here and in the install-time build (setup.py's build_ext).
COMPILE_FLAGS = ("-O2", "-fPIC", "-Wall", "-Wextra", "-fno-strict-aliasing", "-fvisibility=default")
CFLAGS = (*COMPILE_FLAGS, "-shared")


def unicorn_include_dir() -> Path:
    """The C headers shipped in the installed unicorn wheel."""
    import unicorn

    include = Path(unicorn.__file__).resolve().parent / "include"
    if not (include / "unicorn" / "unicorn.h").is_file():
        raise CetvmError(f"the installed unicorn package has no C headers at {include}; reinstall unicorn==2.1.4")
    return include


def compiler() -> str:
    """The C compiler to use: $CC or gcc, which must be on PATH."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(shlex.split(cc)[0]) is None:
        raise CetvmError(f"C compiler '{cc}' not found: install gcc (e.g. apt-get install gcc) to build the "
                         "native CET fast path, or run with --cet-path python")
    return cc


def compile_command(cc: str, include: Path, output: Path) -> list[str]:
    return [*shlex.split(cc), *CFLAGS, f"-I{include}", str(SOURCE), "-o", str(output)]


def build_fingerprint(cc: str, include: Path) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(compile_command(cc, include, LIBRARY)).encode())
    digest.update((include / "unicorn" / "unicorn.h").read_bytes())
    return digest.hexdigest()


def is_up_to_date(fingerprint: str) -> bool:
    return LIBRARY.is_file() and STAMP.is_file() and STAMP.read_text().strip() == fingerprint


def build(force: bool = False) -> Path:
    """Compile the library if needed and return its path (raises CetvmError on failure)."""
    cc = compiler()
    include = unicorn_include_dir()
    fingerprint = build_fingerprint(cc, include)
    if not force and is_up_to_date(fingerprint):
        return LIBRARY
    fd, tmp_name = tempfile.mkstemp(prefix=".libcetfast-", suffix=".so", dir=NATIVE_DIR)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        result = subprocess.run(compile_command(cc, include, tmp), capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or ["(no output)"]
            first = next((line for line in lines if "error" in line), lines[0])
            raise CetvmError(f"building the native CET fast path failed: {first}")
        os.replace(tmp, LIBRARY)
    finally:
        tmp.unlink(missing_ok=True)
    STAMP.write_text(fingerprint + "\n")
    return LIBRARY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cetvm.cpu.native.build",
                                     description="Build the native CET fast path (libcetfast.so).")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except CetvmError as err:
        print(f"cetvm: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"native CET fast path: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
