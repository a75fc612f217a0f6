"""Command-line flags and keyword options derived from the configuration dataclasses.

A configuration is a frozen dataclass whose fields may be other configurations
(ServeConfig holds WorkerConfig, SchedulerConfig, ...). Every field has its one
default where it is declared; a field whose metadata has "help" is a user option.
Options have one flat namespace across the tree (`max_num_seqs`, not
`scheduler.max_num_seqs`), so a flag, an `LLM(...)` keyword and a `ServeConfig`
built with `build_config` all name a setting the same way; config_fields
refuses a tree where two fields share a name.

Metadata read here: "help"; "flag" (the flag's name where the field's would not
do, e.g. "--no-prefix-caching" for a True default); "choices"; "unit": "bytes"
for sizes such as 4GiB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import Field
from functools import cache
from typing import Any, TypeVar

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Option:
    path: tuple[str, ...]  # nested configs from the root, then the field's name
    field: Field
    type: Any  # the resolved annotation

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def is_user_option(self) -> bool:
        return "help" in self.field.metadata

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default is dataclasses.MISSING else f.default


@cache
def config_fields(cls: type) -> dict[str, Option]:
    """Every leaf field of the configuration tree under cls, by its (unique) name."""
    out: dict[str, Option] = {}
    for path, f, kind in _leaves(cls, ()):
        if f.name in out:
            raise TypeError(f"{cls.__name__}: {'.'.join(path)} and {'.'.join(out[f.name].path)} share a name")
        out[f.name] = Option(path, f, kind)
    return out


def _leaves(cls: type, prefix: tuple[str, ...]):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, kind


def build_config(cls: type[C], **options) -> C:
    """cls with the named leaf fields set, wherever they sit in its tree."""
    known = config_fields(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(map(repr, unknown))}")
    return _build(cls, (), {known[k].path: v for k, v in options.items()})


def _build(cls: type, prefix: tuple[str, ...], values: dict[tuple[str, ...], Any]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if dataclasses.is_dataclass(hints[f.name]):
            if any(p[: len(path)] == path for p in values):
                kwargs[f.name] = _build(hints[f.name], path, values)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def add_config_args(parser: argparse.ArgumentParser, cls: type, names=None) -> None:
    """A flag for each user option of cls (only those in names, when given)."""
    for opt in config_fields(cls).values():
        if opt.is_user_option and (names is None or opt.name in names):
            _add_flag(parser, opt)


def _add_flag(parser: argparse.ArgumentParser, opt: Option) -> None:
    meta = opt.field.metadata
    flag = meta.get("flag") or "--" + re.sub(r"_s$", "", opt.name).replace("_", "-")
    kwargs: dict[str, Any] = {"dest": opt.name, "help": meta["help"]}
    base = _base_type(opt.type)
    if base is bool:
        # A True default is turned off by its "--no-..." flag, a False one on.
        kwargs.update(action="store_false" if opt.default else "store_true")
    elif base is tuple:
        kwargs.update(action="append", default=list(opt.default))
    else:
        parse = _parse_bytes if meta.get("unit") == "bytes" else json.loads if base is dict else base
        kwargs.update(type=parse, default=opt.default, choices=meta.get("choices"))
        if opt.default not in (None, "", ()) and "%(default)" not in kwargs["help"]:
            kwargs["help"] += " (default: %(default)s)"
    parser.add_argument(flag, **kwargs)


def options_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of cls among parsed flags (add_config_args), by name."""
    known = config_fields(cls)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in known}


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return build_config(cls, **options_from_args(cls, args))


def _base_type(kind: Any) -> type:
    """int for Optional[int], tuple for tuple[str, ...], and so on."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
        kind = args[0]
    return typing.get_origin(kind) or kind


def _parse_bytes(text: str) -> int:
    """ "4GiB", "512MiB", "1.5GB" or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or not unit else 1000
    return int(value * base ** "_KMGT".index(unit or "_"))
