"""Issue 10: `cetvm boot --kernel bzImage --initrd FILE --append CMDLINE` through the Linux x86 boot
protocol's 64-bit entry (:mod:`cetvm.vmm.loader.linux`).

The guest is a minimal bzImage of our own (guests/vmm/bzimage.S): a real setup header and a 64-bit
entry that checks what the protocol promises (selectors, IF, the zero page's header copy,
code32_start, the initrd, the E820 map), prints the command line and exits 0x10 (status 33), or
0x40 + the number of the check that failed. The loader's refusals are unit-tested on headers built
here from that image.
"""

from __future__ import annotations

import struct

import pytest

from boot_support import boot
from cetvm import InputError
from cetvm.vmm.layout import E820Type
from cetvm.vmm.loader import load_kernel
from cetvm.vmm.loader.linux import ZeroPage, load_linux_image, parse_setup_header
from guest_build import GUESTS, built_guest

ALL_CHECKS_PASSED = (0x10 << 1) | 1
MiB = 1 << 20


@pytest.fixture(scope="module")
def bzimage():
    return built_guest("vmm/bzimage.bin", GUESTS / "vmm")


@pytest.fixture
def initrd(tmp_path):
    path = tmp_path / "initrd.img"
    path.write_bytes(b"INITRD!!" + bytes(range(256)) * 40 + b"$")
    return path


def test_a_bzimage_boots_with_initrd_and_command_line(capsys, bzimage, initrd):
    run = boot(capsys, "--kernel", str(bzimage), "--initrd", str(initrd), "--append", "console=ttyS0 quiet",
               "--max-instructions", "100000")
    assert run.status == ALL_CHECKS_PASSED, run.err
    assert run.out == "console=ttyS0 quiet"


def test_the_positional_image_works_too_but_not_both(capsys, bzimage, initrd):
    assert boot(capsys, str(bzimage), "--initrd", str(initrd)).status == ALL_CHECKS_PASSED
    run = boot(capsys, str(bzimage), "--kernel", str(bzimage))
    assert run.status == 2 and "either as IMAGE or as --kernel" in run.err


def test_zero_page_fields(bzimage, initrd):
    plan = load_kernel(bzimage, 64 * MiB, "root=/dev/ram0", [str(initrd)])
    assert plan.kind == "linux"
    images = {i.what: i for i in plan.images}
    zero = images["zero page (boot_params)"].data
    size = initrd.stat().st_size
    assert struct.unpack_from("<II", zero, ZeroPage.RAMDISK_IMAGE) == (images["initrd"].addr, size)
    assert images["initrd"].addr % 4096 == 0 and images["initrd"].addr + size <= 64 * MiB
    assert images["kernel command line"].data == b"root=/dev/ram0\0"
    assert struct.unpack_from("<I", zero, ZeroPage.CMD_LINE_PTR)[0] == images["kernel command line"].addr
    assert zero[ZeroPage.TYPE_OF_LOADER] == 0xFF and zero[ZeroPage.SENTINEL] == 0
    entries = zero[ZeroPage.E820_ENTRIES]
    e820 = [struct.unpack_from("<QQI", zero, ZeroPage.E820_TABLE + 20 * i) for i in range(entries)]
    assert e820[-1] == (MiB, 63 * MiB, E820Type.RAM)
    assert plan.entry.rip == 0x1000000 + 0x200 and plan.entry.rsi == images["zero page (boot_params)"].addr
    assert (plan.entry.cs, plan.entry.ds) == (0x10, 0x18)


def _patched(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(image)
    struct.pack_into("<" + fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize("offset, fmt, value, message", [
    (ZeroPage.VERSION, "H", 0x020B, "boot protocol 2.11 is too old"),
    (ZeroPage.XLOADFLAGS, "H", 0, "no 64-bit entry point"),
    (ZeroPage.LOADFLAGS, "B", 0, "zImage"),
    (ZeroPage.KERNEL_ALIGNMENT, "I", 0x3000, "not a power of two"),
    (0x1FE, "H", 0, "boot_flag"),
])
def test_unsupported_bzimages_are_refused_with_the_reason(bzimage, offset, fmt, value, message):
    with pytest.raises(InputError, match=message):
        parse_setup_header(_patched(bzimage.read_bytes(), offset, fmt, value))


def test_placement_errors_name_what_does_not_fit(bzimage):
    data = bzimage.read_bytes()
    with pytest.raises(InputError, match="give more --memory"):
        load_linux_image(data, 16 * MiB)  # the kernel wants 16 MiB + init_size
    with pytest.raises(InputError, match="initrd .* does not fit"):
        load_linux_image(data, 32 * MiB, initrd=bytes(16 * MiB))
    with pytest.raises(InputError, match="accepts at most 2047"):
        load_linux_image(data, 32 * MiB, cmdline="x" * 3000)


def test_a_linux_kernel_takes_one_initrd(capsys, bzimage, initrd):
    run = boot(capsys, "--kernel", str(bzimage), "--initrd", str(initrd), "--initrd", str(initrd))
    assert run.status == 2 and "takes one initrd; 2 were given" in run.err


def test_a_truncated_bzimage_is_refused(capsys, tmp_path, bzimage):
    short = tmp_path / "short"
    short.write_bytes(bzimage.read_bytes()[:0x300])
    run = boot(capsys, "--kernel", str(short))
    assert run.status == 2 and "truncated" in run.err
