"""Every CPU test runs on every CET path: the native C hook, the Python hook (its flat common-case
path in front of the reference), and the Python reference alone.

The Vcpu picks its block hook from ``$CETVM_CET_PATH`` (and ``$CETVM_PYTHON_FAST_PATH``) when no
option is given, so the whole suite is parametrized here without touching the tests: ids end in
``[python]``, ``[python-reference]`` or ``[native]``. The native runs are skipped (with the build
command) when libcetfast.so is not built.
"""

from __future__ import annotations

import pytest

from cetvm.cpu.native import native_available


@pytest.fixture(autouse=True, params=["python", "python-reference", "native"])
def cet_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native" and not native_available():
        pytest.skip("native CET fast path not built (python -m cetvm.cpu.native.build)")
    path = "python" if request.param == "python-reference" else request.param
    monkeypatch.setenv("CETVM_CET_PATH", path)
    monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", "0" if request.param == "python-reference" else "1")
    return path
