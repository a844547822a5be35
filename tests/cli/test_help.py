"""``--help``: every subcommand explains each of its options and exits 0."""

from __future__ import annotations

import re

import pytest

from .support import FASTNAT_SCRIPT, clean_env, run

SUBCOMMANDS = ["forwarder", "registry", "expose", "connect", "check", "status", "bench"]

# What each subcommand must offer (the list), beyond -h.
EXPECTED_OPTIONS = {
    "forwarder": ["--host", "--port", "--registry", "--secret", "--secrets-file", "--max-servers",
                  "--max-clients-per-server"],
    "registry": ["--host", "--port"],
    "expose": ["id", "port", "--to", "--proxy-protocol", "--forwarder", "--registry"],
    "connect": ["id", "port", "--listen", "--forwarder", "--registry"],
    "check": ["--forwarder", "--registry"],
    "status": ["--json", "--forwarder", "--registry"],
    "bench": ["--size", "--round-trips", "--rounds"],
}


def help_entries(text: str) -> dict[str, str]:
    """``{option or positional: its help text}`` from argparse's help output.

    An entry starts on a line indented by two spaces; its help follows after
    two or more spaces on the same line, or on the next lines, indented further.
    """
    entries: dict[str, str] = {}
    section = None
    current: str | None = None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            section = line
            current = None
            continue
        if section is None or not line.strip():
            current = None
            continue
        entry = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if entry and not line.startswith("   "):
            names = entry.group(1)
            key = names.split(",")[-1].strip().split(" ")[0]
            current = key
            entries[key] = (entry.group(2) or "").strip()
        elif current is not None and line.startswith("   "):
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_explains_every_option(command: str) -> None:
    result = run([command, "--help"])
    assert result.returncode == 0, result
    assert result.stderr == "", result.stderr
    assert result.stdout.startswith(f"usage: fastnat {command}"), result.stdout
    entries = help_entries(result.stdout)
    for option in EXPECTED_OPTIONS[command]:
        assert option in entries, f"fastnat {command} --help does not list {option}:\n{result.stdout}"
    # Every option and positional in the usage line is explained in words.
    usage = result.stdout.split("\n\n", 1)[0]
    in_usage = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage))
    for option in in_usage:
        assert option in entries, f"{option} is in the usage but not explained:\n{result.stdout}"
    for name, text in entries.items():
        words = re.findall(r"[A-Za-z]{2,}", text)
        assert len(words) >= 2, f"fastnat {command} --help: {name} is not explained ({text!r}):\n{result.stdout}"
        assert "SUPPRESS" not in text


def subcommand_entries(text: str) -> dict[str, str]:
    """``{subcommand: its help}`` from the top-level help (entries indented by four)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        entry = re.match(r"^    (\S+)(?:\s{2,}(\S.*))?$", line)
        if entry:
            current = entry.group(1)
            entries[current] = (entry.group(2) or "").strip()
        elif current is not None and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_top_level_help_lists_every_subcommand() -> None:
    result = run(["--help"])
    assert result.returncode == 0, result
    commands = subcommand_entries(result.stdout)
    for command in SUBCOMMANDS:
        assert command in commands, f"fastnat --help does not list {command}:\n{result.stdout}"
        assert len(re.findall(r"[A-Za-z]{2,}", commands[command])) >= 3, (command, commands[command])
    entries = help_entries(result.stdout)
    for option in ("--verbose", "--quiet", "--help"):
        assert option in entries and entries[option], (option, result.stdout)


def test_top_level_help_shows_no_internal_command() -> None:
    """The hidden helper command of ``bench`` must not appear in the help,
    least of all with argparse's ``==SUPPRESS==`` placeholder as its text."""
    result = run(["--help"])
    assert result.returncode == 0, result
    assert "SUPPRESS" not in result.stdout, result.stdout
    assert "_bench-peer" not in result.stdout, result.stdout


def test_the_installed_script_and_python_m_agree() -> None:
    assert FASTNAT_SCRIPT.exists(), f"no console script at {FASTNAT_SCRIPT}"
    by_script = run(["expose", "--help"], cmd=[str(FASTNAT_SCRIPT)], env=clean_env())
    by_module = run(["expose", "--help"])
    assert by_script.returncode == by_module.returncode == 0
    assert by_script.stdout == by_module.stdout


def test_help_names_the_environment_variables() -> None:
    """Configuration by environment is documented where the options are."""
    texts = {command: run([command, "--help"]).stdout for command in ("forwarder", "expose", "connect", "status")}
    assert "FASTNAT_PORT" in texts["forwarder"]
    for command in ("expose", "connect", "status"):
        flat = " ".join(texts[command].split())
        assert "$FASTNAT_REGISTRY" in flat, (command, texts[command])
        assert "$FASTNAT_FORWARDERS" in flat, (command, texts[command])
