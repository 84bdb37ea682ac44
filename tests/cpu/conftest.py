"""Every CPU test runs on both CET paths: the native fast path and the Python reference hook.

The Vcpu picks its block hook from ``$CETVM_CET_PATH`` when no ``cet_path`` is given, so the
whole suite is parametrized here without touching the tests: ids end in ``[python]`` or
``[native]``. The native runs are skipped (with the build command) when libcetfast.so is not built.
"""

from __future__ import annotations

import pytest

from cetvm.cpu.native import native_available


@pytest.fixture(autouse=True, params=["python", "native"])
def cet_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native" and not native_available():
        pytest.skip("native CET fast path not built (python -m cetvm.cpu.native.build)")
    monkeypatch.setenv("CETVM_CET_PATH", request.param)
    return request.param
