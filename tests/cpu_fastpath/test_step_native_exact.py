"""Instructions cetvm lets Unicorn execute alone (INVLPG here) run exactly one instruction: the
RET right after an INVLPG is still shadow-stack checked, on every CET path.

f returns normally once; on the second call it makes the shadow-stack page an ordinary writable
page, INVLPGs it and RETs: that RET must #PF with the SS bit, not run unchecked (which used to leave
SSP one entry low and let the loop finish)."""

import pytest

from cetvm.arch import PfErr, Vector, VmcsField
from cetvm.cli import bench
from cetvm.cpu.exits import ExitReason

from test_fastpath_agreement import ENDBR64, SS_PTE, assemble


def _le32(value: int) -> str:
    return value.to_bytes(4, "little").hex()


@pytest.mark.parametrize("cet_path", ["python", "native"])
def test_ret_after_invlpg_is_checked(cet_path):
    from cetvm.cpu.native import native_available

    if cet_path == "native" and not native_available():
        pytest.skip("native CET hook not built (make native)")
    code, labels = assemble(
        ENDBR64, "31db", "loop:", ("e8", "f"), "ffc3", "83fb02", ("0f85", "loop"), "f4",
        "f:", ENDBR64, "83fb01", ("0f85", "ret"),
        "48830c25" + _le32(SS_PTE) + "02",          # or qword [SS_PTE], 2: the shadow-stack page becomes writable
        "0f013c25" + _le32(bench.SHADOW_STACK),  # invlpg [SHADOW_STACK]
        "ret:", "c3")
    vcpu = bench.make_vcpu(1, cet=True, cet_path=cet_path)
    vcpu.write_phys(bench.CODE, code)
    vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, 1 << Vector.PF)
    exit_ = vcpu.run()
    assert exit_.reason is ExitReason.EXCEPTION, exit_
    assert exit_.rip == bench.CODE + labels["ret"]
    assert exit_.exception.vector == Vector.PF and exit_.exception.error_code & PfErr.SS
