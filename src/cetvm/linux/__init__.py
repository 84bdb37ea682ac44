"""Linux guests: Debian's CET-enabled kernel with an initramfs of our own (busybox, /init, our
static CET tests, the kernel's shadow-stack selftest), and the parser of what the guest prints.

This layer sits above :mod:`cetvm.vmm` and never talks to :mod:`cetvm.kvm`: a Linux guest is a
kernel, an initrd and a command line that a VMM (cetvm's, or QEMU) boots.

    from cetvm.linux import linux_guest, parse_console
    guest = linux_guest(with_selftest=True)
    ...boot guest.kernel / guest.initrd / guest.cmdline, capture the serial console...
    report = parse_console(console_text)
    assert report.all_passed, report.summary()
"""

from cetvm.linux.errors import RecipeError
from cetvm.linux.init_script import kernel_cmdline
from cetvm.linux.recipe import LinuxGuest, NotCached, default_cache_dir, linux_guest
from cetvm.linux.results import Check, GuestReport, Outcome, ProgramRun, parse_console, parse_program_output

__all__ = ["Check", "GuestReport", "LinuxGuest", "NotCached", "Outcome", "ProgramRun", "RecipeError",
           "default_cache_dir", "kernel_cmdline", "linux_guest", "parse_console", "parse_program_output"]
