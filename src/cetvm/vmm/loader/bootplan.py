"""What a loader produces: bytes to place, ranges to zero, and the vCPU state at entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cetvm.arch import Cr0, Cr4, Efer
from cetvm.vmm.layout import E820Entry

#: EAX at a multiboot entry [Multiboot 0.6.96 §3.2].
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BAD_B002

#: Selectors of the boot GDT (see :mod:`cetvm.vmm.loader.longmode`).
BOOT_CS64 = 0x08
BOOT_DS = 0x10
BOOT_CS32 = 0x18


@dataclass(frozen=True)
class MemoryImage:
    """``data`` goes to guest-physical ``addr``."""

    addr: int
    data: bytes
    what: str

    @property
    def end(self) -> int:
        return self.addr + len(self.data)


@dataclass(frozen=True)
class ZeroFill:
    """``[addr, addr + size)`` must read as zeros (bss)."""

    addr: int
    size: int
    what: str

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class Protected32Entry:
    """Multiboot machine state [Multiboot 0.6.96 §3.2]: 32-bit protected mode, paging off,
    interrupts off (RFLAGS.IF = 0), A20 on, CS a flat 4 GiB execute/read segment (selector
    ``cs``, base 0, limit 0xFFFFFFFF), DS/ES/FS/GS/SS flat read/write (selector ``ds``),
    EAX = 0x2BADB002, EBX = physical address of the multiboot information. ESP is undefined
    (0). The VMM sets the hidden segment state directly; no GDT is needed until the kernel
    loads its own."""

    eip: int
    ebx: int
    eax: int = MULTIBOOT_BOOTLOADER_MAGIC
    cs: int = BOOT_CS32
    ds: int = BOOT_DS
    cr0: int = int(Cr0.PE | Cr0.ET)
    rflags: int = 0x2


@dataclass(frozen=True)
class Long64Entry:
    """cetvm's ELF64 boot protocol (documented in :mod:`cetvm.vmm.loader.elf64`): 64-bit mode,
    CPL 0, paging on with ``cr3`` (identity map of the low 4 GiB, 2 MiB pages), GDT at
    ``gdt_base`` with flat 64-bit code ``cs`` and data ``ds``, interrupts off, RSP 16-byte
    aligned near the top of low RAM. RBX and RDI = multiboot information address, RAX and RSI
    = 0x2BADB002 (so ``void kmain(void *info, uint32_t magic)`` can be the entry point)."""

    rip: int
    rsp: int
    rbx: int
    rdi: int
    cr3: int
    gdt_base: int
    gdt_limit: int
    rax: int = MULTIBOOT_BOOTLOADER_MAGIC
    rsi: int = MULTIBOOT_BOOTLOADER_MAGIC
    cs: int = BOOT_CS64
    ds: int = BOOT_DS
    cr0: int = int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG)
    cr4: int = int(Cr4.PAE)
    efer: int = int(Efer.LME | Efer.LMA | Efer.NXE)
    rflags: int = 0x2


@dataclass(frozen=True)
class LoadedModule:
    """A multiboot module as placed in guest memory."""

    path: str
    start: int
    end: int
    cmdline: str


@dataclass(frozen=True)
class BootPlan:
    """Everything the VMM needs to start a kernel."""

    kind: str
    images: tuple[MemoryImage, ...]
    zero_fills: tuple[ZeroFill, ...]
    entry: Protected32Entry | Long64Entry
    info_addr: int
    kernel_start: int
    kernel_end: int
    modules: tuple[LoadedModule, ...]
    e820: tuple[E820Entry, ...]

    def apply(self, write: Callable[[int, bytes], None]) -> None:
        """Write the plan into guest memory with ``write(guest_phys_addr, data)``."""
        for fill in self.zero_fills:
            step = 1 << 20
            for addr in range(fill.addr, fill.end, step):
                write(addr, bytes(min(step, fill.end - addr)))
        for image in self.images:
            write(image.addr, image.data)
