"""`--help` teaches: every command and option says what it does, and every option that takes a
value says its default."""

from __future__ import annotations

import argparse

import pytest

from cetvm.cli.main import build_parser

from cli_support import cetvm


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("cetvm has no sub-commands")


COMMANDS = sorted(_subparsers(build_parser()))
#: Options whose value only matters together with another option (their help names it).
DEPENDENT = {"--save-at": "--save-state"}


def _documented_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        yield action


def test_the_five_commands_exist():
    assert {"boot", "caps", "cpuid", "demo", "bench"} <= set(COMMANDS)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_exits_0_and_prints_usage(capsys, command):
    run = cetvm(capsys, *([command] if command else []), "--help")
    assert run.status == 0 and run.err == ""
    assert run.out.startswith("usage: cetvm")


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_option_says_what_it_does_and_its_default(command):
    parser = build_parser() if not command else _subparsers(build_parser())[command]
    assert parser.description, f"'cetvm {command}' has no description"
    for action in _documented_actions(parser):
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and len(action.help) > 15, f"{command} {name}: no real help text"
        takes_value = action.option_strings and action.nargs != 0
        if not takes_value:
            continue
        if name in DEPENDENT:
            assert DEPENDENT[name] in action.help, f"{command} {name}: should say it needs {DEPENDENT[name]}"
        elif action.required:
            continue  # a required option has no default; argparse says it is required
        else:
            assert "default" in action.help.lower(), f"{command} {name}: help does not give the default"


def test_every_sub_command_has_a_summary_in_the_top_level_help(capsys):
    out = cetvm(capsys, "--help").out
    for command in COMMANDS:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(command + " ")), "")
        assert len(line.split(None, 1)[-1]) > 10, f"'{command}' has no summary in 'cetvm --help'"


def test_boot_help_documents_the_exit_statuses(capsys):
    out = " ".join(cetvm(capsys, "boot", "--help").out.split())
    for status, meaning in (("124", "timeout"), ("125", "triple fault"), ("126", "internal error")):
        assert f"{status} {meaning}" in out


def test_help_lists_the_cpu_models(capsys):
    from cetvm.cpuid import model_names

    for command, option in (("boot", "--cpu"), ("cpuid", "FILE|MODEL")):
        out = " ".join(cetvm(capsys, command, "--help").out.split())
        assert option in out
        for name in model_names():
            assert name in out, f"'cetvm {command} --help' does not name the model {name}"
