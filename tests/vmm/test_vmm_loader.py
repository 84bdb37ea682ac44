"""Kernel loaders on hand-built images: multiboot (a.out kludge, ELF32), ELF64, info structure,
and one precise error per kind of bad input."""

import struct

import pytest

from cetvm import InputError
from cetvm.vmm.loader import Long64Entry, ModuleSpec, Protected32Entry, load_kernel, load_kernel_image
from spec_images import elf, mb_header
from vmm_elfbuild import parse_info

MiB = 1 << 20
RAM = 32 * MiB
KLUDGE = 1 << 16


def run_plan(plan, ram_size=RAM, fill=0xCC):
    """Apply a plan to a RAM image pre-filled with garbage (low RAM only)."""
    ram = bytearray([fill]) * min(ram_size, 64 * MiB)

    def write(addr, data):
        ram[addr : addr + len(data)] = data

    plan.apply(write)
    return ram


def flat_kernel(code=b"\xf4" * 16, header_offset=0, load_addr=0x100000, bss=0x1000, entry_off=None):
    header_addr = load_addr + header_offset
    body_len = header_offset + 32 + len(code)
    entry = load_addr + (entry_off if entry_off is not None else header_offset + 32)
    kludge = (header_addr, load_addr, load_addr + body_len, load_addr + body_len + bss, entry)
    return bytes(header_offset) + mb_header(KLUDGE | 3, kludge) + code


def test_aout_kludge_flat_binary_loads_at_load_addr_with_bss():
    kernel = flat_kernel(code=b"\x90" * 100)
    plan = load_kernel_image(kernel, RAM, cmdline="console=ttyS0")
    assert plan.kind == "multiboot-aout-kludge"
    assert isinstance(plan.entry, Protected32Entry)
    assert plan.entry.eip == 0x100020 and plan.entry.eax == 0x2BADB002 and plan.entry.ebx == plan.info_addr
    ram = run_plan(plan)
    assert ram[0x100000 : 0x100000 + len(kernel)] == kernel
    assert ram[0x100000 + len(kernel) : 0x100000 + len(kernel) + 0x1000] == bytes(0x1000)
    assert plan.kernel_start == 0x100000 and plan.kernel_end == 0x100000 + len(kernel) + 0x1000


def test_aout_kludge_load_offset_follows_the_spec():
    # header at file offset 0x40 but header_addr - load_addr = 0x20: loading starts at file offset 0x20
    code = b"\xaa" * 64
    head = mb_header(KLUDGE, (0x200020, 0x200000, 0, 0, 0x200000))
    kernel = b"\x11" * 0x20 + b"\x22" * 0x20 + head + code
    plan = load_kernel_image(kernel, RAM)
    ram = run_plan(plan)
    assert ram[0x200000 : 0x200000 + len(kernel) - 0x20] == kernel[0x20:]
    assert plan.zero_fills == ()


def test_aout_kludge_errors():
    with pytest.raises(InputError, match="0x20 bytes before the beginning of the file"):
        load_kernel_image(mb_header(KLUDGE, (0x100020, 0x100000, 0, 0, 0x100020)) + bytes(64), RAM)
    with pytest.raises(InputError, match="truncated kernel: the multiboot header loads file bytes 0x0-0x1000"):
        load_kernel_image(mb_header(KLUDGE, (0x100000, 0x100000, 0x101000, 0, 0x100000)) + bytes(64), RAM)
    with pytest.raises(InputError, match="bss_end_addr 0x100010 is below the end of the loaded image 0x100060"):
        load_kernel_image(mb_header(KLUDGE, (0x100000, 0x100000, 0, 0x100010, 0x100000)) + bytes(64), RAM)
    with pytest.raises(InputError, match="entry_addr 0x300000 is outside the loaded image"):
        load_kernel_image(mb_header(KLUDGE, (0x100000, 0x100000, 0, 0, 0x300000)) + bytes(64), RAM)
    with pytest.raises(InputError, match="truncated multiboot header at offset 0x0"):
        load_kernel_image(mb_header(KLUDGE) + b"\0" * 8, RAM)


def test_header_search_covers_exactly_the_first_8192_bytes_aligned():
    def kernel_with_header_at(offset):
        head = mb_header(KLUDGE, (0x100000 + offset, 0x100000, 0, 0, 0x100000))
        return bytes(offset) + head + bytes(64)

    assert load_kernel_image(kernel_with_header_at(8180), RAM).kind == "multiboot-aout-kludge"
    with pytest.raises(InputError, match="no multiboot header in the first 8192 bytes and not an ELF"):
        load_kernel_image(kernel_with_header_at(8192), RAM)
    misaligned = bytes(2) + mb_header(KLUDGE, (0x100002, 0x100000, 0, 0, 0x100002)) + bytes(64)
    with pytest.raises(InputError, match="no multiboot header"):
        load_kernel_image(misaligned, RAM)


def test_bad_checksum_and_unsupported_required_flags():
    with pytest.raises(InputError, match="multiboot header at offset 0x0 has checksum 0x00000000, expected 0xe4524ffb"):
        load_kernel_image(mb_header(3, checksum=0) + bytes(64), RAM)
    with pytest.raises(InputError, match="require a video mode"):
        load_kernel_image(mb_header(KLUDGE | 4, (0x100000, 0x100000, 0, 0, 0x100000)) + bytes(64), RAM)
    with pytest.raises(InputError, match=r"require unknown features \(bits 0x8\)"):
        load_kernel_image(mb_header(KLUDGE | 8, (0x100000, 0x100000, 0, 0, 0x100000)) + bytes(64), RAM)
    # unknown *optional* bits (31:17) are fine
    assert load_kernel_image(mb_header(KLUDGE | (1 << 20), (0x100000, 0x100000, 0, 0, 0x100000)) + bytes(64), RAM)


def test_multiboot_elf32_loads_by_physical_address_and_translates_entry():
    code = b"\xf4" * 0x40
    kernel = elf(32, 3, 0xC0100010, [(0x100000, 0xC0100000, code, 0x3000)],
                 extra=mb_header(3), extra_offset=0x200)
    plan = load_kernel_image(kernel, RAM)
    assert plan.kind == "multiboot-elf32"
    assert plan.entry.eip == 0x100010
    ram = run_plan(plan)
    assert ram[0x100000:0x100040] == code and ram[0x100040:0x103000] == bytes(0x3000 - 0x40)


def test_info_structure_contents_and_modules(tmp_path):
    kernel_path = tmp_path / "kernel.bin"
    kernel_path.write_bytes(flat_kernel())
    (tmp_path / "initrd").write_bytes(b"I" * 5000)
    (tmp_path / "empty").write_bytes(b"")
    plan = load_kernel(kernel_path, RAM, cmdline="root=/dev/ram quiet",
                       modules=[ModuleSpec(str(tmp_path / "initrd"), "initrd arg=1"), str(tmp_path / "empty")])
    ram = run_plan(plan)
    info = parse_info(ram, plan.info_addr)
    assert info["flags"] & 0b1001001101 == 0b1001001101  # mem, cmdline, mods, mmap, loader name
    assert info["mem_lower"] == 639 and info["mem_upper"] == (RAM - MiB) // 1024
    assert info["cmdline"] == "root=/dev/ram quiet"
    assert info["boot_loader_name"] == "cetvm"
    (s1, e1, c1), (s2, e2, c2) = info["mods"]
    assert c1 == "initrd arg=1" and c2 == str(tmp_path / "empty")
    assert s1 % 4096 == 0 and s2 % 4096 == 0 and s1 >= plan.kernel_end
    assert ram[s1:e1] == b"I" * 5000 and e2 == s2 and s2 >= e1
    assert (0, 0x9FC00, 1) in info["mmap"] and (0x100000, RAM - MiB, 1) in info["mmap"]
    assert all(t == 2 for base, length, t in info["mmap"] if base in (0x9FC00, 0xF0000))
    info_end = plan.info_addr + 512
    assert info_end <= plan.kernel_start or plan.info_addr >= e2


def test_info_moves_out_of_the_way_of_a_low_kernel():
    kernel = flat_kernel(load_addr=0x8000, bss=0x10000)
    plan = load_kernel_image(kernel, RAM, cmdline="x")
    assert plan.info_addr >= plan.kernel_end
    assert parse_info(run_plan(plan), plan.info_addr)["cmdline"] == "x"


def test_high_ram_is_above_4g_in_the_memory_map():
    plan = load_kernel_image(flat_kernel(), 4 << 30)
    mmap = parse_info(run_plan(plan, ram_size=64 * MiB), plan.info_addr)["mmap"]
    assert (0x100000, 0xC0000000 - MiB, 1) in mmap and (1 << 32, 1 << 30, 1) in mmap


def test_module_errors(tmp_path):
    kernel = flat_kernel()
    with pytest.raises(InputError, match=r"module 'm' at 0x100000-0x100fff overlaps kernel image at 0x100000"):
        load_kernel_image(kernel, RAM, modules=[(ModuleSpec("m", addr=0x100000), b"x" * 4096)])
    with pytest.raises(InputError, match="module 'big' at .* lies outside RAM below 4 GiB"):
        load_kernel_image(kernel, 4 * MiB, modules=[(ModuleSpec("big"), b"x" * (4 * MiB))])
    with pytest.raises(InputError, match="not 4 KiB aligned"):
        load_kernel_image(kernel, RAM, modules=[(ModuleSpec("m", addr=0x300010), b"x")])
    (tmp_path / "k").write_bytes(kernel)
    with pytest.raises(InputError, match=r"module file '.*nope': no such file"):
        load_kernel(tmp_path / "k", RAM, modules=[str(tmp_path / "nope")])


def elf64_kernel(paddr=0x200000, code=b"\xf4" * 32, memsz=0x2000, machine=62, etype=2, vaddr=None):
    vaddr = paddr if vaddr is None else vaddr
    return elf(64, machine, vaddr + 4, [(paddr, vaddr, code, memsz)], etype=etype)


def test_elf64_long_mode_entry_state():
    plan = load_kernel_image(elf64_kernel(vaddr=0xFFFFFFFF80200000), RAM, cmdline="hello")
    entry = plan.entry
    assert plan.kind == "elf64" and isinstance(entry, Long64Entry)
    assert entry.rip == 0x200004  # entry translated to its physical address
    assert entry.rbx == entry.rdi == plan.info_addr and entry.rax == entry.rsi == 0x2BADB002
    assert entry.rsp % 16 == 0 and RAM - 0x100000 < entry.rsp <= RAM
    assert entry.cr0 & 0x8000_0001 == 0x8000_0001 and entry.cr4 & 0x20 and entry.efer & 0x500 == 0x500
    ram = run_plan(plan)
    assert parse_info(ram, plan.info_addr)["cmdline"] == "hello"
    # GDT: CS selector -> present, DPL0, code, L=1, D=0
    cs = struct.unpack_from("<Q", ram, entry.gdt_base + entry.cs)[0]
    assert (cs >> 47) & 1 == 1 and (cs >> 45) & 3 == 0 and (cs >> 43) & 1 == 1
    assert (cs >> 53) & 1 == 1 and (cs >> 54) & 1 == 0
    assert entry.gdt_limit + 1 >= entry.cs + 8 and entry.gdt_limit + 1 >= entry.ds + 8


def walk(ram, cr3, va):
    """Translate through 4-level tables (2 MiB leaf pages expected)."""
    entry = cr3
    for level, shift in enumerate((39, 30, 21)):
        pte = struct.unpack_from("<Q", ram, (entry & 0xFFFFFFFFF000) + 8 * ((va >> shift) & 511))[0]
        assert pte & 1, f"not present at level {level} for {va:#x}"
        if level == 2:
            assert pte & 0x80 and pte & 2
            return (pte & 0xFFFFFFE00000) | (va & 0x1FFFFF)
        entry = pte


@pytest.mark.parametrize("va", [0, 0x1234, 0x200004, RAM - 8, 0xBFFFFFFF, 0xFEE00030, 0xFFFFFFFF])
def test_boot_page_tables_identity_map_low_4g(va):
    plan = load_kernel_image(elf64_kernel(), RAM)
    assert walk(run_plan(plan), plan.entry.cr3, va) == va


def test_elf64_errors():
    with pytest.raises(InputError, match=r"ELF machine is AArch64 \(183\), expected x86-64 \(62\)"):
        load_kernel_image(elf64_kernel(machine=183), RAM)
    with pytest.raises(InputError, match=r"ELF machine is ARM \(40\), expected x86-64 \(62\)"):
        load_kernel_image(elf(32, 40, 0x100000, [(0x100000, 0x100000, b"x", 1)]), RAM)
    with pytest.raises(InputError, match="32-bit ELF without a multiboot header"):
        load_kernel_image(elf(32, 3, 0x100000, [(0x100000, 0x100000, b"x", 1)]), RAM)
    with pytest.raises(InputError, match=r"ET_DYN \(position-independent\).*-static -no-pie"):
        load_kernel_image(elf64_kernel(etype=3), RAM)
    with pytest.raises(InputError, match="ELF segment 0 at 0x2200000-0x2201fff lies outside RAM"):
        load_kernel_image(elf64_kernel(paddr=0x2200000), RAM)
    with pytest.raises(InputError, match="ELF segment 0 at 0x2000-0x3fff overlaps boot GDT and page tables"):
        load_kernel_image(elf64_kernel(paddr=0x2000), RAM)
    with pytest.raises(InputError, match="64-bit ELF with a multiboot header but no a.out kludge"):
        load_kernel_image(elf(64, 62, 0x100000, [(0x100000, 0x100000, b"x", 1)], extra=mb_header(0), extra_offset=0x200), RAM)
    with pytest.raises(InputError, match="64 KiB boot stack .* overlaps ELF segment 0"):
        load_kernel_image(elf64_kernel(paddr=RAM - 0x4000, memsz=0x1000), RAM)


def test_malformed_files():
    good = elf64_kernel()
    with pytest.raises(InputError, match=r"kernel: no multiboot header in the first 8192 bytes and not an ELF file \(starts with b'MZ"):
        load_kernel_image(b"MZ\x90\x00" + bytes(100), RAM)
    with pytest.raises(InputError, match="truncated ELF: ELF header at offset 0x10 needs 48 bytes"):
        load_kernel_image(good[:40], RAM)
    with pytest.raises(InputError, match="truncated ELF: program header 0 at offset 0x40"):
        load_kernel_image(good[:80], RAM)
    with pytest.raises(InputError, match="truncated ELF: segment 0 needs file bytes 0x1000-0x1020"):
        load_kernel_image(good[:0x1010], RAM)
    with pytest.raises(InputError, match="ELF data encoding 2 is not little-endian"):
        load_kernel_image(good[:5] + b"\x02" + good[6:], RAM)
    with pytest.raises(InputError, match="file size 0x20 larger than its memory size 0x10"):
        load_kernel_image(elf64_kernel(memsz=0x10), RAM)


def test_entry_point_must_be_loaded_and_kernels_stay_below_4g():
    with pytest.raises(InputError, match="ELF entry point 0x500000 is not inside any loadable segment"):
        load_kernel_image(elf(64, 62, 0x500000, [(0x200000, 0x200000, b"x", 0x1000)]), RAM)
    with pytest.raises(InputError, match="ELF segment 0 at 0x100000000-0x100000fff lies outside RAM below 4 GiB"):
        load_kernel_image(elf64_kernel(paddr=1 << 32, memsz=0x1000), 8 << 30)


def test_file_and_ram_errors(tmp_path):
    with pytest.raises(InputError, match=r"kernel file '.*missing': no such file"):
        load_kernel(tmp_path / "missing", RAM)
    with pytest.raises(InputError, match="RAM size 0x100000 is too small: at least 2 MiB"):
        load_kernel_image(elf64_kernel(), MiB)
