"""Real KVM on this machine as the oracle: KVM_GET_SUPPORTED_CPUID and KVM_GET_MSR_INDEX_LIST.

Host settings are read from the running kernel: /proc/cmdline (ibt=), the vendor module
(kvm_intel → VMX with its ept/unrestricted_guest parameters, kvm_amd → SVM with npt). IA32_VMX_BASIC
is not readable here (/dev/cpu/0/msr is usually absent), so bit 56 is assumed set; on a CPU
without CET that assumption cannot change the outcome (no CET is offered anyway).

What is compared: leaf 0xD — 0xD.0 EAX/EBX/ECX/EDX, 0xD.1 ECX/EDX, every 0xD.n (n ≥ 2) KVM
returns (EAX/EBX/ECX/EDX) and the set of such subleaves; leaf 7's SHSTK/IBT/CET_SSS bits; the
CET/XSS part of the MSR index list. 0xD.1 EAX/EBX are compared only under kvm_intel/kvm_amd:
another vendor module (e.g. a PVM "kvm_pvm" host) hides XSAVEOPT/XSAVEC/XSAVES by its own policy.
On kernels before 6.18 (no CET series) KVM still reports leaf 0xD and XSS, so all of this is
meaningful there too; only a CET-capable CPU on an old kernel would differ (skipped then).
"""

from __future__ import annotations

import fcntl
import os
import platform
import struct
from pathlib import Path

import pytest

from cetvm.kvm.caps import kvm_caps_for_host
from cetvm.kvm.host import Host

pytestmark = pytest.mark.kvm

KVM_GET_API_VERSION = 0xAE00
KVM_GET_MSR_INDEX_LIST = 0xC004AE02
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
CET_XSS_MSRS = {0xDA0, 0x6A0, 0x6A2, 0x6A4, 0x6A5, 0x6A6, 0x6A7, 0x6A8, 0x4B564DFF}


def open_kvm() -> int:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing: no real KVM to compare with")
    try:
        return os.open("/dev/kvm", os.O_RDWR)
    except OSError as exc:
        pytest.skip(f"/dev/kvm is not accessible: {exc}")


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def real_supported_cpuid(fd: int) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    nent = 256
    buf = bytearray(struct.pack("II", nent, 0) + bytes(40 * nent))
    fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf)
    count = struct.unpack_from("I", buf)[0]
    out = {}
    for i in range(count):
        function, index, _flags, eax, ebx, ecx, edx = struct.unpack_from("7I", buf, 8 + 40 * i)
        out[(function, index)] = (eax, ebx, ecx, edx)
    return out


def real_msr_index_list(fd: int) -> list[int]:
    nmsrs = 2048
    buf = bytearray(struct.pack("I", nmsrs) + bytes(4 * nmsrs))
    fcntl.ioctl(fd, KVM_GET_MSR_INDEX_LIST, buf)
    count = struct.unpack_from("I", buf)[0]
    return list(struct.unpack_from(f"{count}I", buf, 4))


def _param(module: str, name: str) -> bool | None:
    path = Path("/sys/module") / module / "parameters" / name
    try:
        return path.read_text().strip() in ("Y", "1")
    except OSError:
        return None


def vendor_module() -> str:
    for module in ("kvm_intel", "kvm_amd"):
        if Path("/sys/module", module).exists():
            return module
    found = sorted(p.name for p in Path("/sys/module").glob("kvm_*"))
    return found[0] if found else "unknown"


def this_host() -> Host:
    from cetvm.cpuid import get_model

    cpu = get_model("host")
    cmdline = Path("/proc/cmdline").read_text()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    module = vendor_module()
    settings: dict[str, object] = {"kernel_cmdline": cmdline, "user_shstk": " user_shstk" in cpuinfo}
    if module == "kvm_intel":
        settings["virt"] = "vmx"
        settings["tdp"] = _param(module, "ept") is not False
        settings["unrestricted_guest"] = _param(module, "unrestricted_guest") is not False
    elif module == "kvm_amd":
        settings["virt"] = "svm"
        settings["tdp"] = _param(module, "npt") is not False
    return Host(cpu, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def real_and_model():
    fd = open_kvm()
    try:
        real = real_supported_cpuid(fd)
        msrs = real_msr_index_list(fd)
    finally:
        os.close(fd)
    host = this_host()
    if host.cpu.has("shstk") and kernel_version() < (6, 18):
        pytest.skip(f"kernel {platform.release()} predates KVM CET (6.18) on a CET-capable CPU: "
                    "CET bits and MSRs cannot be compared")
    caps = kvm_caps_for_host(host)
    return real, msrs, caps, caps.get_supported_cpuid()


def test_leaf_d0_matches_real_kvm(real_and_model):
    real, _, _, model = real_and_model
    assert model.get(0xD, 0) == real[(0xD, 0)]


def test_leaf_d_subleaves_match_real_kvm(real_and_model):
    real, _, _, model = real_and_model
    real_subleaves = {i for (f, i) in real if f == 0xD and i >= 2}
    model_subleaves = {e.subleaf for e in model.entries() if e.leaf == 0xD and e.subleaf >= 2}
    assert model_subleaves == real_subleaves
    for i in sorted(real_subleaves):
        assert model.get(0xD, i) == real[(0xD, i)], f"CPUID.(0xD,{i})"


def test_leaf_d1_xss_bits_match_real_kvm(real_and_model):
    real, _, caps, model = real_and_model
    _, _, ecx, edx = real[(0xD, 1)]
    assert model.get(0xD, 1)[2:] == (ecx, edx)
    assert caps.supported_xss == (edx << 32 | ecx)


def test_leaf_d1_eax_ebx_match_real_kvm(real_and_model):
    real, _, _, model = real_and_model
    module = vendor_module()
    if module not in ("kvm_intel", "kvm_amd"):
        pytest.skip(f"vendor module {module} has its own XSAVE* policy; 0xD.1 EAX/EBX not comparable")
    assert model.get(0xD, 1)[:2] == real[(0xD, 1)][:2]


def test_leaf_7_cet_bits_match_real_kvm(real_and_model):
    real, _, _, model = real_and_model
    _, _, ecx, edx = real[(7, 0)]
    assert model.has("shstk") == bool(ecx >> 7 & 1)
    assert model.has("ibt") == bool(edx >> 20 & 1)
    real_7_1_edx = real.get((7, 1), (0, 0, 0, 0))[3]
    assert not real_7_1_edx >> 18 & 1 and not model.has("cet_sss")


def test_cet_part_of_msr_index_list_matches_real_kvm(real_and_model):
    _, msrs, caps, _ = real_and_model
    assert set(caps.get_msr_index_list()) & CET_XSS_MSRS == set(msrs) & CET_XSS_MSRS
