"""docs/usage.md cannot drift from the CLI: it names every option of every command and every exit code."""

from __future__ import annotations

import importlib
import inspect
import re
import signal
from importlib import metadata
from pathlib import Path

import click

from m2m_app import errors

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def _commands() -> dict[str, click.Command]:
    """Every click command behind the console scripts of the installed package, keyed as typed
    (``m2m-train prepare``).

    A group is its script and its subcommands are ``<script> <name>``; any other command is a
    subcommand when the script's entry point dispatches on its name (``m2m example-data``),
    else the script itself.
    """
    found: dict[str, click.Command] = {}
    for script in metadata.distribution("m2m-app").entry_points.select(group="console_scripts"):
        module = importlib.import_module(script.module)
        entry_source = inspect.getsource(getattr(module, script.attr))
        commands = [
            c for c in vars(module).values() if isinstance(c, click.Command) and c.callback.__module__ == script.module
        ]
        in_groups = {id(sub) for group in commands if isinstance(group, click.Group) for sub in group.commands.values()}
        for command in commands:
            if isinstance(command, click.Group):
                found[script.name] = command
                found |= {f"{script.name} {name}": sub for name, sub in command.commands.items()}
            elif id(command) in in_groups:
                continue
            elif f'"{command.name}"' in entry_source:
                found[f"{script.name} {command.name}"] = command
            else:
                found[script.name] = command
    return found


def _sections(text: str) -> dict[str, str]:
    """Command → the text under each heading that names it in backticks (up to the next heading)."""
    sections: dict[str, str] = {}
    parts = re.split(r"^(#+ .*)$", text, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2]):
        for command in re.findall(r"`(m2m[^`]*)`", heading):
            sections[command] = sections.get(command, "") + body
    return sections


def test_the_console_scripts_are_found():
    commands = _commands()
    assert {
        "m2m",
        "m2m example-data",
        "m2m-train",
        "m2m-train prepare",
        "m2m-train phase1",
        "m2m-train evaluate",
    } <= set(commands)


def test_usage_names_every_option_of_every_command():
    sections = _sections(USAGE.read_text())
    missing = []
    for name, command in _commands().items():
        options = [param for param in command.params if isinstance(param, click.Option)]
        if not options:
            continue
        if name not in sections:
            missing.append(f"{name}: no section headed `{name}`")
            continue
        missing += [
            f"{name}: {flag}"
            for option in options
            for flag in option.opts + option.secondary_opts
            if f"`{flag}" not in sections[name]
        ]
    assert not missing, missing


def test_usage_lists_every_exit_code():
    codes = {value for name, value in vars(errors).items() if name.startswith("EX_")}
    codes |= {128 + signal.SIGINT, 128 + signal.SIGTERM}  # cli.common.exits_cleanly
    listed = set()
    for cell in re.findall(r"^\| ([\d /]+) \|", USAGE.read_text(), flags=re.MULTILINE):
        listed |= {int(code) for code in cell.split("/")}
    assert codes and codes <= listed, sorted(codes - listed)
