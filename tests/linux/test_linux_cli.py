"""`cetvm linux-guest` as a user runs it: a fake apt-get on PATH serves tiny packages laid out
like the pinned ones; every failure is one `cetvm: error:` line."""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import textwrap

import pytest

from cetvm.cli.main import main
from cetvm.linux import packages as pins
from linux_support import deb_bytes, pinned, tar_bytes

pytestmark = pytest.mark.skipif(
    not subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True, text=True).stdout.startswith("/"),
    reason="the recipe builds guests/linux, which needs glibc's static libc.a (Debian's libc6-dev)")


@pytest.fixture
def fake_world(tmp_path, monkeypatch):
    """XDG cache in tmp, pins matching tiny packages, and an apt-get that copies them."""
    store = tmp_path / "store"
    store.mkdir()
    debs = {
        "kernel": deb_bytes({m: b"MZ kernel" for m in pins.KERNEL_FILES}),
        "busybox": deb_bytes({"bin/busybox": b"\x7fELF bb"}),
        "source": deb_bytes({pins.LINUX_SOURCE_TARBALL: lzma.compress(tar_bytes(
            {pins.SELFTEST_SOURCE: b"int main(void) { return 0; }\n"}, prefix=""))}),
    }
    for attr, key in (("KERNEL", "kernel"), ("BUSYBOX", "busybox"), ("LINUX_SOURCE", "source")):
        monkeypatch.setattr(pins, attr, pinned(f"fake-{key}", debs[key]))
        (store / f"fake-{key}.deb").write_bytes(debs[key])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        name=${{3%%=*}}
        [ -f {store}/$name.deb ] || {{ echo "E: Unable to locate package $name" >&2; exit 100; }}
        cp {store}/$name.deb .
        """))
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return store


def test_builds_prints_paths_and_reuses_the_cache(fake_world, capsys, tmp_path):
    assert main(["linux-guest"]) == 0
    out, err = capsys.readouterr()
    rows = dict(line.split(None, 1) for line in out.splitlines()[:5])
    cache = tmp_path / "xdg" / "cetvm" / "linux"
    assert rows["kernel"].startswith(str(cache)) and open(rows["kernel"], "rb").read() == b"MZ kernel"
    assert rows["cmdline"] == "console=ttyS0 panic=-1 cetvm.tests=all"
    assert "shstk_rop" in rows["tests"].split()
    assert "qemu-system-x86_64 -accel tcg" in out and "cetvm boot --kernel" in out
    assert "downloading fake-kernel" in err
    for deb in fake_world.iterdir():
        deb.unlink()  # no network any more
    assert main(["linux-guest", "--offline", "--json", "--tests", "shstk_rop,shstk_map", "--mode", "shell"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["kernel"] == rows["kernel"]
    assert facts["cmdline"] == "console=ttyS0 panic=-1 cetvm.tests=shstk_rop,shstk_map cetvm.mode=shell"


def test_selftest_is_built_into_the_guest(fake_world, capsys):
    assert main(["linux-guest", "--selftest", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["selftest"].endswith("/test_shadow_stack_64") and "test_shadow_stack_64" in facts["tests"]
    assert facts["initrd"].endswith("initrd-selftest.img")


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cetvm:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_offline_without_cache_is_one_error(fake_world, capsys):
    assert main(["linux-guest", "--offline"]) == 1
    assert "is not in the cache" in _one_error(capsys)


def test_unknown_test_name_is_a_usage_error(fake_world, capsys):
    assert main(["linux-guest", "--tests", "nope"]) == 2
    assert "--tests: no program nope" in _one_error(capsys)


def test_a_corrupt_download_is_one_error(fake_world, capsys):
    (fake_world / "fake-busybox.deb").write_bytes(b"garbage")
    assert main(["linux-guest"]) == 1
    assert "corrupt or not the pinned package" in _one_error(capsys)


def test_a_package_apt_does_not_know_is_one_error(fake_world, capsys, monkeypatch):
    (fake_world / "fake-kernel.deb").unlink()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["linux-guest"]) == 1
    assert "run 'sudo apt-get update' first" in _one_error(capsys)
