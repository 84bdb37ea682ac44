"""cetvm — a software x86-64 machine with Intel CET, virtualized the way Linux KVM does it.

Layers (arrows point down only):
cli → vmm, linux, kvm, report;  kvm → cpu, xstate, cpuid, arch;  cpu → xstate, cpuid, arch;
xstate → cpuid, arch;  cpuid → arch;  arch holds facts only.
"""

__version__ = "0.1.0"


class CetvmError(Exception):
    """Base class of every error cetvm reports to a user (never shown as a traceback)."""


class InputError(CetvmError):
    """Malformed user input (a dump, an ELF, a command-line value): exit status 2."""


class NotSupportedError(CetvmError):
    """A feature cetvm does not implement (yet); the message says what exactly."""
