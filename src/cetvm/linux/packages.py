"""The Debian packages a Linux guest is made of, pinned (one place for every version and hash).

Debian 12 "bookworm" (bookworm-security for the kernel): the cloud kernel is built with
CONFIG_X86_KERNEL_IBT=y and CONFIG_X86_USER_SHADOW_STACK=y, boots with a virtio/8250 console,
and its linux-source package of the same version carries the kernel's shadow-stack selftest.
The SHA-256 values are those of the archive's Packages index for these exact versions; a
download that does not match is refused.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DebPackage:
    """One pinned Debian package: what ``apt-get download NAME=VERSION`` fetches."""

    name: str
    version: str
    sha256: str
    size: int

    @property
    def spec(self) -> str:
        """``NAME=VERSION``, the argument of ``apt-get download``."""
        return f"{self.name}={self.version}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


#: ``uname -r`` of the pinned kernel (names its files under /boot in the package).
KERNEL_RELEASE = "6.12.113+deb12-cloud-amd64"

KERNEL = DebPackage(
    name=f"linux-image-{KERNEL_RELEASE}-unsigned",
    version="6.12.113-1~deb12u1",
    sha256="24f45229dd701f543d147344cac033799c5bfbbe18b5c8774e762f4414bd878c",
    size=34218800,
)

BUSYBOX = DebPackage(
    name="busybox-static",
    version="1:1.35.0-4+deb12u1+b1",
    sha256="3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
    size=928188,
)

#: The kernel's debug package: its real System.map (the one in KERNEL is a one-line stub) comes
#: first in its data tarball, so only a few MB of its 318 MB are decompressed.
KERNEL_DBG = DebPackage(
    name=f"linux-image-{KERNEL_RELEASE}-dbg",
    version="6.12.113-1~deb12u1",
    sha256="a1ed543f46ffc88b3a296bfc1fded7671349a727acc96d21ca2c8b7d1181d450",
    size=317720128,
)

#: The kernel sources of the same version: only the selftest is taken out of it.
LINUX_SOURCE = DebPackage(
    name="linux-source-6.12",
    version="6.12.113-1~deb12u1",
    sha256="917fe4c417b61dc76822ff4e2182f1bbf1c2f9e9d1f1f3eff2d0e65d17195ce4",
    size=153095016,
)

#: Files taken from each package (data tarball path → name in the cache).
KERNEL_FILES = {
    f"boot/vmlinuz-{KERNEL_RELEASE}": "vmlinuz",
    f"boot/config-{KERNEL_RELEASE}": "config",
}
BUSYBOX_FILES = {"bin/busybox": "busybox"}
KERNEL_DBG_FILES = {f"usr/lib/debug/boot/System.map-{KERNEL_RELEASE}": "System.map"}
#: The tarball inside linux-source and the selftest file inside that.
LINUX_SOURCE_TARBALL = "usr/src/linux-source-6.12.tar.xz"
SELFTEST_SOURCE = "linux-source-6.12/tools/testing/selftests/x86/test_shadow_stack.c"
#: Its build, as the selftests' x86 Makefile builds the 64-bit variant, plus -static for a
#: guest without a dynamic loader.
SELFTEST_CFLAGS = ("-m64", "-O2", "-g", "-std=gnu99", "-pthread", "-Wall", "-no-pie", "-static", "-DCAN_BUILD_64")
SELFTEST_LIBS = ("-lrt", "-ldl")
SELFTEST_BINARY = "test_shadow_stack_64"
