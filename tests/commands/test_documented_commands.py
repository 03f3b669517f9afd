"""Every ``qwenimage`` command the documentation names exists: the docs, the README, the examples and
the modules' docstrings are read for ``qwenimage COMMAND [ACTION]`` (in backticks, or at the start
of a command line) and each is looked up in the command line's own parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from megatron_qwenimage.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
#: Where commands are documented: the docs, the README, the examples, the packages' docstrings.
SOURCES = (
    "docs/*.md",
    "README.md",
    "examples/*",
    *(f"{pkg}/**/*.py" for pkg in ("launch", "producers", "consumers", "megatron_qwenimage", "benchmarks")),
)
#: `qwenimage WORD [WORD]` opening a backtick span or a command line (`$ ` prompt allowed).
MENTION = re.compile(r"(?:`|^[ \t]*(?:\$ )?)qwenimage ([a-z][a-z0-9-]*)(?: ([a-z][a-z0-9-]*))?", re.M)


def _commands() -> dict[str, set[str] | None]:
    """Command -> its actions (None for a command without actions), from the parser."""
    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = {}
    for name, sub in top.choices.items():
        actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        commands[name] = set(actions[0].choices) if actions else None
    return commands


def _mentions() -> list[tuple[str, str, str | None]]:
    found = []
    for pattern in SOURCES:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file():
                for m in MENTION.finditer(path.read_text(errors="replace")):
                    found.append((str(path.relative_to(REPO)), m.group(1), m.group(2)))
    return found


def test_every_documented_command_exists():
    commands = _commands()
    mentions = _mentions()
    assert any(c == "cache" for _, c, _ in mentions) and any(c == "launch" for _, c, _ in mentions)
    wrong = []
    for where, command, action in mentions:
        if command not in commands:
            wrong.append(f"{where}: qwenimage {command}")
        elif commands[command] is not None and action is not None and action not in commands[command]:
            wrong.append(f"{where}: qwenimage {command} {action} (actions: {sorted(commands[command])})")
    assert not wrong, "\n".join(sorted(set(wrong)))
