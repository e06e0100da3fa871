"""The command line's pass flags, derived from the registered passes' configs: adding a pass (or an option of one) is
adding its config fields, with the help ``passbase.option`` gives them.

Every field a pass marks as a flag becomes ``--<name-with-dashes>`` (one flag for a name several passes share),
typed from its annotation: a bool is a switch, a dict is JSON, a list is comma-separated, a number is parsed as one.
A pass with a ``flag_prefix`` (activation: ``--activation-sparsity``...) runs after another method as well as alone,
so its flags carry the prefix; a pass whose ``flag_prefix`` is None (gptq, driven by the quantize flags) has none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from nexus_export.registry import get_pass, pass_names

SWEEP_AXES = ("sparsity", "remove", "slicing")  # the settings a sweep varies (its list flags stand for them)


@dataclass(frozen=True)
class FlagSpec:
    """One pass flag: the config field it sets, the prefix of its pass (if any), its help and argparse settings."""

    field: str
    prefix: str
    help: str
    argparse: dict

    @property
    def dest(self) -> str:
        return f"pass_{self.prefix.replace('-', '_')}{self.field}"


def _kind(hint: Any) -> type:
    """The one value type of a field's annotation that the flag parses (str where a list or a string is allowed)."""
    args = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    args = [typing.get_origin(t) or t for t in args]
    if str in args and len(args) > 1:
        return str
    return args[0]


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({exc.msg}); e.g. '{{\"layer_0-5\": 0.3}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON mapping, e.g. '{\"layer_0-5\": 0.3}'")
    return value


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def pass_flags() -> dict[str, FlagSpec]:
    """Every pass flag by its option string, in the order of the passes' names and their fields."""
    flags: dict[str, FlagSpec] = {}
    for name in pass_names():
        pass_cls = get_pass(name)
        prefix = getattr(pass_cls, "flag_prefix", "")
        if prefix is None:
            continue
        hints = typing.get_type_hints(pass_cls.config_class)
        for field in dataclasses.fields(pass_cls.config_class):
            meta = field.metadata
            if not meta.get("flag", False):
                continue
            flag = f"--{prefix}{field.name.replace('_', '-')}"
            if flag in flags:
                continue
            kind = _kind(hints[field.name])
            settings: dict = {}
            if kind is bool:
                settings["action"] = "store_true"
                settings["default"] = None
            elif kind is dict:
                settings["type"] = _json
            elif kind is list:
                settings["type"] = _list
            elif kind in (int, float):
                settings["type"] = kind
            if kind is not bool and not meta.get("choices"):
                settings["metavar"] = field.name.upper()
            if meta.get("choices"):
                settings["choices"] = meta["choices"]
            flags[flag] = FlagSpec(field.name, prefix, meta["help"], settings)
    return flags


def pass_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """The options the pass flags on the command line give: for the method's pass (every unprefixed flag given: a
    flag the method has no option for is refused by its config, naming the valid ones), and for the prefixed
    activation pass."""
    options: dict = {}
    prefixed: dict = {}
    for spec in pass_flags().values():
        value = getattr(args, spec.dest, None)
        if value is None:
            continue
        (prefixed if spec.prefix else options)[spec.field] = value
    return options, prefixed
