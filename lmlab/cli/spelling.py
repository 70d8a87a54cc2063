"""Usage mistakes as one line that says what the nearest valid spelling is.

A new user's first errors are typos: ``lmlab trian``, ``lmlab train --step 5``,
``--precision bf61``. argparse answers them with its usage block and "invalid choice"
or "unrecognized arguments"; lmlab answers with one line that names the nearest command,
flag or value (``difflib.get_close_matches``, the same measure Python's own "did you
mean" uses) and the help that lists them all: the subcommand's (``lmlab train --help``),
not ``lmlab --help``, where the flags are not listed. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re

#: argparse's message for a value outside ``choices`` (its wording since Python 3.9).
_INVALID_CHOICE = re.compile(r"argument (?P<arg>[^:]+): invalid choice: (?P<value>'(?:[^'\\]|\\.)*'|\"[^\"]*\")")


def nearest(word: str, candidates: list[str]) -> str | None:
    """The closest of ``candidates`` to ``word``, or None if none is close."""
    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


def _help_hint(parser: argparse.ArgumentParser) -> str:
    return f"see `{parser.prog} --help`"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every long flag the parser knows (``--steps``, ``--no-progress``, ...)."""
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def explain_usage_error(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's ``message`` for ``parser`` as lmlab's one line (without ``lmlab: error:``).
    An invalid choice gets the nearest valid one; anything else ends with where the help is."""
    m = _INVALID_CHOICE.search(message)
    if m is None:
        return f"{message} ({_help_hint(parser)})"
    try:
        value = str(ast.literal_eval(m["value"]))
    except (ValueError, SyntaxError):  # pragma: no cover - argparse writes repr()
        return f"{message} ({_help_hint(parser)})"
    commands = _subcommands(parser)
    if commands and value not in commands and m["arg"] in ("COMMAND", "command"):
        guess = nearest(value, list(commands))
        if guess is None:
            return f"unknown command {value!r}; the commands are {', '.join(commands)} ({_help_hint(parser)})"
        return f"unknown command {value!r}; did you mean `{parser.prog} {guess}`? (see `{commands[guess].prog} --help`)"
    choices = _choices_of(parser, m["arg"])
    if not choices:
        return f"{message} ({_help_hint(parser)})"
    guess = nearest(value, choices)
    head = f"{m['arg']} {value!r} is not one of {', '.join(choices)}"
    return head + (f"; did you mean {m['arg']} {guess}?" if guess else "") + f" ({_help_hint(parser)})"


def _choices_of(parser: argparse.ArgumentParser, arg: str) -> list[str]:
    """The choices of the argument argparse names ``arg`` (``--a/-b`` or a metavar)."""
    for action in parser._actions:
        names = "/".join(action.option_strings) or action.metavar or action.dest
        if names == arg and action.choices is not None:
            return [str(c) for c in action.choices]
    return []


def unknown_arguments(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The line for arguments ``parser`` (the subcommand's) did not recognise: the first
    unknown flag and its nearest spelling, or the stray words."""
    flag = next((e for e in extras if e.startswith("-") and not _is_number(e)), None)
    if flag is None:
        return f"unexpected argument{'s' * (len(extras) > 1)} {' '.join(extras)} ({_help_hint(parser)})"
    name = flag.split("=", 1)[0]
    guess = nearest(name, _flags(parser)) if name.startswith("--") else None
    said = f"unknown option {name}" + (f"; did you mean {guess}?" if guess else "")
    return f"{said} ({_help_hint(parser)})"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
