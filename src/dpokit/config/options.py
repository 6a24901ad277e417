"""How an option is declared, once: a dataclass field whose metadata holds its help, its allowed values and its
range. The command line's flags, their help and defaults, the YAML keys of ``--config`` and the Python API's keyword
arguments all derive from these fields (dpokit.cli.options builds the flags).

Standard library and PyYAML only: the command line checks options before torch or transformers are imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError


class Default(int):
    """An int default that remembers it was not given: equal to (and stored as) the plain number, but a check can
    tell the default ``max_length`` 512, which dpokit may fit to the model, from a ``--max-length 512`` the user
    asked for, which it must not change."""

    def __repr__(self) -> str:
        return int.__repr__(self)


@dataclass(frozen=True)
class Range:
    """The values a numeric option may take: finite, at least (or above) `low`, at most (or below) `high`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    words: str | None = None  # how an error says it: "be positive" (default: the bounds)

    def holds(self, value: float) -> bool:
        """Whether `value` is finite and inside the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.words:
            return self.words
        if self.high is None:
            return f"be {'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else "be finite"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"be in {left}{self.low:g}, {self.high:g}{right}"


DPO = ("dpo",)  # the options of a training config that `dpokit sft` does not take

# The rules of the numeric options: each option names one in its declaration.
POSITIVE = Range(0, low_open=True, words="be positive")
NON_NEGATIVE = Range(0, words="not be negative")
AT_LEAST_ONE = Range(1, words="be at least 1")
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
UNIT = Range(0, 1)  # [0, 1]
OPEN_UNIT = Range(0, 1, low_open=True)  # (0, 1]
FINITE = Range()


def opt(default: Any, help: str, *, stages: tuple[str, ...] | None = None, choices: tuple | None = None,
        range: Range | None = None, required: bool = False, metavar: str | None = None,
        aliases: tuple[str, ...] = (), exclusive: str | None = None, repeat: bool = False) -> Any:
    """Declare an option: a dataclass field with its help text, its allowed values (`choices`, or a numeric
    `range`; numbers are always checked finite), whether the command line requires it, the commands of a shared
    config that take it (`stages`: None for all), other flag spellings (`aliases`, e.g. TRL's names) and the
    group of options it excludes (`exclusive`: the options of one group name exclude each other; with
    `required`, one of the group is required) and whether the flag repeats (`repeat`: its value is a list of
    strings, one per time it is given; a YAML list)."""
    return field(default=default, metadata={"help": help, "stages": stages, "choices": choices, "range": range,
                                            "required": required, "metavar": metavar, "aliases": aliases,
                                            "exclusive": exclusive, "repeat": repeat})


_KEEP = object()


def same_as(cls: type, name: str, *, default: Any = _KEEP, **changes: Any) -> Any:
    """Option `name` of config class `cls`, declared again for another config that takes the same option: its
    rules (and default, unless another command's own `default` is given) are the one declaration's; `changes`
    replace parts of its metadata (e.g. a help text that words it for another command)."""
    original = {f.name: f for f in dataclasses.fields(cls)}[name]
    unknown = set(changes) - set(original.metadata)
    if unknown:
        raise TypeError(f"same_as({cls.__name__}, {name!r}): no such metadata: {', '.join(sorted(unknown))}")
    return field(default=original.default if default is _KEEP else default,
                 metadata={**original.metadata, **changes})


def positional(declared: dataclasses.Field) -> dataclasses.Field:
    """An option declared with :func:`opt` that the command line takes as a positional argument, not a flag (its
    help, default and choices still come from the declaration; dpokit.cli.options.add_options)."""
    return dataclasses.field(default=declared.default, metadata={**declared.metadata, "positional": True})


def flag(name: str) -> str:
    """The command-line flag of field `name`: ``max_length`` -> ``--max-length``."""
    return "--" + name.replace("_", "-")


def options_of(cls: type, stage: str | None = None) -> list[dataclasses.Field]:
    """The option fields of config class `cls` that `stage` takes (every one when `stage` is None)."""
    return [f for f in dataclasses.fields(cls)
            if "help" in f.metadata and (stage is None or f.metadata["stages"] is None or stage in f.metadata["stages"])]


def value_kind(f: dataclasses.Field) -> type:
    """The type of an option's value from its annotation: bool, int, float or str."""
    text = str(f.type)
    for kind in (bool, float, int):  # float before int: "float | None" mentions neither int nor bool
        if kind.__name__ in text:
            return kind
    return str


def check_options(config: Any) -> None:
    """Check every option of `config` against its declaration: required, exclusive, choices, finite and in range."""
    _check_exclusive(config)
    for f in options_of(type(config)):
        value = getattr(config, f.name)
        if f.metadata["required"] and not value and not f.metadata.get("exclusive"):
            raise ConfigError(f"{flag(f.name)} is required")
        choices = f.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}; got {value!r}")
        rule = f.metadata["range"] or (FINITE if value_kind(f) in (int, float) else None)
        if rule is None or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag(f.name)} must be a number; got {value!r}")
        if not rule.holds(value):
            raise ConfigError(f"{flag(f.name)} must {rule}; got {value!r}")


def _check_exclusive(config: Any) -> None:
    """Options of one `exclusive` group: at most one given, and one when the group is required."""
    groups: dict[str, list[dataclasses.Field]] = {}
    for f in options_of(type(config)):
        if f.metadata.get("exclusive"):
            groups.setdefault(f.metadata["exclusive"], []).append(f)
    for members in groups.values():
        given = [flag(f.name) for f in members if getattr(config, f.name) not in (None, False)]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} exclude each other; give one")
        if not given and any(f.metadata["required"] for f in members):
            raise ConfigError(f"one of {', '.join(flag(f.name) for f in members)} is required")


def defaults_of(cls: type) -> dict[str, Any]:
    """Each option of `cls` and its declared default: for other code that needs a default without repeating it."""
    return {f.name: f.default for f in options_of(cls)}


def load_yaml_mapping(path: str | Path, command: str, known: Iterable[str]) -> dict[str, Any]:
    """Read a YAML config of option names (underscores or dashes) to values for `dpokit command`; every key must
    be in `known` (an unknown one is an error, with the closest known name). Keys come back with underscores."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a YAML config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of option names to values")
    known = sorted(known)
    unknown = sorted(str(k) for k in data if str(k).replace("-", "_") not in known)
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k.replace("-", "_"), known, 1))
                 else k for k in unknown]
        raise ConfigError(f"{path}: unknown option(s) for `dpokit {command}`: {', '.join(hints)}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def read_yaml(path: str | Path, cls: type, command: str, stage: str | None = None) -> dict[str, Any]:
    """Read a YAML config for `dpokit command` (options of `cls` that `stage` takes), each value type-checked."""
    fields = {f.name: f for f in options_of(cls, stage)}
    values = load_yaml_mapping(path, command, fields)
    for key, value in values.items():
        f = fields[key]
        if value is None and "None" in str(f.type):
            continue
        kind = value_kind(f)
        if f.metadata.get("repeat"):  # a list of strings (one string: a list of one)
            value = values[key] = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: option '{key}' must be a list of strings, got {value!r}")
            continue
        if kind is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = values[key] = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string; everyone writes it
        expected = (int, float) if kind is float else kind
        if not isinstance(value, expected) or (kind is not bool and isinstance(value, bool)):
            name = {bool: "true or false (a YAML bool)", float: "a number", int: "an integer", str: "a string"}[kind]
            raise ConfigError(f"{path}: option '{key}' must be {name}, got {value!r}")
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{path}: option '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    return values


def make(cls: type, values: dict[str, Any], command: str, stage: str | None = None) -> Any:
    """Build a validated config of class `cls` for `dpokit command` from option values (an unknown one is an
    error naming the command)."""
    known = {f.name for f in options_of(cls, stage)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for `dpokit {command}`: {', '.join(unknown)}")
    return cls(**values)
