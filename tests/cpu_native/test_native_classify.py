"""Plain blocks classified in the native hook (cetfast.c "plain blocks", issue 13): its decoder
agrees with iced-x86 and the Python classifier on every instruction it accepts, and guests run
the same with it (the default) and without it (CETVM_NATIVE_CLASSIFY=0: every block classified
in Python, the reference).

What "agrees" means for an instruction the decoder accepts as plain: iced decodes it to the same
length, it is no instruction cetvm emulates (:func:`cetvm.cpu.decode.needs_emulation`) or hooks
(:func:`cetvm.cpu.flag_sync.reads_stale_flags`), and it makes the same terminator with the same
RET imm16 (:func:`cetvm.cpu.cet.transfer.classify_terminator`). An instruction the decoder
rejects costs only time (Python classifies its block), so coverage is measured, not required.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from iced_x86 import Decoder, Instruction, Mnemonic

from cetvm import InputError
from cetvm.cpu import decode
from cetvm.cpu.cet.transfer import Terminator, classify_terminator
from cetvm.cpu.flag_sync import reads_stale_flags
from cetvm.cpu.native import decode_plain64, native_available
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine, instructions_retired
from guest_build import tap_kernel

PREFIXES = (0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65)


@pytest.fixture(autouse=True)
def native_built():
    if not native_available():
        pytest.skip("native CET fast path not built (make native)")


def reference(code: bytes) -> tuple[int, int, int] | None:
    """What the Python classifier makes of the instruction at the start of ``code``: (length,
    terminator kind, RET imm16), or None if it is not plain."""
    instr = Decoder(64, code, ip=0x40_1000).decode()
    return reference_of(instr)


def reference_of(instr: Instruction) -> tuple[int, int, int] | None:
    if instr.mnemonic == Mnemonic.INVALID or decode.needs_emulation(instr) or reads_stale_flags(instr):
        return None
    term = classify_terminator(instr)
    kind = Terminator.FALLTHROUGH if term.kind == Terminator.FALLTHROUGH else term.kind
    return instr.len, int(kind), term.imm16 if kind == Terminator.RET_IMM else 0


def native(code: bytes) -> tuple[int, int, int] | None:
    got = decode_plain64(code)
    return None if got is None else (got[0], int(got[1]), got[2])


def random_encoding(rng: random.Random) -> bytes:
    """Prefixes, an optional REX, a one-byte, two-byte or group opcode, random operand bytes;
    sometimes cut short (the block ends inside the instruction)."""
    code = [rng.choice(PREFIXES) for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3)))]
    if rng.random() < 0.4:
        code.append(0x40 | rng.randrange(16))
    r = rng.random()
    if r < 0.5:
        code.append(rng.randrange(256))
    elif r < 0.95:
        code += [0x0F, rng.randrange(256)]
    else:
        code += [0x0F, rng.choice((0x01, 0xAE, 0x1E)), rng.randrange(256)]
    code += [rng.randrange(256) for _ in range(14)]
    return bytes(code[:rng.choice((len(code), len(code), rng.randrange(1, len(code) + 1)))])


def test_every_random_encoding_the_decoder_accepts_agrees_with_iced_and_the_classifier():
    rng = random.Random(13)
    accepted = 0
    for _ in range(60_000):
        code = random_encoding(rng)
        got = native(code)
        if got is None:
            continue
        accepted += 1
        assert got == reference(code), (code.hex(), got, Decoder(64, code).decode())
    assert accepted > 20_000  # the decoder accepts the common encodings (coverage, not correctness)


@pytest.mark.parametrize("code, expected", [
    ("f30f1efa", (4, Terminator.FALLTHROUGH, 0)),              # ENDBR64
    ("e800000000", (5, Terminator.CALL_DIRECT_DISP0, 0)),      # CALL next
    ("e8fbffffff", (5, Terminator.CALL_DIRECT, 0)),
    ("41ffd3", (3, Terminator.CALL_INDIRECT, 0)),              # call *%r11
    ("3e41ffd3", (4, Terminator.CALL_INDIRECT_NOTRACK, 0)),    # notrack call *%r11
    ("3effe0", (3, Terminator.JMP_INDIRECT_NOTRACK, 0)),
    ("ff2425e0ff0000", (7, Terminator.JMP_INDIRECT, 0)),       # jmp *0xffe0 (SIB, no base)
    ("c3", (1, Terminator.RET, 0)),
    ("c21000", (3, Terminator.RET_IMM, 16)),
    ("48b8efcdab8967452301", (10, Terminator.FALLTHROUGH, 0)),  # movabs
    ("0f01ca", (3, Terminator.FALLTHROUGH, 0)),                # CLAC
    ("0f01f8", (3, Terminator.FALLTHROUGH, 0)),                # SWAPGS
    ("0faee8", (3, Terminator.FALLTHROUGH, 0)),                # LFENCE
])
def test_the_encodings_a_kernel_lives_on_are_plain(code, expected):
    got = native(bytes.fromhex(code))
    assert got == (expected[0], int(expected[1]), expected[2])
    assert got == reference(bytes.fromhex(code))


@pytest.mark.parametrize("code", [
    "0f05", "0f07", "48cf", "f4", "0fa2", "0f30", "0f32", "ec", "ee", "0f22d8", "0f20e0",  # exits
    "8ed0", "cb", "ff18", "ff28", "48ff18",                     # MOV SS, far RET/CALL/JMP
    "480fc70e", "0fc70e",                                       # CMPXCHG16B/8B: a flag hook
    "f30f1ec8", "f30fae e8".replace(" ", ""),                   # RDSSPD, INCSSPD
    "0f01c1", "0f01e8", "0f0b", "cc", "c4e27af7c0",             # VMCALL, SERIALIZE, UD2, INT3, VEX
    "66e800000000", "f2c3", "f0ffc0", "8dc0", "e8000000",       # 66 branch, BND, bad LOCK, LEA reg, cut short
])
def test_what_the_decoder_does_not_accept_goes_to_python(code):
    assert native(bytes.fromhex(code)) is None


def host_text() -> bytes:
    """The first 512 KiB of the host C library's .text: compiler output the guests resemble."""
    objcopy = shutil.which("objcopy")
    libc = next((p for p in (Path("/lib/x86_64-linux-gnu/libc.so.6"), Path("/usr/lib64/libc.so.6")) if p.exists()),
                None)
    if objcopy is None or libc is None:
        pytest.skip("objcopy or the host's x86-64 libc.so.6 not found")
    out = subprocess.run([objcopy, "-O", "binary", "--only-section=.text", str(libc), "/dev/stdout"],
                         capture_output=True, check=True).stdout
    return out[:512 * 1024]


def test_real_code_decodes_to_the_same_instructions():
    """Linear sweep of real x86-64 code: every instruction the decoder accepts agrees, and
    nearly all of them are accepted (the native hook's whole point)."""
    text = host_text()
    total = accepted = 0
    for instr in Decoder(64, text, ip=0):
        window = text[instr.ip:instr.ip + 15]
        got = native(window)
        total += 1
        if got is not None:
            accepted += 1
            assert got == reference_of(instr), (window[:instr.len].hex(), got, instr)
    assert accepted > 0.9 * total, (accepted, total)


GUESTS = ("bench", "fast_events", "block_cache", "native_exits", "lazy_flags", "ibt", "shstk_farret")


def run_guest(monkeypatch, name: str, native_classify: str | None) -> tuple[int, int, bytes, Machine]:
    monkeypatch.setenv("CETVM_CET_PATH", "native")
    if native_classify is None:
        monkeypatch.delenv("CETVM_NATIVE_CLASSIFY", raising=False)
    else:
        monkeypatch.setenv("CETVM_NATIVE_CLASSIFY", native_classify)
    out: list[bytes] = []
    config = MachineConfig(cmdline="syscalls=50 faults=50" if name == "bench" else "", serial_sink=out.append)
    machine = Machine.boot(tap_kernel(name), config)
    result = machine.run()
    return result.status, instructions_retired(machine.vcpu), b"".join(out), machine


@pytest.mark.parametrize("name", GUESTS)
def test_guests_run_instruction_for_instruction_the_same_with_python_classification(monkeypatch, name):
    status, retired, console, machine = run_guest(monkeypatch, name, None)
    assert machine.vcpu.cpu.native.classify_stats[0] > 0  # the hook classified blocks itself
    assert (status, retired, console) == run_guest(monkeypatch, name, "0")[:3]
    assert b"not ok" not in console


def test_python_classification_when_asked(monkeypatch):
    machine = run_guest(monkeypatch, "bench", "0")[3]
    assert machine.vcpu.cpu.native.classify_stats == (0, 0)


def test_a_classify_setting_other_than_0_or_1_is_an_input_error(monkeypatch):
    with pytest.raises(InputError, match="CETVM_NATIVE_CLASSIFY must be 0"):
        run_guest(monkeypatch, "bench", "on")
