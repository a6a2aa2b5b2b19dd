"""Dataclass configs as command-line flags: one flag per field, the field's comment as its help.

    group = parser.add_argument_group("align")
    add_flags(group, TrainConfig(), prefix="align-", dest="align.")   # --align-lr, --align-epochs ...

A flag that is not given stays out of the parsed namespace (argparse.SUPPRESS), so presets and
dataclass defaults apply underneath the flags the user typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re


def field_help(cls) -> dict[str, str]:
    """{field: the comment after it in the class source}."""
    return dict(re.findall(r"^\s+(\w+):[^\n#]*#\s*(.*)$", inspect.getsource(cls), re.M))


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value (true, false, 1, 0)")


def flag_type(f: dataclasses.Field):
    kind = str(f.type)
    if "bool" in kind:
        return parse_bool
    return int if kind.startswith("int") else float if kind.startswith("float") else str


def add_flags(group, config, prefix: str = "", dest: str = "", skip=()) -> None:
    """--{prefix}{field} for every field of the dataclass instance `config` (underscores as dashes),
    stored as '{dest}{field}'; a bool flag alone means true."""
    helps = field_help(type(config))
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        default = getattr(config, f.name)
        extra = dict(nargs="?", const=True) if isinstance(default, bool) else {}
        group.add_argument("--" + prefix + f.name.replace("_", "-"), dest=dest + f.name, type=flag_type(f),
                           default=argparse.SUPPRESS, metavar=f.name.upper(), **extra,
                           help=f"{helps.get(f.name, '')} (default {default!r})")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the flag and the fix, not the whole usage (--help has it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists every flag)\n")
