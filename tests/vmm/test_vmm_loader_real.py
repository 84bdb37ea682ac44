"""Real kernels (guests/vmm, assembled with the system gcc/binutils by make), loaded by the loader and then run on a
bare Unicorn CPU wired to our port bus: the boot plan must be exactly what the kernel expects.

Oracles: ``objcopy -O binary`` for the loaded bytes; the kernel itself checks EAX/RSI, EBX/RDI,
the zeroed bss and echoes what it reads from the multiboot information.
"""

import shutil
import subprocess

import pytest

from cetvm.vmm.bus import PioBus
from cetvm.vmm.devices import IsaDebugExit, Serial16550
from cetvm.vmm.loader import Long64Entry, ModuleSpec, Protected32Entry, load_kernel
from cetvm.vmm.requests import GuestExitRequest
from guest_build import GUESTS, built_guest

RAM = 16 << 20

pytestmark = pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("ld") and shutil.which("objcopy")),
                                reason="needs gcc, ld and objcopy to build test kernels")


def kernel_elf(name):
    """guests/build/vmm/<name>.elf, built by make in guests/vmm when missing or stale."""
    return built_guest(f"vmm/{name}.elf", GUESTS / "vmm")


def flat_binary(tmp_path, elf_path):
    out = tmp_path / (elf_path.name + ".bin")
    subprocess.run(["objcopy", "-O", "binary", "--remove-section=.bss", str(elf_path), str(out)], check=True)
    return out.read_bytes()


def run(plan, mode64=False):
    """Execute the plan's entry on Unicorn with COM1 and isa-debug-exit on a PioBus."""
    import unicorn
    from unicorn import x86_const as x

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64 if mode64 else unicorn.UC_MODE_32)
    uc.mem_map(0, RAM)
    uc.mem_write(0, b"\xcc" * RAM)  # garbage: the plan must zero what needs zeroing
    plan.apply(uc.mem_write)
    out = bytearray()
    bus = PioBus()
    bus.register(0x3F8, 8, Serial16550(out.extend))
    bus.register(0xF4, 1, IsaDebugExit())
    uc.hook_add(unicorn.UC_HOOK_INSN, lambda uc, port, size, value, _: bus.write(port, size, value),
                None, 1, 0, x.UC_X86_INS_OUT)
    entry = plan.entry
    if mode64:
        assert isinstance(entry, Long64Entry)
        uc.reg_write(x.UC_X86_REG_GDTR, (0, entry.gdt_base, entry.gdt_limit, 0))
        uc.reg_write(x.UC_X86_REG_CR3, entry.cr3)
        uc.reg_write(x.UC_X86_REG_CR4, entry.cr4)
        uc.msr_write(0xC0000080, entry.efer)
        uc.reg_write(x.UC_X86_REG_CR0, entry.cr0)
        for reg, value in ((x.UC_X86_REG_RSP, entry.rsp), (x.UC_X86_REG_RAX, entry.rax),
                           (x.UC_X86_REG_RBX, entry.rbx), (x.UC_X86_REG_RDI, entry.rdi),
                           (x.UC_X86_REG_RSI, entry.rsi)):
            uc.reg_write(reg, value)
        start = entry.rip
    else:
        assert isinstance(entry, Protected32Entry)
        uc.reg_write(x.UC_X86_REG_EAX, entry.eax)
        uc.reg_write(x.UC_X86_REG_EBX, entry.ebx)
        uc.reg_write(x.UC_X86_REG_ESP, 0x7000)
        start = entry.eip
    with pytest.raises(GuestExitRequest) as exc:
        uc.emu_start(start, 0xFFFF_FFFF, count=100_000)
    return exc.value.status, bytes(out)


def test_multiboot_elf32_kernel(tmp_path):
    kernel = kernel_elf("mb_elf32")
    (tmp_path / "mod").write_bytes(b"module")
    plan = load_kernel(kernel, RAM, cmdline="hello from cetvm", modules=[ModuleSpec(str(tmp_path / "mod"))])
    assert plan.kind == "multiboot-elf32"
    flat = flat_binary(tmp_path, kernel)
    assert b"".join(i.data for i in plan.images if i.what.startswith("kernel")) == flat
    assert run(plan) == (0x43, b"hello from cetvm|data|1")


def test_multiboot_aout_kludge_in_an_elf64_file(tmp_path):
    kernel = kernel_elf("mb_kludge64")
    assert kernel.read_bytes()[4] == 2  # really an ELF64 file
    plan = load_kernel(kernel, RAM, cmdline="kludge")
    assert plan.kind == "multiboot-aout-kludge"
    (image,) = [i for i in plan.images if i.what == "kernel image"]
    assert image.addr == 0x100000 and image.data == flat_binary(tmp_path, kernel)
    assert run(plan) == (0x43, b"kludge|data|0")


def test_plain_elf64_kernel_in_long_mode(tmp_path):
    kernel = kernel_elf("longmode64")
    plan = load_kernel(kernel, RAM, cmdline="long mode")
    assert plan.kind == "elf64"
    assert run(plan, mode64=True) == (0x45, b"long mode")
