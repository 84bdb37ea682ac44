"""Install-time build of cetvm's native CET hook (PEP 517 through setuptools; metadata in
pyproject.toml).

``pip install .``, the wheel and the sdist (which carries the C source) compile
``src/cetvm/cpu/native/cetfast.c`` into ``cetvm/cpu/native/libcetfast.so`` — a plain shared
library that cetvm loads with ctypes, not a Python extension module — against the C headers of
the ``unicorn`` wheel (a build requirement). The build is optional: without a C compiler the
install still succeeds and cetvm runs on its Python CET layer, saying so in one line at run time
(:func:`cetvm.cpu.native.select_cet_path`). ``make`` builds the same library in place with
``python -m cetvm.cpu.native.build``; both use its flags.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
NATIVE = Path("src", "cetvm", "cpu", "native")


def _native_build_module():
    """cetvm.cpu.native.build, loaded from the source tree without importing the package (its
    only cetvm import is the dependency-free top-level ``cetvm``)."""
    sys.path.insert(0, str(HERE / "src"))
    spec = importlib.util.spec_from_file_location("cetvm_native_build", HERE / NATIVE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


native_build = _native_build_module()


class BuildNativeHook(build_ext):
    """build_ext for the ctypes library: Unicorn's headers, and the file name the loader expects
    (``libcetfast.so``, no Python ABI tag)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            ext.include_dirs.append(str(native_build.unicorn_include_dir()))
        except Exception as err:  # reported as a failed optional build, never a failed install
            raise CompileError(str(err)) from err
        super().build_extension(ext)

    def get_ext_filename(self, fullname: str) -> str:
        *package, name = fullname.split(".")
        return str(Path(*package, f"{name}.so"))

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # no PyInit_ function: it is not an extension module


setup(
    ext_modules=[Extension("cetvm.cpu.native.libcetfast", sources=[str(NATIVE / "cetfast.c")],
                           extra_compile_args=list(native_build.COMPILE_FLAGS), optional=True)],
    cmdclass={"build_ext": BuildNativeHook},
)
