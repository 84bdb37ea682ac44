"""kvm-unit-tests conformance: run every x86/unittests.cfg entry through a QEMU-compatible
binary (cetvm's front end, and QEMU TCG for comparison) and write ``docs/conformance.md``.

Each entry runs through kvm-unit-tests' own ``run_tests.sh NAME`` in the built tree (so the
verdict, the timeout of the entry and the skip rules are the suite's), with ``QEMU`` pointing
at the binary and ``unittest_log_dir`` at a private directory; the verdict is the PASS/FAIL/SKIP
line run_tests.sh prints, the failing report lines come from the entry's log (``FAIL:`` lines,
plus the last line on stderr when the run failed without one). Nothing of kvm-unit-tests is
copied: the built directory is an input.

For QEMU, a wrapper script (in a temporary directory) gives it the command line the issue
prescribes for TCG: ``-cpu host`` becomes ``-cpu max``, ``-enable-kvm`` is dropped and
``ACCEL=tcg``.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cetvm import InputError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_VERDICT = re.compile(r"^(PASS|FAIL|SKIP) (\S+)\s*(.*)$")
#: Seconds added to an entry's own timeout before the runner gives up on run_tests.sh itself.
GRACE = 60


@dataclass
class EntryResult:
    """One unittests.cfg entry: verdict, wall seconds, detail and failing report lines."""

    name: str
    verdict: str
    seconds: float
    detail: str = ""
    failures: list[str] = field(default_factory=list)


def list_entries(kut: Path) -> list[str]:
    """The entry names of x86/unittests.cfg, in file order (``[name]`` headers)."""
    cfg = kut / "x86" / "unittests.cfg"
    if not cfg.is_file():
        raise InputError(f"{kut}: no x86/unittests.cfg (give a built kvm-unit-tests directory)")
    return [m.group(1) for m in re.finditer(r"^\[([^\]]+)\]", cfg.read_text(), re.MULTILINE)]


def check_kut(kut: Path) -> None:
    if not (kut / "config.mak").is_file() or not (kut / "run_tests.sh").is_file():
        raise InputError(f"{kut}: not a configured kvm-unit-tests tree (no config.mak or run_tests.sh)")
    if not any((kut / "x86").glob("*.flat")):
        raise InputError(f"{kut}: no x86/*.flat (build kvm-unit-tests for x86_64 first)")


def qemu_tcg_wrapper(qemu: str, directory: Path) -> Path:
    """A script that runs ``qemu`` with -cpu host → -cpu max and without -enable-kvm."""
    script = directory / "qemu-system-x86_64"
    script.write_text(
        "#!/usr/bin/env bash\n"
        "# Written by cetvm conformance: QEMU TCG with the issue's edits of the command line.\n"
        "args=()\nprev=\n"
        "for a in \"$@\"; do\n"
        "  if [ \"$a\" = -enable-kvm ]; then continue; fi\n"
        "  if [ \"$prev\" = -cpu ] && [ \"${a%%,*}\" = host ]; then a=\"max${a#host}\"; fi\n"
        "  args+=(\"$a\"); prev=$a\n"
        "done\n"
        f"exec {qemu} \"${{args[@]}}\"\n")
    script.chmod(0o755)
    return script


_VMEXIT_TIME = ("speed: each case loops until 2^30 TSC cycles have passed, doubling its iterations; a VM exit "
                 "costs 1 us of guest time (cetvm.kvm.timekeeping), so a one-exit iteration takes 2,018 cycles and "
                 "the case needs 2^20 iterations in its last pass, about 2 million exits in all; this exit goes "
                 "through the Python layers (the VMM's device or KVM's APIC and MSR handling, ~100 us of host "
                 "time), 2-4 minutes, past the 90 s budget (CPUID and VMCALL, answered next to the engine as "
                 "KVM's exit fastpath, take ~2 us and pass)")
_EMULATED_TIME = ("speed: the instruction does not exit (CR0.WP and CR4.PGE are guest-owned bits) but cetvm's "
                  "CPU emulates it at ~40-90 us of host time, while it costs 1 ns of guest time: 2^30 TSC "
                  "cycles are hundreds of millions of iterations")
_NOT_MODELED = "the modeled host has no {what}: the entry needs it"
#: cetvm's triage of entries that QEMU TCG passes and cetvm does not (who/what is missing).
KNOWN_REASONS: dict[str, str] = {
    **{name: _VMEXIT_TIME for name in ("vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_ipi_halt", "vmexit_tscdeadline",
                                       "vmexit_tscdeadline_immed")},
    **{name: _EMULATED_TIME for name in ("vmexit_cr0_wp", "vmexit_cr4_pge")},
    **{name: _NOT_MODELED.format(what="SVM (an Intel model)") for name in ("svm", "svm_npt", "svm_no_npt")},
    **{name: _NOT_MODELED.format(what="Hyper-V enlightenments") for name in (
        "hyperv_synic", "hyperv_connections", "hyperv_stimer", "hyperv_stimer_direct", "hyperv_clock")},
    **{name: "nested VMX: INIT/SIPI and posted interrupts for L2 are not modeled" for name in (
        "vmx_eoi_bitmap_ioapic_scan", "vmx_posted_intr_test", "vmx_apic_passthrough_thread", "vmx_init_signal_test",
        "vmx_sipi_signal_test")},
    **{name: "speed: NMI IPIs are delivered (KVM_NMI) and test_sti_nmi's 'nmi-after-sti' PASSes given the "
             "time (30,000 NMI round trips between the vCPUs, 1-3 minutes here, past the entry's timeout); "
             "test_multiple_nmi's 100,000 rounds of spin-wait handshakes between the two vCPUs "
             "cost a round-robin turn of each vCPU per wait (the vCPUs run one at a time and no PAUSE-loop "
             "exiting ends a spinning turn), far past the entry's timeout; x2apic's PV IPI "
             "(KVM_HC_SEND_IPI) needs an in-kernel APIC" for name in ("xapic", "x2apic")},
    "cet": "runs with -smp 2: 4 PASS without KVM's force-emulation prefix (KVM's default), 21 PASS with "
           "CETVM_QEMU_HOST_CMDLINE=kvm.force_emulation_prefix=1",
    "pku": "PKU not shown: cetvm's XSAVEC/XSAVES emulation has no PKRU component (Unicorn 2.1.4 exposes no "
           "PKRU register), so the guest CPUID hides PKU and the test skips",
    "pks": "PKS is in no Unicorn 2.1.4 CPU model (TCG 5.0), so the guest CPUID cannot show it",
    "eventinj": "PASSes since NMIs are modeled (KVM_NMI, ICR delivery mode NMI, NMI blocking until IRET and "
                "NMI-window exiting: guests/tests/nmi.c)",
    "realmode": "runs to its end since events are delivered through the IVT and IRET/IRETD are emulated in "
                "real-address mode (session 7); three reports FAIL, not triaged further: rflags.rf (RF after an "
                "IRETD that loads it), DAS and SAHF, which the engine executes (alone in Unicorn, SAHF is right: "
                "something around the harness's run is not)",
    "intel_iommu": "cetvm models no intel-iommu or edu device (the front end refuses -device intel-iommu)",
    "sieve": "speed: the 180 s budget is not enough for cetvm's engine on a shared 2-core machine",
    "emulator": "engine core: one report, 'unaligned movaps exception' — Unicorn 2.1.4 (QEMU 5.0 TCG) checks "
                "no alignment of SSE memory operands, and checking each aligned SSE access outside the "
                "engine would stop it at every MOVAPS/MOVDQA/PCMPEQB m128 (glibc's string functions); "
                "every other report PASSes, with and without the force-emulation prefix",
    "idt_test": "PASSes since fault frames carry RFLAGS.RF (SDM Vol. 3 §18.3.1.1)",
    "debug": "engine core: reaches its summary since INT1 (ICEBP) is emulated (the engine's #UD looped) and "
             "DR7.GD's general-detect #DB since MOV DR is; 4 data-breakpoint reports FAIL (DR6 after a write "
             "watchpoint; MOV SS + watchpoint + INT $1 / INT3): Unicorn 2.1.4 implements no data breakpoints",
    "msr": "3 reports: the VMM's x2APIC SELF_IPI (0x83F) accepts reserved bits 31:8 instead of #GP (the LAPIC "
           "ignores self-IPIs; IPIs are the SMP work); and the ~110k serial-port exits of its output take "
           "~50 s of CPU, over the 90 s budget on a loaded machine",
    "msr64": "as msr (same kernel, -cpu qemu64)",
    "s3": "no RTC (MC146818) and no ACPI S3 sleep/resume: the test waits for the RTC's update-in-progress "
          "bit forever",
    "vmx": "nested VMX (kvm_intel nested=1): the entry runs every sub-test to its summary in one kernel; the FAIL "
           "reports are features cetvm's CPU does not model for L2 (the CR0 read shadow, CR3-store and INVD "
           "exiting, RDTSCP enable, VMMCALL's #UD, MOV-SS blocking of VM entry, pending debug exceptions and "
           "DR6 on exits) — each sub-test's own verdict is in the vmx sub-tests section",
    "access": "speed: the page-table walk permutations need more than 90 s on cetvm (QEMU TCG times out too)",
}


def run_entry(kut: Path, name: str, qemu: str, env_extra: dict[str, str], logs: Path,
              timeout: float) -> EntryResult:
    """Run one entry with ``run_tests.sh NAME``; never raises for a failing guest."""
    log_dir = logs / name
    env = dict(os.environ, QEMU=qemu, unittest_log_dir=str(log_dir), **env_extra)
    env.pop("TIMEOUT", None)
    started = time.monotonic()
    try:
        proc = subprocess.run(["./run_tests.sh", name], cwd=kut, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout)
        output = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return EntryResult(name, "FAIL", time.monotonic() - started, f"runner gave up after {timeout:.0f} s",
                           _failures(log_dir / f"{name}.log") or [out.strip().splitlines()[-1:] or [""]][0])
    seconds = time.monotonic() - started
    verdict, detail = "FAIL", "no verdict line from run_tests.sh"
    for line in _ANSI.sub("", output).splitlines():
        match = _VERDICT.match(line.strip())
        if match and match.group(2) == name:
            verdict, detail = match.group(1), match.group(3).strip()
    failures = _failures(log_dir / f"{name}.log") if verdict == "FAIL" else []
    return EntryResult(name, verdict, seconds, detail, failures)


def _failures(log: Path, limit: int = 6) -> list[str]:
    """The ``FAIL:`` report lines of a log, or its last meaningful lines."""
    if not log.is_file():
        return []
    lines = [_ANSI.sub("", raw).rstrip() for raw in log.read_text(errors="replace").splitlines()]
    fails = [ln for ln in lines if ln.startswith("FAIL")]
    if fails:
        return fails[:limit] + ([f"... {len(fails) - limit} more"] if len(fails) > limit else [])
    tail = [ln for ln in lines if ln.strip() and not ln.startswith(("PASS", "SKIP", "timeout "))]
    return tail[-2:]


def timeout_of(kut: Path, name: str) -> float:
    """The entry's timeout from unittests.cfg (default 90 s) plus :data:`GRACE`."""
    text = (kut / "x86" / "unittests.cfg").read_text()
    section = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    seconds = 90.0
    if section:
        match = re.search(r"^timeout\s*=\s*(\d+)", section.group(1), re.MULTILINE)
        if match:
            seconds = float(match.group(1))
    return seconds + GRACE


def run_suite(kut: Path, qemu: str, env_extra: dict[str, str], jobs: int = 1,
              only: list[str] | None = None, progress=None) -> list[EntryResult]:
    """Every entry (or ``only``), ``jobs`` at a time; results in unittests.cfg order."""
    names = only or list_entries(kut)
    logs = Path(tempfile.mkdtemp(prefix="cetvm-kut-logs-"))
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {pool.submit(run_entry, kut, n, qemu, env_extra, logs, timeout_of(kut, n)): n for n in names}
            results = {}
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                results[result.name] = result
                if progress is not None:
                    progress(result)
        return [results[n] for n in names]
    finally:
        shutil.rmtree(logs, ignore_errors=True)


_ROW = re.compile(r"^\| (\S+) \| (PASS|FAIL|SKIP) \| ([\d.]+) \| (.*) \|$")


def read_report_table(path: Path, section: str) -> list[EntryResult]:
    """The entries of one table (``## cetvm`` or ``## QEMU TCG...``) of an earlier report, so a
    QEMU run (which does not change between cetvm builds) can be reused."""
    rows, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].startswith(section)
            continue
        match = _ROW.match(line) if inside else None
        if match:
            detail = match.group(4).replace("\\|", "|")
            rows.append(EntryResult(match.group(1), match.group(2), float(match.group(3)), detail))
    if not rows:
        raise InputError(f"{path}: no '## {section}' table")
    return rows


def totals(results: list[EntryResult]) -> dict[str, int]:
    out = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for r in results:
        out[r.verdict] = out.get(r.verdict, 0) + 1
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(results: list[EntryResult]) -> str:
    rows = ["| entry | verdict | seconds | detail / failing reports |", "|---|---|---:|---|"]
    for r in results:
        detail = "; ".join([r.detail] * bool(r.detail) + r.failures)
        rows.append(f"| {r.name} | {r.verdict} | {r.seconds:.1f} | {_cell(detail)} |")
    t = totals(results)
    rows.append(f"| **total** | {t['PASS']} PASS, {t['FAIL']} FAIL, {t['SKIP']} SKIP | "
                f"{sum(r.seconds for r in results):.0f} | {len(results)} entries |")
    return "\n".join(rows)


def write_report(path: Path, cetvm: list[EntryResult], qemu: list[EntryResult] | None, header: str,
                 notes: dict[str, str] | None = None) -> None:
    """docs/conformance.md: the cetvm table, the QEMU table, and the entries QEMU passes and
    cetvm does not (with ``notes[name]`` as the reason when given)."""
    parts = [header.rstrip() + "\n", "## cetvm\n", results_table(cetvm) + "\n"]
    if qemu is not None:
        parts += ["## QEMU TCG (-cpu host → -cpu max, no -enable-kvm, ACCEL=tcg)\n", results_table(qemu) + "\n"]
        by_name = {r.name: r for r in cetvm}
        worse = [q for q in qemu if q.verdict == "PASS" and by_name.get(q.name) and by_name[q.name].verdict != "PASS"]
        parts.append("## Entries QEMU TCG passes and cetvm does not\n")
        if not worse:
            parts.append("None.\n")
        for q in worse:
            c = by_name[q.name]
            observed = "; ".join([c.detail] * bool(c.detail) + c.failures[:3])
            known = (notes if notes is not None else KNOWN_REASONS).get(q.name)
            reason = f"{known} (observed: {observed})" if known and observed else known or observed
            parts.append(f"- **{q.name}** (cetvm {c.verdict}): {_cell(reason)}")
        parts.append("")
    else:
        parts.append("QEMU (qemu-system-x86_64) was not installed: no comparison table.\n")
    failed = [c for c in cetvm if c.verdict == "FAIL"]
    if failed:
        parts.append("## Why each cetvm FAIL fails\n")
        for c in failed:
            known = (notes if notes is not None else KNOWN_REASONS).get(c.name)
            observed = "; ".join([c.detail] * bool(c.detail) + c.failures[:3])
            parts.append(f"- **{c.name}**: {_cell(known or observed or 'no report line')}")
        parts.append("")
    path.write_text("\n".join(parts) + "\n")


# --------------------------------------------------------------------------- vmx sub-tests
#: The [vmx] entry's kernel and the QEMU options of every vmx-group entry (unittests.cfg).
VMX_FLAT = "x86/vmx.flat"
VMX_QEMU_OPTIONS = ("-cpu", "max,+vmx")
_VMX_TEST_NAME = re.compile(r"^filter = \S*, test = (.+)$")
_REPORT_LINE = re.compile(r"^(PASS|FAIL|SKIP): (.*)$")
VMX_SECTION = "## vmx sub-tests"


def _run_vmx_kernel(kut: Path, qemu: str, append: str, timeout: float) -> tuple[str, bool]:
    """x86/run x86/vmx.flat -cpu max,+vmx -append APPEND: (output, finished in time)."""
    env = dict(os.environ, QEMU=qemu)
    try:
        proc = subprocess.run(["./x86/run", VMX_FLAT, *VMX_QEMU_OPTIONS, "-append", append], cwd=kut, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout)
        return _ANSI.sub("", proc.stdout + proc.stderr), True
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return _ANSI.sub("", out), False


def list_vmx_subtests(kut: Path, qemu: str) -> list[str]:
    """The sub-test names vmx.flat considers, in its order (it prints ``filter = F, test = NAME``
    for each while matching a filter that names none of them)."""
    out, _ = _run_vmx_kernel(kut, qemu, "cetvm_lists_the_vmx_sub_tests", 120)
    names = []
    for line in out.splitlines():
        match = _VMX_TEST_NAME.match(line.strip())
        name = match.group(1).strip().replace(" ", "_") if match else None  # the filter form of the name
        if name and name not in names:
            names.append(name)
    if not names:
        raise InputError(f"{kut / VMX_FLAT}: printed no sub-test names (is it built, does the front end run it?)")
    return names


def vmx_entry_exclusions(kut: Path) -> list[str]:
    """The ``-pattern`` filters of the [vmx] entry's test_args (sub-tests it leaves to other entries)."""
    text = (kut / "x86" / "unittests.cfg").read_text()
    section = re.search(r"^\[vmx\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    args = re.search(r'^test_args\s*=\s*"?([^"\n]*)', section.group(1), re.MULTILINE) if section else None
    return [a[1:] for a in (args.group(1).split() if args else []) if a.startswith("-")]


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), name) for p in patterns)


def vmx_subtest_verdict(output: str, finished: bool, timeout: float = 60) -> tuple[str, str, list[str]]:
    """(verdict, detail, failing reports) of one vmx sub-test's output: PASS when its reports pass
    and it reaches SUMMARY, SKIP when it only skips, FAIL otherwise (a FAIL report, an abort, or
    no summary within ``timeout``)."""
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    fails = []
    for line in output.splitlines():
        match = _REPORT_LINE.match(line.strip())
        if match:
            counts[match.group(1)] += 1
            if match.group(1) == "FAIL":
                fails.append(line.strip())
    summary = "SUMMARY:" in output
    detail = f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"
    if not finished:
        detail += f"; no summary within {timeout:.0f} s"
    elif not summary:
        detail += "; aborted before the summary"
    if counts["FAIL"] or not summary or not finished:
        return "FAIL", detail, fails[:4]
    return ("SKIP" if counts["PASS"] == 0 else "PASS"), detail, []


def run_vmx_subtest(kut: Path, qemu: str, name: str, timeout: float = 60) -> EntryResult:
    """One vmx sub-test alone (:func:`vmx_subtest_verdict`)."""
    started = time.monotonic()
    out, finished = _run_vmx_kernel(kut, qemu, name, timeout)
    verdict, detail, fails = vmx_subtest_verdict(out, finished, timeout)
    return EntryResult(name, verdict, time.monotonic() - started, detail, fails)


def run_vmx_subtests(kut: Path, qemu: str, jobs: int = 1, progress=None) -> list[EntryResult]:
    """Every vmx sub-test alone (the [vmx] entry's own exclusions marked in the detail)."""
    names = list_vmx_subtests(kut, qemu)
    excluded = vmx_entry_exclusions(kut)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(run_vmx_subtest, kut, qemu, n): n for n in names}
        results = {}
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            if _excluded(result.name, excluded):
                result.detail = "not in the [vmx] entry (test_args excludes it); " + result.detail
            results[result.name] = result
            if progress is not None:
                progress(result)
    return [results[n] for n in names]


def write_vmx_section(path: Path, results: list[EntryResult], intro: str) -> None:
    """Put (or replace) the :data:`VMX_SECTION` table at the end of an existing report."""
    text = path.read_text() if path.is_file() else ""
    head = text.split(f"\n{VMX_SECTION}", 1)[0].rstrip() + "\n"
    path.write_text(head + f"\n{VMX_SECTION}\n\n{intro.strip()}\n\n{results_table(results)}\n")
