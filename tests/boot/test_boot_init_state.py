"""INIT through the KVM API on a guest that loaded non-zero CET state: exactly the state of the
KVM INIT rules is cleared [KVM vmx.c/x86.c INIT/RESET]: CET_U/CET_S xstate (U_CET, PL0-3_SSP) and the
VMCS GUEST_S_CET / GUEST_SSP / GUEST_INTR_SSP_TABLE; IA32_XSS and the other MSRs survive."""

from cetvm.arch import KVM_REG_GUEST_SSP_ID
from cetvm.arch.msr import Msr
from cetvm.kvm.api import MpState
from cetvm.vmm.config import MachineConfig
from cetvm.vmm.machine import Machine
from cetvm.vmm.run_loop import PauseRequest, StopReason

from boot_support import guest

CET = [Msr.IA32_U_CET, Msr.IA32_S_CET, Msr.IA32_PL0_SSP, Msr.IA32_PL1_SSP, Msr.IA32_PL2_SSP,
       Msr.IA32_PL3_SSP, Msr.IA32_INT_SSP_TAB]
KEPT = [Msr.IA32_XSS, Msr.IA32_LSTAR, Msr.IA32_STAR, Msr.IA32_FMASK]


def guest_values(line: str) -> dict[str, int]:
    return {k: int(v, 16) for k, v in (f.split("=") for f in line.split()[1:]) if v != "-"}


def pause_after(marker: bytes, serial: bytearray):
    def sink(data: bytes) -> None:
        serial.extend(data)
        tail = serial[serial.rfind(marker):] if marker in serial else b""
        if tail and b"\n" in tail:
            raise PauseRequest(f"serial printed {marker.decode()}")
    return sink


def test_init_clears_exactly_the_cet_state_kvm_clears():
    serial = bytearray()
    machine = Machine.boot(guest("init_state"), MachineConfig(memory="32M", serial_sink=pause_after(b"cet-state-set", serial)))
    result = machine.run(max_instructions=5_000_000)
    assert result.reason is StopReason.PAUSED, result.diagnosis()
    line = next(l for l in serial.decode().splitlines() if l.startswith("cet-state-set"))
    seen = guest_values(line)

    vcpu = machine.vcpu
    before = dict(vcpu.get_msrs([int(m) for m in CET + KEPT]))
    # what the guest printed is what the API reads
    assert before[Msr.IA32_U_CET] == seen["u_cet"] != 0
    assert before[Msr.IA32_PL3_SSP] == seen["pl3"] != 0
    assert before[Msr.IA32_INT_SSP_TAB] == seen["isst"] != 0
    assert before[Msr.IA32_XSS] == seen["xss"] != 0
    xsave_before = vcpu.get_xsave()
    xcrs_before = vcpu.get_xcrs()

    vcpu.set_mp_state(MpState.INIT_RECEIVED)
    vcpu.run(immediate_exit=True)

    after = dict(vcpu.get_msrs([int(m) for m in CET + KEPT]))
    assert {m: after[m] for m in CET} == {m: 0 for m in CET}
    assert vcpu.get_one_reg(KVM_REG_GUEST_SSP_ID) == 0
    assert {m: after[m] for m in KEPT} == {m: before[m] for m in KEPT}
    assert vcpu.get_xcrs() == xcrs_before
    assert vcpu.get_xsave() == xsave_before  # x87/SSE/AVX are not INIT-cleared by KVM
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    assert (regs.rip, sregs.cs.selector, sregs.cs.base) == (0xFFF0, 0xF000, 0xFFFF0000)
    assert sregs.cr4 == 0 and sregs.efer & 0x500 == 0  # no long mode after INIT (LME/LMA)
