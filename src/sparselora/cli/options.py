"""Command-line options generated from config dataclasses.

A config field's documentation lives once, in its metadata (`sparselora.config.doc`); the
`--help` of every option and the field listings of `sparselora train --help` are made from it.
Values are validated by the dataclass itself (its `__post_init__`), not by argparse choices, so
a bad value gets the same error from the CLI, a YAML file and Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import typing
from collections.abc import Collection, Mapping
from typing import Any

from sparselora.config import unwrap_optional

SCALARS = (int, float, str)


def integer(text: str) -> int:
    """An int option's value: `3`, `+3`, `1_000`, or an integral float such as `1e3` (as in
    a run config); a fraction is a ValueError, which argparse reports naming the option."""
    try:
        return int(text)
    except ValueError:
        value = float(text)  # a ValueError for 'many'
    if not value.is_integer():  # 1.5, inf, nan
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


integer.__name__ = "int"  # argparse names the type in its error: "invalid int value: '1.5'"


def type_name(hint: Any) -> str:
    """'int', 'list[str]', 'str | None', 'dict[str, float]' ..."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """A default as a user writes it: true/false, null, a, b for lists, JSON for mappings."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "[]"
    if isinstance(value, Mapping):
        return json.dumps(value)
    return str(value)


class CommaListAction(argparse.Action):
    """nargs="+" that also splits each value on commas: `--x a b`, `--x a,b` and `--x a, b`.
    `--x ""` gives an empty list. Items are converted with `item_type` (str here)."""

    item_type: type = str

    def __call__(self, parser, namespace, values, option_string=None):
        items = [item.strip() for value in values for item in value.split(",")]
        converted = []
        for item in filter(None, items):
            try:
                converted.append(self.item_type(item))
            except ValueError:
                parser.error(
                    f"argument {option_string}: invalid {self.item_type.__name__} value: {item!r}"
                )
        setattr(namespace, self.dest, converted)


def _comma_list_of(item_type: type) -> type[CommaListAction]:
    convert = integer if item_type is int else item_type
    attrs = {"item_type": staticmethod(convert)}  # a plain function would bind as a method
    return type(f"CommaListOf{item_type.__name__}", (CommaListAction,), attrs)


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    rename: Mapping[str, str] | None = None,
    skip: Collection[str] = (),
    keep_commas: Collection[str] = (),
) -> None:
    """One `--kebab-name` option per field of dataclass `cls`, dest = the field name.

    The type hint decides the option: bool -> `--x/--no-x`; list[str], list[int] and
    list[float] -> one or more values, comma-separated values split too (except for list[str]
    fields in `keep_commas`, whose values contain commas); int, float, str and `X | None` -> one
    value of that type (an int also as an integral float: `1e3`, see `integer`). The default is
    the dataclass's; the help is the field's `metadata["help"]` and the default. `rename` maps a
    field name to its option name (without dashes); fields in `skip` get no option. A field of
    another type (a dict, say) raises TypeError unless skipped.
    """
    rename = rename or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        option = rename.get(f.name, f.name)
        flag = "--" + option.replace("_", "-")
        hint = unwrap_optional(hints[f.name])
        default = default_of(f)
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list and typing.get_args(hint) == (str,):
            kwargs.update(nargs="+", metavar=option.upper())
            if f.name not in keep_commas:
                kwargs["action"] = CommaListAction
        elif typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float):
            item_type = typing.get_args(hint)[0]
            kwargs.update(nargs="+", metavar=option.upper(), action=_comma_list_of(item_type))
        elif hint in SCALARS:
            kwargs.update(type=integer if hint is int else hint, metavar=option.upper())
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line option for {hint!r}")
        action = parser.add_argument(flag, **kwargs)
        if "%(default)" not in action.help:  # BooleanOptionalAction may add it (Python < 3.14)
            shown = format_default(default).replace("%", "%%")
            action.help = f"{text} (default: {shown})".strip()


def dataclass_from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of `cls` from the options `add_dataclass_options` added (dest = field name);
    `values` set or override fields (those the options skipped, say)."""
    fields = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
    }
    return cls(**{**fields, **values})


def describe_fields(cls: type, prefix: str = "", width: int = 100) -> str:
    """Plain text, one entry per field: `prefix.name (type, default X): help`, wrapped to
    `width` with continuation lines indented."""
    hints = typing.get_type_hints(cls)
    entries = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        default = default_of(f)
        shown = (
            "required" if default is dataclasses.MISSING else f"default {format_default(default)}"
        )
        entry = f"{name} ({type_name(hints[f.name])}, {shown}): {f.metadata.get('help', '')}"
        entries.append(textwrap.fill(entry.rstrip(), width=width, subsequent_indent="    "))
    return "\n".join(entries)
