"""Kernel loaders: multiboot v1 (ELF32 or a.out kludge) and cetvm's ELF64 protocol -> BootPlan."""

from cetvm.vmm.loader.bootplan import (
    MULTIBOOT_BOOTLOADER_MAGIC,
    BootPlan,
    LoadedModule,
    Long64Entry,
    MemoryImage,
    Protected32Entry,
    ZeroFill,
)
from cetvm.vmm.loader.kernel import ModuleSpec, load_kernel, load_kernel_image
from cetvm.vmm.loader.longmode import BootGdt, PageTables, build_boot_gdt, build_identity_page_tables

__all__ = [
    "MULTIBOOT_BOOTLOADER_MAGIC", "BootGdt", "BootPlan", "LoadedModule", "Long64Entry", "MemoryImage",
    "ModuleSpec", "PageTables", "Protected32Entry", "ZeroFill", "build_boot_gdt",
    "build_identity_page_tables", "load_kernel", "load_kernel_image",
]
