"""`cetvm linux-guest`: download and build a Linux guest with CET (kernel + initramfs).

Prints the paths a VMM needs (bzImage, initrd, System.map) and the kernel command line;
progress lines for the long steps go to stderr. Everything lives in the user's cache
(:func:`cetvm.linux.default_cache_dir`); a rerun reuses it without the network.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from cetvm import InputError
from cetvm.linux import LinuxGuest, default_cache_dir, linux_guest
from cetvm.linux import packages as pins
from cetvm.linux.init_script import MODES, TESTS_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "linux-guest",
        help="download Debian's CET-enabled Linux kernel and build an initramfs with CET tests",
        description=(
            f"Build a Linux guest that tests CET: Debian's kernel {pins.KERNEL_RELEASE} "
            "(CONFIG_X86_KERNEL_IBT, CONFIG_X86_USER_SHADOW_STACK) and an initramfs with busybox, "
            "cetvm's /init and cetvm's static user shadow-stack tests (guests/linux). Packages are "
            "fetched with 'apt-get download' (no root needed once apt's package lists exist; as root "
            "a missing list is fetched with 'apt-get update'), checked against pinned SHA-256 values "
            f"and kept in the cache (default {default_cache_dir()}, from XDG_CACHE_HOME): reruns "
            "need no network. The guest's /init prints its results on the serial console (ttyS0) "
            "and powers off; kernel options select what runs: cetvm.tests=all|none|NAME,NAME "
            "(default all), cetvm.mode=test|shell (shell: an interactive shell after the tests), "
            "cetvm.timeout=SECONDS per program (default 300)."
        ),
        epilog=(
            "Examples: 'cetvm linux-guest' (~37 MB download the first time); 'cetvm linux-guest "
            "--selftest' also builds the kernel's test_shadow_stack_64 from linux-source-6.12 "
            "(153 MB); 'cetvm linux-guest --mode shell --tests none' prints a command line for an "
            "interactive shell. Boot the result with the printed qemu-system-x86_64 or cetvm boot "
            "command."
        ),
    )
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where packages and the initramfs are kept (default: $XDG_CACHE_HOME/cetvm/linux "
                             "or ~/.cache/cetvm/linux)")
    parser.add_argument("--selftest", action="store_true",
                        help=f"add the kernel's shadow-stack selftest ({pins.SELFTEST_BINARY}), built with gcc "
                             f"-static from {pins.LINUX_SOURCE.name} {pins.LINUX_SOURCE.version} (153 MB download "
                             "once; only its one source file is extracted)")
    parser.add_argument("--symbols", action="store_true",
                        help=f"fetch the kernel's real System.map from {pins.KERNEL_DBG.name} (318 MB download "
                             "once) for symbolized reports; the kernel package's own System.map is a stub")
    parser.add_argument("--offline", action="store_true",
                        help="never download: fail when a package is not in the cache yet")
    parser.add_argument("--tests", default="all", metavar="all|none|NAME,NAME",
                        help=f"the programs (under /{TESTS_DIR}) the printed command line runs (default all)")
    parser.add_argument("--mode", choices=MODES, default="test",
                        help="test: run the tests and power off; shell: then an interactive shell on the console (default test)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def _progress(line: str) -> None:
    print(f"cetvm linux-guest: {line}", file=sys.stderr, flush=True)


def describe(guest: LinuxGuest, cmdline: str) -> dict:
    """What the command prints, as plain data (the --json object)."""
    return {
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "system_map": str(guest.system_map) if guest.system_map else None,
        "config": str(guest.config),
        "cmdline": cmdline,
        "tests": list(guest.tests),
        "selftest": str(guest.selftest) if guest.selftest else None,
        "packages": list(guest.packages),
    }


def boot_commands(guest: LinuxGuest, cmdline: str) -> list[str]:
    """Command lines that boot the guest (cetvm's and QEMU's)."""
    cetvm = ["cetvm", "boot", "--kernel", str(guest.kernel), "--initrd", str(guest.initrd), "--append", cmdline]
    return [shlex.join(cetvm), shlex.join(guest.qemu_argv(cmdline))]


def run(args: argparse.Namespace) -> int:
    guest = linux_guest(args.cache_dir, with_selftest=args.selftest, with_symbols=args.symbols,
                        download=not args.offline, progress=_progress)
    tests = args.tests if args.tests in ("all", "none") else [t for t in args.tests.split(",") if t]
    if not tests:
        raise InputError("--tests: give all, none or program names separated by commas")
    unknown = [t for t in tests if t not in guest.tests] if isinstance(tests, list) else []
    if unknown:
        raise InputError(f"--tests: no program {', '.join(unknown)} in this guest (it has: {', '.join(guest.tests)})")
    cmdline = guest.cmdline_for(tests, args.mode)
    facts = describe(guest, cmdline)
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    map_note = f"(not fetched: --symbols downloads {pins.KERNEL_DBG.name}, 318 MB)"
    rows = [("kernel", facts["kernel"]), ("initrd", facts["initrd"]),
            ("system-map", facts["system_map"] or map_note), ("cmdline", cmdline),
            ("tests", " ".join(guest.tests) + ("" if guest.selftest else "  (--selftest adds test_shadow_stack_64)"))]
    for name, value in rows:
        print(f"{name:<11} {value}")
    print("\nboot it with:")
    for command in boot_commands(guest, cmdline):
        print(f"  {command}")
    return 0
