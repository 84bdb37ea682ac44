"""Errors of the KVM model: load refusal and ioctl-style failures."""

from __future__ import annotations

import errno as _errno

from cetvm import CetvmError


class KvmLoadError(CetvmError):
    """KVM refuses to load on this host (kvm_x86_vendor_init returned an error)."""


class KvmIoctlError(CetvmError):
    """An ioctl-shaped call failed the way the kernel would: ``errno`` is the negated return."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(f"{message} ({_errno.errorcode.get(err, err)})")
        self.errno = err
