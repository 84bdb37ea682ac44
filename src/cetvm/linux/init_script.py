"""The guest's ``/init`` (a busybox ``sh`` script of ours) and the kernel command lines that
steer it.

What /init does, in order (every line it prints itself starts with :data:`INIT_PREFIX`, so
:mod:`cetvm.linux.results` can tell them from test output and kernel messages):

1. installs the busybox applets, mounts proc, sysfs and devtmpfs, and stops kernel messages
   from reaching the console (``dmesg -n 1``: test output is not interleaved with them);
2. ``start``: the kernel release and the options it read;
3. ``dmesg:`` the kernel's CET lines (``CET detected: Indirect Branch Tracking enabled``,
   control-protection faults), ``cpuflag NAME yes|no`` for user_shstk, ibt and shstk in
   /proc/cpuinfo;
4. ``tests NAME...``, then per program ``run NAME`` — run as the unprivileged user
   :data:`TEST_USER` (uid 65534), see below — its own output (TAP or the selftest's
   ``[OK]``/``[FAIL]``/``[SKIP]`` lines), ``exit NAME STATUS`` (128+N: killed by signal N;
   143: stopped by the per-program time limit, as SIGTERM);
5. the CET lines the kernel logged during the tests, ``done``, and ``poweroff -f``.

Why the programs run unprivileged (a decision): Linux 6.12 refuses userfaultfd registration on
shadow-stack memory (``vma_can_userfault()`` returns false for VM_SHADOW_STACK), yet the same
tree's test_shadow_stack_64 expects it to work and reports "[FAIL] Userfaultfd test" as root —
on real CET hardware too — and then skips its remaining tests (guard gap, ptrace, 32 bit). An
unprivileged user cannot create a userfaultfd for kernel faults (vm.unprivileged_userfaultfd
= 0), so the selftest prints "[SKIP] Userfaultfd unavailable." and goes on, exactly the output in
the KVM CET series' cover letter. Our own programs need no privilege either.

Kernel command-line options (the kernel leaves dotted ``x.y=z`` options to modules, so /init
reads them from /proc/cmdline):

``cetvm.tests=all|none|NAME[,NAME...]``  which programs under /opt/cetvm/tests run (default all)
``cetvm.mode=test|shell``  ``shell``: after the selected tests (default none), an interactive
                           shell on the console; the machine powers off when it exits
``cetvm.timeout=SECONDS``  time limit per program (default 300; 0: none)
``cetvm.exit=poweroff|reboot|halt``  how /init ends the machine (default poweroff: ACPI S5 when
                           the platform has it; reboot: the kernel's reset paths, which a VMM run
                           with "no reboot" treats as the end; halt: stop the CPUs)
"""

from __future__ import annotations

from dataclasses import dataclass

#: Where the test programs live in the initramfs.
TESTS_DIR = "opt/cetvm/tests"
#: Prefix of every line /init prints itself.
INIT_PREFIX = "cetvm-init:"
#: The console the guest uses (the 8250 UART at 0x3f8).
CONSOLE = "ttyS0"
#: Exit status of a program stopped by the time limit (busybox timeout: SIGTERM, 128 + 15).
TIMEOUT_STATUS = 143
#: The user the test programs run as (see the module docstring), with its /etc/passwd and
#: /etc/group lines.
TEST_USER = "nobody"
PASSWD = "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
#: The CPU flags /init reports.
CPU_FLAGS = ("user_shstk", "ibt", "shstk")
#: Kernel log lines about CET that /init shows (extended regular expression for grep -E).
CET_LOG_PATTERN = "CET|Indirect Branch Tracking|[Ss]hadow [Ss]tack|control protection|shstk|ibt"
MODES = ("test", "shell")
#: How /init ends the machine (busybox applets, -f: at once, no init system to ask).
EXITS = ("poweroff", "reboot", "halt")

INIT_TEMPLATE = r"""#!/bin/busybox sh
# cetvm's /init for a Linux guest with CET: see cetvm.linux.init_script.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
dmesg -n 1

say() { echo "@PREFIX@ $*"; }
tests=@DEFAULT_TESTS@
mode=test
limit=@DEFAULT_TIMEOUT@
finish=poweroff
tests_given=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        cetvm.tests=*) tests="${arg#cetvm.tests=}"; tests_given=1 ;;
        cetvm.mode=*) mode="${arg#cetvm.mode=}" ;;
        cetvm.timeout=*) limit="${arg#cetvm.timeout=}" ;;
        cetvm.exit=*) finish="${arg#cetvm.exit=}" ;;
    esac
done
case "$finish" in poweroff|reboot|halt) ;; *) say "unknown cetvm.exit=$finish (poweroff, reboot or halt): using poweroff"; finish=poweroff ;; esac
case "$mode" in test|shell) ;; *) say "unknown cetvm.mode=$mode (test or shell): using test"; mode=test ;; esac
if [ "$mode" = shell ] && [ -z "$tests_given" ]; then tests=none; fi
say "start kernel=$(uname -r) mode=$mode tests=$tests timeout=$limit"

dmesg | grep -E '@CET_LOG@' | while IFS= read -r line; do say "dmesg: $line"; done
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
for flag in @CPU_FLAGS@; do
    case "$flags" in *" $flag "*) say "cpuflag $flag yes" ;; *) say "cpuflag $flag no" ;; esac
done

available=$(ls /@TESTS_DIR@ 2>/dev/null | sort)
case "$tests" in
    all) selected="$available" ;;
    none) selected= ;;
    *) selected=$(echo "$tests" | tr ',' ' ') ;;
esac
say "tests" $selected
dmesg -c >/dev/null
for name in $selected; do
    say "run $name"
    if [ ! -x "/@TESTS_DIR@/$name" ]; then
        say "missing $name (available: $(echo $available))"
        say "exit $name 127"
        continue
    fi
    if [ "$limit" -gt 0 ] 2>/dev/null; then
        su -s /bin/sh @TEST_USER@ -c "timeout $limit /@TESTS_DIR@/$name" </dev/null 2>&1
    else
        su -s /bin/sh @TEST_USER@ -c "/@TESTS_DIR@/$name" </dev/null 2>&1
    fi
    say "exit $name $?"
done
dmesg | grep -E '@CET_LOG@|segfault|traps:' | while IFS= read -r line; do say "dmesg: $line"; done

if [ "$mode" = shell ]; then
    say "shell (exit it to power off)"
    setsid cttyhack sh -l || sh -l
fi
say "done"
sync
$finish -f
"""


@dataclass(frozen=True)
class InitOptions:
    """Defaults baked into /init (the command line overrides them)."""

    tests: str = "all"
    timeout: int = 300


def init_script(options: InitOptions = InitOptions()) -> str:
    """The text of /init."""
    replacements = {
        "@PREFIX@": INIT_PREFIX,
        "@DEFAULT_TESTS@": options.tests,
        "@DEFAULT_TIMEOUT@": str(options.timeout),
        "@CET_LOG@": CET_LOG_PATTERN,
        "@CPU_FLAGS@": " ".join(CPU_FLAGS),
        "@TESTS_DIR@": TESTS_DIR,
        "@TEST_USER@": TEST_USER,
    }
    text = INIT_TEMPLATE
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


def check_test_names(names: list[str], available: list[str] | None = None) -> None:
    """Test names must be plain program names (and, when the list is known, present)."""
    for name in names:
        if not name or "/" in name or "," in name or any(c.isspace() for c in name):
            raise ValueError(f"bad test program name {name!r}")
        if available is not None and name not in available:
            raise ValueError(f"no test program {name!r} in this initramfs (it has: {', '.join(available)})")


def kernel_cmdline(tests: str | list[str] = "all", mode: str = "test", timeout: int | None = None,
                   extra: str = "", console: str = CONSOLE, finish: str = "poweroff") -> str:
    """The kernel command line that runs ``tests`` (``"all"``, ``"none"`` or names) in
    ``mode`` with the console on ``console`` and ends the machine with ``finish``;
    ``panic=-1`` so a kernel panic ends the run (as a reboot)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    if finish not in EXITS:
        raise ValueError(f"unknown exit {finish!r} (one of {', '.join(EXITS)})")
    if isinstance(tests, str):
        selection = tests
        if tests not in ("all", "none"):
            check_test_names(tests.split(","))
    else:
        check_test_names(list(tests))
        selection = ",".join(tests) if tests else "none"
    words = [f"console={console}", "panic=-1", f"cetvm.tests={selection}"]
    if mode != "test":
        words.append(f"cetvm.mode={mode}")
    if timeout is not None:
        words.append(f"cetvm.timeout={int(timeout)}")
    if finish != "poweroff":
        words.append(f"cetvm.exit={finish}")
    if extra:
        words.append(extra)
    return " ".join(words)
