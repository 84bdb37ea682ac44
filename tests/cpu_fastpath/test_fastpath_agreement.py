"""The Python common-case path (cetvm.cpu.fastpath) and the reference hook agree.

Each guest runs twice on the "python" CET path: with the fast path in front of the reference
(the default) and with the reference alone (``python_fast_path=False`` via
$CETVM_PYTHON_FAST_PATH=0); the architectural end states must be identical. Small guests are
assembled here and run on the benchmark's machine (cetvm.cli.bench.make_vcpu: identity map,
shadow-stack page at SHADOW_STACK, SSP = SHADOW_STACK + 0x1000, RSP = STACK_TOP, code at CODE);
the real test guests come from guests/cpu through tests/cpu/harness.py.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from cetvm.arch import CetCtl, CpError, Msr, PfErr, Vector, VmcsField
from cetvm.cli import bench
from cetvm.cpu.exits import ExitReason
from cetvm.cpu.state import Segment
from cetvm.cpu.block_hook import BlockHook
from cetvm.cpu.vcpu import Vcpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpu"))
from harness import AGREEMENT_CASES as GUEST_CASES, SHADOW_STACK_PAGES, L, PAGE, Machine, Options  # noqa: E402

ENDBR64 = "f30f1efa"
SS_TOP = bench.SHADOW_STACK + 0x1000
#: The PTE of the shadow-stack page in bench's identity map (first page table at TABLES + 3 pages).
SS_PTE = bench.TABLES + 3 * 0x1000 + 8 * (bench.SHADOW_STACK >> 12)


# ---------------------------------------------------------------- a tiny two-pass assembler
def assemble(*items: str | tuple[str, str]) -> tuple[bytes, dict[str, int]]:
    """Hex strings are bytes; ``"name:"`` defines a label; ``(opcode_hex, label)`` is an opcode
    followed by a rel32 to the label. Returns the code (at bench.CODE) and the label offsets."""
    labels: dict[str, int] = {}
    for _ in range(2):
        out = bytearray()
        for item in items:
            if isinstance(item, tuple):
                opcode, label = item
                out += bytes.fromhex(opcode)
                out += struct.pack("<i", labels.get(label, len(out) + 4) - (len(out) + 4))
            elif item.endswith(":"):
                labels[item[:-1]] = len(out)
            else:
                out += bytes.fromhex(item)
    return bytes(out), labels


def mixed_loop(iterations: int) -> tuple[bytes, dict[str, int]]:
    """Direct CALL / RET imm16, indirect JMP to ENDBR64, nested CALLs; RDX, RSI, RDI count."""
    return assemble(
        ENDBR64, "b9" + struct.pack("<I", iterations).hex(),       # mov ecx, N
        "loop:", "51", ("e8", "g"),                                  # push rcx; call g (ret 8)
        ("488d05", "h"), "ffe0",                                     # lea rax, [h]; jmp rax
        "back:", ("e8", "k"),                                        # call k
        "ffc9", ("0f85", "loop"), "halt:", "f4",                     # dec ecx; jnz loop; hlt
        "g:", ENDBR64, "4883c201", "c20800",                         # add rdx, 1; ret 8
        "h:", ENDBR64, "4883c601", ("e9", "back"),                   # add rsi, 1; jmp back
        "k:", ENDBR64, ("e8", "m"), "c3",                            # call m; ret
        "m:", ENDBR64, "4883c701", "c3",                             # add rdi, 1; ret
    )


def make(code: bytes, fast: bool, monkeypatch, cpl: int = 0, intercept: tuple[int, ...] = (),
         compat: bool = False, s_cet: int | None = None) -> Vcpu:
    """bench's machine with ``code`` at CODE; ``compat``: a 32-bit code segment (compatibility
    mode, 4-byte shadow-stack entries); ``s_cet``: S_CET instead of SH_STK_EN | ENDBR_EN."""
    monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", "1" if fast else "0")
    vcpu = bench.make_vcpu(1, cet=True, cet_path="python", cpl=cpl)
    assert vcpu.cet_path == "python" and vcpu.python_fast_path is fast
    vcpu.write_phys(bench.CODE, code)
    if compat:
        vcpu.load_segments(cs=Segment.code32(0x08))
    if s_cet is not None:
        vcpu.set_msr(Msr.IA32_S_CET, s_cet)
    for vector in intercept:
        vcpu.vmcs.write(VmcsField.EXCEPTION_BITMAP, vcpu.vmcs.read(VmcsField.EXCEPTION_BITMAP) | 1 << vector)
    return vcpu


def state(vcpu: Vcpu, exit_) -> dict:
    exception = exit_.exception
    return {
        "exit": (exit_.reason, exit_.rip, None if exception is None else (exception.vector, exception.error_code, exception.cr2)),
        "regs": vcpu.get_regs(),
        "ssp": vcpu.ssp,
        "cet": (vcpu.msr(Msr.IA32_U_CET), vcpu.msr(Msr.IA32_S_CET)),
        "shadow_stack": vcpu.read_phys(bench.SHADOW_STACK, 0x1000),
        "pte": vcpu.read_phys(SS_PTE, 8),
    }


def run_both(code: bytes, monkeypatch, cpl: int = 0, intercept: tuple[int, ...] = (), **options) -> dict:
    """Run ``code`` with and without the fast path; assert equal end states; return it."""
    states = []
    for fast in (True, False):
        vcpu = make(code, fast, monkeypatch, cpl, intercept, **options)
        exit_ = vcpu.run(budget=200_000)
        assert exit_.reason != ExitReason.BUDGET, "guest did not stop"
        states.append(state(vcpu, exit_))
    fast_state, reference_state = states
    for key in reference_state:
        assert fast_state[key] == reference_state[key], key
    return fast_state


def counting_reference(monkeypatch) -> list[int]:
    """Count the block starts the fast path hands to the reference (BlockHook.on_block)."""
    calls = [0]
    reference = BlockHook.on_block

    def counted(self, address, size):
        calls[0] += 1
        reference(self, address, size)

    monkeypatch.setattr(BlockHook, "on_block", counted)
    return calls


# ---------------------------------------------------------------- common case
@pytest.mark.parametrize("cpl", [0, 3])
def test_mixed_loop_same_state_and_results(monkeypatch, cpl):
    n = 300
    code, labels = mixed_loop(n)
    intercept = (Vector.GP,) if cpl == 3 else ()
    end = run_both(code, monkeypatch, cpl, intercept)
    calls = counting_reference(monkeypatch)
    vcpu = make(code, True, monkeypatch, cpl, intercept)
    assert state(vcpu, vcpu.run()) == end
    assert calls[0] < 30, calls[0]  # misses only: the fast path applied ~7 terminators per iteration
    regs = end["regs"]
    assert (regs.rdx, regs.rsi, regs.rdi) == (n, n, n)
    assert end["exit"][1] == bench.CODE + labels["halt"]
    assert end["ssp"] == SS_TOP and regs.rsp == bench.STACK_TOP
    # the last CALL's return addresses are in guest RAM where the fast path wrote them
    ss = end["shadow_stack"]
    assert struct.unpack_from("<Q", ss, 0xFF8)[0] == bench.CODE + labels["back"] + 5
    assert struct.unpack_from("<Q", ss, 0xFF0)[0] == bench.CODE + labels["m"] - 1


def test_bench_loop_fast_path_does_the_work_itself(monkeypatch):
    """The benchmark loop: same state both ways, and the reference sees only a handful of
    block starts (classification misses), not one per block."""
    n = 2000
    calls = counting_reference(monkeypatch)
    ends = []
    for fast in (True, False):
        monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", "1" if fast else "0")
        vcpu = bench.make_vcpu(n, cet=True, cet_path="python")
        calls[0] = 0
        ends.append(state(vcpu, vcpu.run()))
        if fast:
            assert calls[0] < 20, calls[0]
        else:
            assert calls[0] > 5 * n  # 5 blocks per iteration, all through the reference
    assert ends[0] == ends[1]
    assert ends[0]["regs"].rdx == n and ends[0]["ssp"] == SS_TOP


def test_state_is_architectural_mid_run(monkeypatch):
    """Stopped inside a called function (instruction budget): SSP and the shadow-stack entry are
    in vcpu.ssp and guest RAM, as the reference leaves them."""
    code, labels = mixed_loop(5)
    results = []
    for fast in (True, False):
        vcpu = make(code, fast, monkeypatch)
        exit_ = vcpu.run(budget=5)  # endbr64, mov, push, call g, endbr64: stops inside g
        assert exit_.reason == ExitReason.BUDGET
        results.append((exit_.rip, vcpu.ssp, vcpu.read_phys(bench.SHADOW_STACK + 0xFF8, 8), vcpu.get_regs()))
    assert results[0] == results[1]
    rip, ssp, entry, _regs = results[0]
    assert ssp == SS_TOP - 8 and struct.unpack("<Q", entry)[0] == bench.CODE + labels["loop"] + 6


# ---------------------------------------------------------------- faults through the reference
# The faulting transfers below go to blocks that already ran (classified, in the block cache), so
# the fast path itself meets the fault condition and must hand over to the reference.

@pytest.mark.parametrize("ret", ["c3", "c20800"], ids=["ret", "ret-imm16"])
def test_ret_mismatch_cp1_rip_at_ret_rsp_unchanged(monkeypatch, ret):
    """The second time round, v returns to ``loop`` instead of ``after``: #CP(NEAR_RET) with RIP
    at the RET, RSP still pointing at the (overwritten) return address, SSP unchanged."""
    code, labels = assemble(
        ENDBR64, "31db",                                             # xor ebx, ebx
        "loop:", "50", ("e8", "v"),                                  # push rax; call v
        "after:", "ffc3", "83fb03", ("0f85", "loop"), "f4",          # inc ebx; cmp ebx, 3; jne loop; hlt
        "v:", ENDBR64, "83fb01", ("0f85", "bad_ret"),                # cmp ebx, 1; jne bad_ret
        ("488d05", "loop"), "48890424",                              # lea rax, [loop]; mov [rsp], rax
        "bad_ret:", ret)
    if ret == "c3":
        code = code.replace(bytes.fromhex("50e8"), bytes.fromhex("90e8"))  # no argument to pop: nop
    end = run_both(code, monkeypatch, intercept=(Vector.CP,))
    assert end["exit"] == (ExitReason.EXCEPTION, bench.CODE + labels["bad_ret"], (Vector.CP, int(CpError.NEAR_RET), None))
    assert end["regs"].rsp == bench.STACK_TOP - (16 if ret != "c3" else 8)
    assert end["regs"].rbx == 1 and end["ssp"] == SS_TOP - 8
    assert struct.unpack_from("<Q", end["shadow_stack"], 0xFF8)[0] == bench.CODE + labels["after"]


@pytest.mark.parametrize("branch", ["ffd0", "ffe0"], ids=["call", "jmp"])
def test_indirect_branch_to_block_without_endbr_cp3(monkeypatch, branch):
    """t first runs after a direct JMP; then an indirect CALL/JMP reaches it: #CP(ENDBRANCH) at
    t, with the branch done (a CALL has pushed on both stacks) and the tracker armed."""
    code, labels = assemble(
        ENDBR64, "31db", ("e9", "t"),                                # xor ebx, ebx; jmp t
        "t:", "ffc3", "83fb02", ("0f84", "stop"),                    # inc ebx; cmp ebx, 2; je stop
        ("488d05", "t"), branch,                                     # lea rax, [t]; call/jmp rax
        "stop:", "f4")
    end = run_both(code, monkeypatch, intercept=(Vector.CP,))
    assert end["exit"] == (ExitReason.EXCEPTION, bench.CODE + labels["t"], (Vector.CP, int(CpError.ENDBRANCH), None))
    assert end["regs"].rbx == 1
    pushed = 8 if branch == "ffd0" else 0
    assert end["regs"].rsp == bench.STACK_TOP - pushed and end["ssp"] == SS_TOP - pushed
    assert end["cet"][1] & CetCtl.TRACKER


@pytest.mark.parametrize("change, invalidate", [
    ("48830c258041000002", "0f013c2500000300"),   # or [pte], RW (not a shadow-stack page); invlpg
    ("4883242580410000fe", "0f013c2500000300"),   # and [pte], ~P (not present); invlpg
    ("48830c258041000002", "0f20d80f22d8"),       # or [pte], RW; mov rax, cr3; mov cr3, rax
], ids=["rw-invlpg", "not-present-invlpg", "rw-cr3"])
def test_ret_after_shadow_stack_mapping_change_page_faults(monkeypatch, change, invalidate):
    """f returns normally once (the fast path caches the shadow-stack page); the second time it
    remaps the page and invalidates the TLB before its RET: #PF with SS in the error code and
    CR2 = SSP, RIP at the RET, RSP and SSP as before it.

    RDSSPQ (an emulated instruction, so an engine exit) follows the invalidation because INVLPG is
    single-stepped by Vcpu.step_in_engine, which (Unicorn 2.1.4, count=1) runs on past it to the next
    exit with the block hook off; the RET must run under the hook to be checked at all."""
    code, labels = assemble(
        ENDBR64, "31db",                                             # xor ebx, ebx
        "loop:", ("e8", "f"),                                        # call f
        "r:", "ffc3", "83fb02", ("0f85", "loop"), "f4",              # inc ebx; cmp ebx, 2; jne loop; hlt
        "f:", ENDBR64, "83fb01", ("0f85", "ret"),                    # cmp ebx, 1; jne ret
        change, invalidate, "f3480f1ec8",                           # rdsspq rax (see below)
        "ret:", "c3")
    end = run_both(code, monkeypatch, intercept=(Vector.PF,))
    reason, rip, (vector, error, cr2) = end["exit"]
    assert (reason, rip, vector, cr2) == (ExitReason.EXCEPTION, bench.CODE + labels["ret"], Vector.PF, SS_TOP - 8)
    assert error & PfErr.SS and not error & PfErr.W
    assert bool(error & PfErr.P) == (change[-2:] == "02")
    assert end["regs"].rbx == 1
    assert end["regs"].rsp == bench.STACK_TOP - 8 and end["ssp"] == SS_TOP - 8


# ---------------------------------------------------------------- states the fast path must leave alone
def test_suppress_is_cleared_by_the_reference_at_an_endbr64_target(monkeypatch):
    """S_CET.SUPPRESS = 1 restored by the hypervisor between two runs of a loop whose blocks all
    ran before: the first CALL's ENDBR64 target clears it (ibt_check_target), so the fast path
    must hand that block start to the reference."""
    n = 20
    code, _labels = mixed_loop(n)
    suppressed = int(CetCtl.SH_STK_EN | CetCtl.ENDBR_EN | CetCtl.SUPPRESS)
    ends = []
    for fast in (True, False):
        vcpu = make(code, fast, monkeypatch)
        assert vcpu.run().reason == ExitReason.HLT
        vcpu.complete_pending_exit()
        vcpu.set_msr(Msr.IA32_S_CET, suppressed)
        vcpu.rip = bench.CODE
        ends.append(state(vcpu, vcpu.run(budget=100_000)))
    assert ends[0] == ends[1]
    assert ends[0]["cet"][1] == suppressed & ~int(CetCtl.SUPPRESS)
    assert ends[0]["regs"].rdx == 2 * n and ends[0]["ssp"] == SS_TOP


def test_restored_wait_for_endbranch_is_enforced_at_a_cached_block(monkeypatch):
    """TRACKER = WAIT_FOR_ENDBRANCH restored by the hypervisor (a vCPU migrated between an indirect
    branch and its target) with RIP at a block that already ran and has no ENDBR64: #CP(3)."""
    code, labels = assemble("t:", "ffc3", "f4")                      # inc ebx; hlt
    ends = []
    for fast in (True, False):
        vcpu = make(code, fast, monkeypatch, intercept=(Vector.CP,))
        assert vcpu.run().reason == ExitReason.HLT
        vcpu.complete_pending_exit()
        vcpu.set_msr(Msr.IA32_S_CET, vcpu.msr(Msr.IA32_S_CET) | CetCtl.TRACKER)
        vcpu.rip = bench.CODE + labels["t"]
        ends.append(state(vcpu, vcpu.run(budget=1000)))
    assert ends[0] == ends[1]
    assert ends[0]["exit"] == (ExitReason.EXCEPTION, bench.CODE, (Vector.CP, int(CpError.ENDBRANCH), None))
    assert ends[0]["regs"].rbx == 1


ENDBR32 = "f30f1efb"


def test_compatibility_mode_calls_use_4_byte_entries(monkeypatch):
    """32-bit code under IA-32e paging: CALL/RET move SSP by 4 (the reference decides)."""
    n = 50
    code, labels = assemble(
        ENDBR32, "b9" + struct.pack("<I", n).hex(),                  # mov ecx, N
        "loop:", ("e8", "g"), "49", ("0f85", "loop"), "f4",          # call g; dec ecx; jnz loop; hlt
        "g:", ENDBR32, "42", "c3")                                   # inc edx; ret
    end = run_both(code, monkeypatch, compat=True)
    assert end["regs"].rdx == n and end["ssp"] == SS_TOP
    assert struct.unpack_from("<I", end["shadow_stack"], 0xFFC)[0] == bench.CODE + labels["loop"] + 5


def test_compatibility_mode_indirect_jmp_needs_endbr32(monkeypatch):
    """In 32-bit code ENDBR64 is not the mode's ENDBR: an indirect JMP to a (cached) block that
    starts with ENDBR64 raises #CP(3)."""
    code, labels = assemble(
        ENDBR32, "31db", ("e9", "h"),                                # xor ebx, ebx; jmp h
        "h:", ENDBR64, "43", "83fb02", ("0f84", "stop"),             # inc ebx; cmp ebx, 2; je stop
        "b8" + struct.pack("<I", 0).hex(), "ffe0",                   # mov eax, h (patched); jmp eax
        "stop:", "f4")
    mov_at = code.index(bytes.fromhex("b800000000"))
    code = code[:mov_at + 1] + struct.pack("<I", bench.CODE + labels["h"]) + code[mov_at + 5:]
    end = run_both(code, monkeypatch, intercept=(Vector.CP,), compat=True)
    assert end["exit"] == (ExitReason.EXCEPTION, bench.CODE + labels["h"], (Vector.CP, int(CpError.ENDBRANCH), None))
    assert end["regs"].rbx == 1


# ---------------------------------------------------------------- the real test guests


@pytest.mark.guest
@pytest.mark.parametrize(("guest", "case", "options"), GUEST_CASES, ids=[f"{g}-{c}" for g, c, _ in GUEST_CASES])
def test_guest_end_states_agree(monkeypatch, guest, case, options):
    monkeypatch.setenv("CETVM_CET_PATH", "python")
    states = []
    for fast in ("1", "0"):
        monkeypatch.setenv("CETVM_PYTHON_FAST_PATH", fast)
        machine = Machine(guest, options)
        assert machine.vcpu.python_fast_path is (fast == "1")
        exit_ = machine.run_case(case)
        vcpu = machine.vcpu
        states.append({
            "exit": (exit_.reason, exit_.rip), "regs": vcpu.get_regs(), "ssp": vcpu.ssp,
            "cet_msrs": [vcpu.msr(m) for m in (Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL3_SSP)],
            "results": vcpu.read_phys(L["RESULTS_ADDR"], 0x500),
            "shadow_stacks": [vcpu.read_phys(L[name], PAGE) for name in SHADOW_STACK_PAGES],
        })
    for key in states[1]:
        assert states[0][key] == states[1][key], key
