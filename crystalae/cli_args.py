"""Building blocks of the `crystalae` parsers: the parser class, checked value types, and options
generated from the config dataclasses (so the command line never drifts from them)."""
from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

__all__ = ["Parser", "add_config_options", "count", "given", "location", "number"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other crystalae error, and options added on
    first use: `later(add)` runs `add(parser)` just before this parser parses or prints its help, so
    options generated from a config class that lives with torch (TrainConfig) cost nothing to the
    other commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._later: list[Callable[[argparse.ArgumentParser], None]] = []

    def later(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._later.append(add)

    def complete(self) -> None:
        while self._later:
            self._later.pop(0)(self)

    def parse_known_args(self, args=None, namespace=None):  # a subcommand's parser is entered here too
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{_did_you_mean(extras, _options_used(self, parsed))}")
        return parsed

    def error(self, message: str):
        choice = re.match(r"argument .*: invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:  # a misspelt subcommand or choice
            message += _did_you_mean([choice.group(1)], re.findall(r"'?([^',\s]+)'?", choice.group(2)))
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _options_used(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> list[str]:
    """The option strings of `parser` and of each subcommand `parsed` went into (e.g. `data prepare`)."""
    options: list[str] = []
    while parser is not None:
        options += [o for action in parser._actions for o in action.option_strings]
        chosen = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(parsed, chosen[0].dest, None) if chosen else None
        parser = chosen[0].choices.get(name) if name else None
        if isinstance(parser, Parser):
            parser.complete()  # options generated on first use
    return options


def _did_you_mean(given: list[str], known: list[str]) -> str:
    """` (did you mean --sample?)` for the first of `given` close to one of `known`, else ''."""
    import difflib

    for word in given:
        close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.75)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def location(text: str) -> str | Path:
    """argparse type: a local path, or an object-storage URI (s3://bucket/key, gs://...) kept as text."""
    from crystalae import uri_fs

    if uri_fs.is_remote(text):
        if ".." in text.split("://", 1)[1].split("/"):  # s3://a/x/../../b/y would leave the bucket named
            raise argparse.ArgumentTypeError(f"{text!r}: '..' is not allowed in an object-storage URI")
        return text
    return uri_fs.local_path_of(text)


def count(low: int, high: int | None = None):
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, got {value}" if high is not None
                                             else f"must be >= {low}, got {value}")
        return value
    return parse


def number(low: float, high: float):
    """argparse type: a finite number in [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {text}")
        return value
    return parse


def _option_type(hint: Any) -> tuple[type, tuple[Any, ...]]:
    """(argparse type, choices) of a config field's annotation: a Literal's values are the choices,
    `X | None` is read as X (None stays the "not given" default)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return type(args[0]), args
    if origin in (typing.Union, types.UnionType):
        given = [a for a in args if a is not type(None)]
        if len(given) == 1:
            return _option_type(given[0])
    if hint in (bool, int, float, str):
        return hint, ()
    raise TypeError(f"no command-line option for a field of type {hint}")


def add_config_options(group, cls: type, names: Iterable[str] | None = None, helps: dict[str, str] | None = None,
                       defaults: bool = False) -> None:
    """One --option per field of the config dataclass `cls` (only `names` when given), typed from its
    annotation; a bool field becomes --x/--no-x. The default is None ("not given": a YAML file or the
    dataclass decides) unless `defaults`, which stores the field's own default. `helps` says what a
    field is, "{default}" in it standing for the field's default; without a word on the default,
    "(default ...)" is added."""
    hints = typing.get_type_hints(cls)
    chosen = {f.name: f for f in fields(cls)}
    if names is not None:
        missing = set(names) - set(chosen)
        if missing:
            raise TypeError(f"{cls.__name__} has no fields {sorted(missing)}")
        chosen = {name: chosen[name] for name in names}
    for name, f in chosen.items():
        kind, choices = _option_type(hints[name])
        text = (helps or {}).get(name, "default {default}")
        if "default" not in text:
            text += " (default {default})"
        options: dict[str, Any] = {"default": f.default if defaults else None,
                                   "help": text.replace("{default}", str(f.default))}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=kind, choices=choices or None)
        group.add_argument("--" + name.replace("_", "-"), **options)


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among `names` that the command line gave (not None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
