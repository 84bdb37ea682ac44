"""Errors of the KVM model: load refusal and ioctl-style failures.

Every error the KVM-shaped API (:mod:`cetvm.kvm.api`) raises is a :class:`KvmError` with an
``errno`` — the negated value the kernel's ioctl would return — so a caller can handle it the
way a VMM handles ``-1`` and ``errno`` from /dev/kvm:

- :class:`KvmIoctlError`: an ioctl failed; the subclasses fix the errno: EINVAL
  (:class:`KvmInvalidArgument`: a value the ioctl refuses, or an argument of the wrong type or
  width — the Python form of a struct field that cannot hold it), EEXIST
  (:class:`KvmExists`), E2BIG (:class:`KvmTooBig`), ENOMEM (:class:`KvmNoMemory`), EFAULT (:class:`KvmBadAddress`: guest
  memory outside every memory slot), EOPNOTSUPP (:class:`KvmNotSupported`: something cetvm's
  KVM does not implement).
- :class:`KvmLoadError`: KVM refuses to load on the host (kvm_x86_vendor_init failed).

Two subclasses keep the plain cetvm classes the API raised before, so existing callers keep
working: :class:`KvmBadAddress` is also an :class:`~cetvm.InputError` (the VMM's loaders report
"outside RAM" as bad input), :class:`KvmNotSupported` a :class:`~cetvm.NotSupportedError`.
"""

from __future__ import annotations

import errno as _errno

from cetvm import CetvmError, InputError, NotSupportedError


class KvmError(CetvmError):
    """Base class of every KVM-model error; ``errno`` is the positive errno value."""

    #: The errno of the class (instances may carry another one, see KvmIoctlError).
    ERRNO: int = _errno.EINVAL

    def __init__(self, message: str, err: int | None = None) -> None:
        self.errno = self.ERRNO if err is None else err
        super().__init__(f"{message} ({_errno.errorcode.get(self.errno, self.errno)})")


class KvmLoadError(KvmError):
    """KVM refuses to load on this host (kvm_x86_vendor_init returned an error)."""

    ERRNO = _errno.EOPNOTSUPP

    def __init__(self, message: str, err: int | None = None) -> None:
        # The reason is shown as it is (the CLI prints it after "error:"), without the errno name.
        self.errno = self.ERRNO if err is None else err
        CetvmError.__init__(self, message)


class KvmIoctlError(KvmError):
    """An ioctl-shaped call failed the way the kernel would: ``errno`` is the negated return.

    ``KvmIoctlError(errno.EXXX, message)`` carries any errno; the subclasses below fix it.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message, err)


class _FixedErrno(KvmIoctlError):
    def __init__(self, message: str) -> None:
        super().__init__(self.ERRNO, message)


class KvmInvalidArgument(_FixedErrno):
    """-EINVAL: a value the ioctl refuses, or an argument that does not fit its field."""

    ERRNO = _errno.EINVAL


class KvmExists(_FixedErrno):
    """-EEXIST: the object (memory slot range, pending interrupt) is already there."""

    ERRNO = _errno.EEXIST


class KvmTooBig(_FixedErrno):
    """-E2BIG: more entries than the ioctl takes in one call (KVM_GET/SET_MSRS: MAX_IO_MSRS)."""

    ERRNO = _errno.E2BIG


class KvmNoMemory(_FixedErrno):
    """-ENOMEM: the host could not allocate what the call needs (guest RAM)."""

    ERRNO = _errno.ENOMEM


class KvmBadAddress(_FixedErrno, InputError):
    """-EFAULT: guest-physical memory that no memory slot backs."""

    ERRNO = _errno.EFAULT


class KvmNotSupported(_FixedErrno, NotSupportedError):
    """-EOPNOTSUPP: valid for KVM, but not implemented by cetvm's KVM (the message says what)."""

    ERRNO = _errno.EOPNOTSUPP
