"""The native fast path's Python interface: build entry point, path selection, block table."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

import cetvm.cpu.native as native
from cetvm import CetvmError, InputError
from cetvm.cpu.blocks import BlockInfo
from cetvm.cpu.cet.transfer import Terminator, TerminatorInfo
from cetvm.cpu.native import build

needs_native = pytest.mark.skipif(not native.native_available(), reason="native CET fast path not built")


def test_build_is_idempotent():
    build.build()
    before = build.LIBRARY.stat().st_mtime_ns
    result = subprocess.run([sys.executable, "-m", "cetvm.cpu.native.build", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert build.LIBRARY.stat().st_mtime_ns == before


def test_missing_compiler_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc-for-cetvm-test")
    with pytest.raises(CetvmError, match="not found: install gcc"):
        build.build(force=True)
    env = dict(os.environ, CC="/nonexistent/cc-for-cetvm-test")
    result = subprocess.run([sys.executable, "-m", "cetvm.cpu.native.build", "--force"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_select_cet_path(monkeypatch):
    assert native.select_cet_path("python") == "python"
    with pytest.raises(InputError):
        native.select_cet_path("fast")
    monkeypatch.setattr(native, "native_available", lambda: False)
    notice = io.StringIO()
    assert native.select_cet_path("auto", notice) == "python"
    assert len(notice.getvalue().splitlines()) == 1 and "Python CET layer" in notice.getvalue()


@needs_native
def test_select_cet_path_prefers_native_when_built():
    notice = io.StringIO()
    assert native.select_cet_path("auto", notice) == "native"
    assert native.select_cet_path("native", notice) == "native"
    assert notice.getvalue() == ""


@needs_native
def test_block_tracker_round_trip_and_pending_terminator():
    cet = native.NativeCet(Uc(UC_ARCH_X86, UC_MODE_64), lambda address, size: False)
    blocks = cet.blocks
    ret = TerminatorInfo(Terminator.RET_IMM, 0x1010, 3, 0x18)
    for i in range(3000):  # forces the table to grow
        blocks.store(BlockInfo(0x1000 + 16 * i, 16, ret, b"\xf3\x0f\x1e\xfa"))
    assert len(blocks) == 3000
    info = blocks.lookup(0x1000, 16)
    assert info == BlockInfo(0x1000, 16, ret, b"\xf3\x0f\x1e\xfa")
    assert blocks.lookup(0x1000, 17) is None  # same address, other size: a different block
    call = TerminatorInfo(Terminator.CALL_INDIRECT, 0x2000, 2)
    assert blocks.take_prev(call) is None
    assert blocks.prev == call
    assert blocks.take_prev(None) == call and blocks.prev is None
    blocks.invalidate()
    assert len(blocks) == 0 and blocks.lookup(0x1000, 16) is None


@needs_native
def test_cet_state_is_shared_with_the_hook():
    cet = native.NativeCet(Uc(UC_ARCH_X86, UC_MODE_64), lambda address, size: False)
    state = cet.cet_state
    state.ssp, state.u_cet, state.s_cet = 0x7FF8, 0x5, 0x804
    assert (cet.shared.ssp, cet.shared.u_cet, cet.shared.s_cet) == (0x7FF8, 0x5, 0x804)
    state.pl_ssp[3] = 0x9000
    assert state.pl_ssp == [0, 0, 0, 0x9000]


@needs_native
def test_tlb_split_and_exit_filter_find_unicorn_2_1_4s_layout():
    """Both rely on Unicorn 2.1.4's internals, found and checked at run time: a Unicorn whose
    layout differs must make them refuse (a slower engine), and the pinned one must accept them
    (else RWX pages and exits silently lose their speed)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    cet = native.NativeCet(uc, lambda address, size: False)
    assert not cet.split_tlb()  # no fetched-page bitmap yet: refused, nothing changed
    cet.install_tlb_fill(set_mode=False)
    assert cet.split_tlb()
    assert cet.split_tlb()  # idempotent
    assert cet.filter_exit_invalidation()


def test_vcpu_falls_back_to_python_with_a_notice_when_not_built(monkeypatch, capsys, tmp_path):
    from cetvm import NotSupportedError
    from cetvm.cpu.native import loader
    from cetvm.cpu.vcpu import Vcpu
    from cetvm.cpuid import get_model

    monkeypatch.setattr(loader, "LIBRARY_PATH", tmp_path / "libcetfast.so")
    monkeypatch.delenv("CETVM_CET_PATH", raising=False)
    vcpu = Vcpu(get_model("sapphire-rapids"))
    assert vcpu.cet_path == "python"
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "native CET fast path not built" in err
    with pytest.raises(NotSupportedError, match="python -m cetvm.cpu.native.build"):
        Vcpu(get_model("sapphire-rapids"), cet_path="native")
    assert Vcpu(get_model("sapphire-rapids"), trace=False).cet_path == "off"
