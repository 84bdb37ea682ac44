"""The Linux guest recipe: Debian's CET-enabled kernel, an initramfs of busybox, our /init, our
static CET tests and (optionally) the kernel's shadow-stack selftest — downloaded, checked,
extracted and built into the user's cache, reused on the next run.

    guest = linux_guest()                        # downloads on first use (~37 MB)
    guest = linux_guest(with_selftest=True)      # + linux-source (153 MB) → test_shadow_stack_64
    guest.kernel, guest.initrd, guest.cmdline    # what a VMM boots
    guest.cmdline_for(tests=["shstk_rop"], mode="shell")

Cache layout (``$XDG_CACHE_HOME/cetvm/linux`` or ``~/.cache/cetvm/linux``):

    PACKAGE_VERSION/            files taken from one package, and complete.json recording the
                                package, version, the SHA-256 the download had (checked
                                against the pin before anything was extracted) and the SHA-256
                                of each extracted file (checked on every reuse)
    downloads/                  .deb files while they are extracted (deleted afterwards)
    initrd[-selftest].img       the initramfs with our tests (and the selftest), rewritten only
                                when its contents change (initrd*.json records their digest);
                                other program lists get initrd-custom-DIGEST.img

A step whose complete.json matches the pin is skipped, so reruns need no network. With
``download=False`` a missing step is a :class:`NotCached` error instead of a download.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cetvm.linux import packages as pins
from cetvm.linux.apt import Downloader, apt_get_download, sha256_of, verify
from cetvm.linux.cpio import CpioEntry, with_parents, write_newc
from cetvm.linux.deb import extract_files, extract_from_inner_tarball, write_stream
from cetvm.linux.errors import RecipeError
from cetvm.linux.init_script import GROUP, PASSWD, TESTS_DIR, InitOptions, init_script, kernel_cmdline
from cetvm.linux.packages import DebPackage

#: Progress reporter: one line per long step ("downloading ...", "extracting ...").
Progress = Callable[[str], None]
#: ``(deb, {member: destination}) -> written`` — how files come out of a package.
Extractor = Callable[[Path, Mapping[str, Path]], Mapping[str, Path]]
STAMP = "complete.json"
INITRD_STEM = "initrd"
#: Device nodes the kernel's console needs before devtmpfs is mounted (Linux devices.txt).
DEVICE_NODES = (("dev/console", 5, 1), ("dev/null", 1, 3), ("dev/ttyS0", 4, 64))
#: Guest RAM of the reference QEMU run (MiB).
QEMU_MEMORY_MB = 512
REPO_ROOT_DEPTH = 3  # src/cetvm/linux/recipe.py → the checkout


class NotCached(RecipeError):
    """A download=False run found a package missing from the cache."""


def _quiet(_: str) -> None:
    pass


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cetvm/linux``, else ``~/.cache/cetvm/linux`` (XDG Base Directory)."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "cetvm" / "linux"


@dataclass(frozen=True)
class LinuxGuest:
    """A bootable guest: the bzImage, its initramfs, and what to tell the kernel."""

    kernel: Path
    initrd: Path
    config: Path
    cmdline: str
    tests: tuple[str, ...]
    system_map: Path | None = None
    selftest: Path | None = None
    packages: tuple[str, ...] = field(default=())

    def cmdline_for(self, tests: str | Sequence[str] = "all", mode: str = "test", timeout: int | None = None,
                    extra: str = "", finish: str = "poweroff") -> str:
        """A kernel command line for this guest that runs ``tests`` (``"all"``, ``"none"`` or
        names from :attr:`tests`) in ``mode`` (``test`` or ``shell``), then ends the machine
        with ``finish`` (``poweroff``, ``reboot`` or ``halt``); ``extra`` is appended as is."""
        if not isinstance(tests, str):
            unknown = [t for t in tests if t not in self.tests]
            if unknown:
                raise RecipeError(f"no test program {', '.join(unknown)} in this guest (it has: "
                                  f"{', '.join(self.tests)})")
            tests = list(tests)
        try:
            return kernel_cmdline(tests, mode, timeout, extra, finish=finish)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None

    def qemu_argv(self, cmdline: str | None = None, memory_mb: int = QEMU_MEMORY_MB) -> list[str]:
        """The QEMU TCG command that boots this guest with the console on stdio — the reference
        run (QEMU 7.2 has no CET: the shadow-stack tests skip there)."""
        return ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mb), "-nographic", "-no-reboot",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", cmdline or self.cmdline]


def _slug(package: DebPackage) -> str:
    """The cache folder of a package: NAME_VERSION with only shell-safe characters."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{package.name}_{package.version}")


def _stamp_record(package: DebPackage) -> dict:
    """What complete.json records besides the files: the pin the files came from."""
    return {"package": package.name, "version": package.version, "sha256": package.sha256}


def _cached(target: Path, record: dict, names: Sequence[str]) -> bool:
    """The folder holds exactly what ``record`` describes, and every file still has the SHA-256
    it had when it was extracted (a truncated or edited file is fetched again)."""
    try:
        stamp = json.loads((target / STAMP).read_text())
        files = stamp.pop("files")
        return (stamp == record and sorted(files) == sorted(names)
                and all(sha256_of(target / name) == digest for name, digest in files.items()))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def package_files(cache: Path, package: DebPackage, files: Mapping[str, str], *,
                  downloader: Downloader = apt_get_download, extractor: Extractor = extract_files,
                  download: bool = True, progress: Progress = _quiet) -> dict[str, Path]:
    """The files ``files`` (member path in the package → file name in the cache) of ``package``,
    from the cache, or downloaded, checked against the pinned SHA-256 and extracted.
    Returns {file name: path}."""
    target = cache / _slug(package)
    record = _stamp_record(package)
    paths = {name: target / name for name in files.values()}
    if _cached(target, record, list(paths)):
        return paths
    if not download:
        raise NotCached(f"{package.label} is not in the cache {cache} (run 'cetvm linux-guest' to download it)")
    progress(f"downloading {package.label} ({package.size / 1e6:.0f} MB) with apt-get")
    deb = downloader(package, cache / "downloads")
    try:
        verify(package, deb)
        progress(f"extracting {', '.join(files)} from {deb.name}")
        (target / STAMP).unlink(missing_ok=True)
        extractor(deb, {member: target / name for member, name in files.items()})
    finally:
        deb.unlink(missing_ok=True)  # extracted or refused: the package itself is not kept
    record["files"] = {name: sha256_of(path) for name, path in paths.items()}
    (target / STAMP).write_text(json.dumps(record, indent=1) + "\n")
    return paths


def selftest_binary(cache: Path, *, downloader: Downloader = apt_get_download, download: bool = True,
                    progress: Progress = _quiet, compiler: str = "gcc") -> Path:
    """The kernel's shadow-stack selftest, test_shadow_stack_64, built static from the
    linux-source package of the pinned kernel (only its one source file is extracted)."""
    def from_source_tarball(deb: Path, wanted: Mapping[str, Path]) -> Mapping[str, Path]:
        return extract_from_inner_tarball(deb, pins.LINUX_SOURCE_TARBALL, wanted)

    source = package_files(cache, pins.LINUX_SOURCE, {pins.SELFTEST_SOURCE: "test_shadow_stack.c"},
                           downloader=downloader, extractor=from_source_tarball, download=download,
                           progress=progress)["test_shadow_stack.c"]
    binary = source.with_name(pins.SELFTEST_BINARY)
    if binary.is_file() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    progress(f"building {pins.SELFTEST_BINARY} with {compiler} -static")
    compile_static(compiler, source, binary, pins.SELFTEST_CFLAGS, pins.SELFTEST_LIBS)
    return binary


def compile_static(compiler: str, source: Path, binary: Path, cflags: Sequence[str], libs: Sequence[str]) -> None:
    """Compile one C file into ``binary`` (via a temporary name: no half-built program)."""
    if shutil.which(compiler) is None:
        raise RecipeError(f"cannot build {binary.name}: {compiler} not found")
    partial = binary.with_name(f".{binary.name}.partial")
    proc = subprocess.run([compiler, *cflags, "-o", str(partial), str(source), *libs], capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RecipeError(f"building {binary.name} failed ({compiler} exit {proc.returncode}): {tail} "
                          "(static glibc comes from Debian's libc6-dev)")
    partial.replace(binary)


def source_tree() -> Path:
    """The cetvm checkout this package runs from (src/cetvm/linux → the repository)."""
    return Path(__file__).resolve().parents[REPO_ROOT_DEPTH]


def our_test_programs(tree: Path | None = None, progress: Progress = _quiet) -> list[Path]:
    """Our static CET tests (guests/linux/*.c), built by ``make -C guests linux`` when stale."""
    guests = (tree or source_tree()) / "guests"
    if not (guests / "linux").is_dir():
        raise RecipeError(f"the CET test programs are built from guests/linux of a cetvm checkout; "
                          f"{guests / 'linux'} does not exist (pass the programs explicitly)")
    try:
        up_to_date = subprocess.run(["make", "-q", "-C", str(guests), "linux"], capture_output=True).returncode == 0
        if not up_to_date:
            progress("building the CET test programs (make -C guests linux)")
        proc = subprocess.run(["make", "-s", "-C", str(guests), "linux"], capture_output=True, text=True)
    except OSError as exc:
        raise RecipeError(f"cannot run make: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise RecipeError(f"building guests/linux failed: {tail}")
    built = guests / "build" / "linux"
    sources = sorted((guests / "linux").glob("*.c"))
    return [built / s.stem for s in sources]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read {path}: {exc.strerror or exc}") from None


def initramfs_entries(busybox: Path, programs: Sequence[Path], init_options: InitOptions = InitOptions()) -> list[CpioEntry]:
    """The initramfs: busybox at /bin/busybox, our /init, /etc/passwd and /etc/group (the
    unprivileged test user), the programs under /opt/cetvm/tests, and the console device nodes."""
    names = [p.name for p in programs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"two test programs named {', '.join(duplicates)}")
    entries = [CpioEntry.directory(d) for d in ("bin", "dev", "proc", "sys", "tmp")]
    entries += [CpioEntry.char_device(path, major, minor) for path, major, minor in DEVICE_NODES]
    entries.append(CpioEntry.file("bin/busybox", _read(busybox), 0o755))
    entries.append(CpioEntry.file("init", init_script(init_options).encode(), 0o755))
    entries.append(CpioEntry.file("etc/passwd", PASSWD.encode(), 0o644))
    entries.append(CpioEntry.file("etc/group", GROUP.encode(), 0o644))
    entries += [CpioEntry.file(f"{TESTS_DIR}/{p.name}", _read(p), 0o755) for p in sorted(programs)]
    return with_parents(entries)


def initrd_name(with_selftest: bool, custom: Sequence[Path] | None, programs: Sequence[Path]) -> str:
    """The initramfs's file name in the cache: one per configuration, so building one never
    replaces another."""
    name = INITRD_STEM + ("-selftest" if with_selftest else "")
    if custom is not None:
        listing = "\n".join(str(p.resolve()) for p in sorted(programs))
        name += "-custom-" + hashlib.sha256(listing.encode()).hexdigest()[:12]
    return name + ".img"


def write_initrd(entries: Sequence[CpioEntry], target: Path) -> Path:
    """gzip'd newc archive of ``entries`` at ``target``; left alone when already identical
    (the digest of its archive is recorded beside it)."""
    archive = write_newc(entries)
    digest = hashlib.sha256(archive).hexdigest()
    record = target.with_suffix(".json")
    try:
        if json.loads(record.read_text()).get("cpio_sha256") == digest and target.is_file():
            return target
    except (OSError, ValueError):
        pass
    write_stream(io.BytesIO(gzip.compress(archive, compresslevel=6, mtime=0)), target)
    record.write_text(json.dumps({"cpio_sha256": digest, "files": [e.path for e in entries
                                                                   if stat.S_ISREG(e.mode)]}, indent=1) + "\n")
    return target


def linux_guest(cache_dir: Path | None = None, *, with_selftest: bool = False, with_symbols: bool = False,
                download: bool = True, test_programs: Sequence[Path] | None = None,
                initrd: Path | None = None, downloader: Downloader = apt_get_download,
                progress: Progress = _quiet, compiler: str = "gcc") -> LinuxGuest:
    """Build (or reuse) the Linux guest. ``with_selftest``: add the kernel's
    test_shadow_stack_64; ``with_symbols``: fetch the real System.map (the -dbg package);
    ``test_programs``: the programs under /opt/cetvm/tests (default: our guests/linux tests);
    ``initrd``: where to write the initramfs (default: the cache's initrd.img)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecipeError(f"cannot create the cache directory {cache}: {exc.strerror or exc}") from None
    common = dict(downloader=downloader, download=download, progress=progress)
    kernel = package_files(cache, pins.KERNEL, pins.KERNEL_FILES, **common)
    busybox = package_files(cache, pins.BUSYBOX, pins.BUSYBOX_FILES, **common)["busybox"]
    used = [pins.KERNEL, pins.BUSYBOX]
    system_map = None
    if with_symbols:
        system_map = package_files(cache, pins.KERNEL_DBG, pins.KERNEL_DBG_FILES, **common)["System.map"]
        used.append(pins.KERNEL_DBG)
    programs = list(test_programs) if test_programs is not None else our_test_programs(progress=progress)
    selftest = None
    if with_selftest:
        selftest = selftest_binary(cache, compiler=compiler, **common)
        programs.append(selftest)
        used.append(pins.LINUX_SOURCE)
    entries = initramfs_entries(busybox, programs)
    target = write_initrd(entries, initrd or cache / initrd_name(with_selftest, test_programs, programs))
    names = tuple(sorted(p.name for p in programs))
    return LinuxGuest(kernel=kernel["vmlinuz"], initrd=target, config=kernel["config"],
                      cmdline=kernel_cmdline("all"), tests=names, system_map=system_map, selftest=selftest,
                      packages=tuple(p.label for p in used))
