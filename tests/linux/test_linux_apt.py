"""Downloading with apt-get (cetvm.linux.apt), against a fake apt-get on PATH: the .deb it
leaves, the `apt-get update` retry as root, and one clear error for each way it fails."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from cetvm.linux import apt
from cetvm.linux.errors import RecipeError
from cetvm.linux.packages import DebPackage

PACKAGE = DebPackage("busybox-static", "1:1.35.0-4", "0" * 64, 10)


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """Install a fake apt-get; ``fake_apt(knows_package_after_update, fail_update=False)``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    lists = tmp_path / "lists"

    def install(known: bool = True, needs_update: bool = False, network: bool = True) -> Path:
        if known and not needs_update:
            lists.mkdir(exist_ok=True)
        script = f"""\
            #!/bin/sh
            echo "$@" >> {log}
            case "$1" in
              update)
                {'mkdir -p ' + str(lists) if known else 'true'}
                {'' if network else 'echo "E: Failed to fetch http://deb.debian.org/ Temporary failure resolving" >&2; exit 100'}
                exit 0 ;;
              download)
                if [ ! -d {lists} ]; then echo "E: Unable to locate package ${{3%%=*}}" >&2; exit 100; fi
                {'' if network else 'echo "E: Failed to fetch http://deb.debian.org/x.deb  Could not resolve host" >&2; exit 100'}
                echo deb > "busybox-static_1%3a1.35.0-4_amd64.deb"; exit 0 ;;
            esac
            """
        path = bin_dir / "apt-get"
        path.write_text(textwrap.dedent(script))
        path.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        return log
    return install


def test_the_downloaded_deb_lands_in_the_directory(tmp_path, fake_apt):
    log = fake_apt()
    deb = apt.apt_get_download(PACKAGE, tmp_path / "d")
    assert deb.parent == tmp_path / "d" and deb.read_text() == "deb\n"
    assert log.read_text().split() == ["download", "-q", "busybox-static=1:1.35.0-4"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == [deb.name]


def test_as_root_missing_lists_are_updated_once(tmp_path, fake_apt, monkeypatch):
    log = fake_apt(needs_update=True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    apt.apt_get_download(PACKAGE, tmp_path / "d")
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["download", "update", "download"]


def test_without_root_missing_lists_say_how_to_fix(tmp_path, fake_apt, monkeypatch):
    fake_apt(needs_update=True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RecipeError, match=r"run 'sudo apt-get update' first"):
        apt.apt_get_download(PACKAGE, tmp_path / "d")


def test_no_network_is_apts_own_error_line(tmp_path, fake_apt):
    fake_apt(network=False)
    with pytest.raises(RecipeError, match="apt-get download busybox-static=1:1.35.0-4 failed: E: Failed to fetch"):
        apt.apt_get_download(PACKAGE, tmp_path / "d")


def test_an_unknown_package_after_update_fails_clearly(tmp_path, fake_apt, monkeypatch):
    fake_apt(known=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(RecipeError, match="Unable to locate package busybox-static"):
        apt.apt_get_download(PACKAGE, tmp_path / "d")


def test_no_apt_get_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RecipeError, match="apt-get not found"):
        apt.apt_get_download(PACKAGE, tmp_path / "d")
