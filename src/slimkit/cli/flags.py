"""Command-line flags generated from a config class: one ``--field-name`` per dataclass field, its
type read from the annotation and its help from the class docstring, so the flags cannot drift
from the library. A flag left out keeps the preset's (or the config's) value.

>>> import argparse
>>> from slimkit.prune import PruneConfig
>>> p = argparse.ArgumentParser()
>>> add_config_flags(p, PruneConfig)
>>> args = p.parse_args(["--method", "depth", "--sparsity", "0.25", "--exclude", "a,b", "--no-recalibrate-bn"])
>>> build_config(args, PruneConfig, {}, None).to_dict()["exclude"]
['a', 'b']
>>> build_config(args, PruneConfig, {}, None).method, build_config(args, PruneConfig, {}, None).recalibrate_bn
('depth', False)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from slimkit.core.config import resolve

__all__ = ["add_config_flags", "build_config", "field_help", "add_pass_flags", "build_passes"]

PREFIX = "cfg_"


def field_help(cls: type, name: str) -> str:
    """The docstring bullet (or sentence) of ``cls`` that names ``name`` in double backquotes."""
    doc = cls.__doc__ or ""
    chunks = re.split(r"\n\s*(?=- )|\n\s*\n", doc)
    pattern = re.compile(rf"``{re.escape(name)}(=[^`]*)?``")
    named = [(m.start(), c) for c in chunks if (m := pattern.search(c))]
    if named:  # the chunk that names it first
        chunk = min(named, key=lambda pc: pc[0])[1]
        text = " ".join(chunk.split()).lstrip("- ")
        text = text.replace("``", "'")
        return text if len(text) <= 240 else text[:237].rsplit(" ", 1)[0] + " ..."
    return f"see {cls.__name__}"


def _members(annotation: str) -> list[str]:
    return [m.strip() for m in annotation.split("|")]


def _parser(annotation: str, name: str) -> Callable[[str], Any]:
    members = [m for m in _members(annotation) if m != "None"]
    optional = "None" in _members(annotation)

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        for m in members:
            if m.startswith("tuple["):
                item = int if m.startswith("tuple[int") else float if m.startswith("tuple[float") else str
                return tuple(item(v.strip()) for v in text.split(",") if v.strip())
            if m.startswith("dict["):
                if text.strip().startswith("{"):
                    return json.loads(text)
                out: dict[str, Any] = {}
                for pair in filter(None, (p.strip() for p in text.split(","))):
                    k, sep, v = pair.partition("=")
                    if not sep:
                        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} takes key=value pairs, got {pair!r}")
                    out[k.strip()] = _scalar(v.strip())
                return out
            try:
                if m == "int":
                    return int(text)
                if m == "float":
                    return float(text)
            except ValueError:
                continue
            if m == "str":
                return text
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} takes {annotation}, got {text!r}")

    return parse


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _choices(cls: type, name: str) -> list[str] | None:
    """The values a string field allows, read from the config's own validation error."""
    try:
        cls(**{name: "\x00not-a-choice"})
    except (ValueError, TypeError) as e:
        m = re.match(rf"{re.escape(name)} must be one of (.*?); got", str(e))
        if m:
            return [v.strip().strip("'") for v in m.group(1).split(",")]
    return None


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                     title: str | None = None, prefix: str = "") -> None:
    """One flag per field of ``cls`` (except ``skip``), in an argument group; ``prefix`` goes before
    each flag's name (``--gptq-damp``) and its destination."""
    group = parser.add_argument_group(title or f"{cls.__name__} fields (each overrides the preset's value)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        annotation = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        flag = "--" + (prefix + f.name).replace("_", "-")
        choices = _choices(cls, f.name) if "str" in _members(annotation) else None
        allowed = f"one of {', '.join(map(repr, choices))}; " if choices else ""
        text = f"{field_help(cls, f.name)} [{allowed}{annotation}; default {default!r}]".replace("%", "%%")
        if annotation == "bool":
            group.add_argument(flag, dest=PREFIX + prefix + f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            continue
        metavar = "A,B" if "tuple[" in annotation else "K=V,..." if "dict[" in annotation else f.name.upper()
        group.add_argument(flag, dest=PREFIX + prefix + f.name, type=_parser(annotation, prefix + f.name), default=None,
                           metavar=metavar, help=text)


def build_config(args: argparse.Namespace, cls: type, presets: Mapping[str, Any], preset: str | None) -> Any:
    """The preset (or the default config) with every flag given on the command line applied, validated."""
    overrides = {f.name: getattr(args, PREFIX + f.name) for f in dataclasses.fields(cls)
                 if getattr(args, PREFIX + f.name, None) is not None}
    if preset is None:
        return cls.from_dict(overrides)  # type: ignore[attr-defined]
    base = resolve(preset, cls, presets)
    return cls.from_dict({**base.to_dict(), **overrides}) if overrides else base  # type: ignore[attr-defined]


def _overrides(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    return {f.name: getattr(args, PREFIX + prefix + f.name) for f in dataclasses.fields(cls)
            if getattr(args, PREFIX + prefix + f.name, None) is not None}


def add_pass_flags(parser: argparse.ArgumentParser) -> None:
    """The quantize flags: ``--pass NAME`` adds a pass with its defaults, ``--no-pass NAME`` takes
    one out of the preset, and each field of each pass is a flag ``--<pass>-<field>`` (setting one
    adds its pass), all generated from the pass configs and their docstrings."""
    from slimkit.quant.passes import PASSES

    names = ", ".join(PASSES)
    parser.add_argument("--pass", dest="passes_add", action="append", default=[], metavar="NAME",
                        help=f"add a pass with its defaults, in the place its stage runs (one of {names}); repeatable")
    parser.add_argument("--no-pass", dest="passes_drop", action="append", default=[], metavar="NAME",
                        help="take a pass out of the preset (e.g. embeddings); repeatable")
    parser.add_argument("--calib-batches", dest=PREFIX + "calib_batches", type=int, default=None,
                        help="calibration batches used at most (default: all)")
    for name, cls in PASSES.items():
        if not dataclasses.fields(cls):
            continue
        add_config_flags(parser, cls, title=f"{cls.__name__} pass ({name}; setting a field adds it)", prefix=name + "_")


def build_passes(args: argparse.Namespace, preset: str | None) -> Any:
    """The preset's passes (none without a preset: static INT8 defaults) with the command line's
    passes added, taken out and changed, validated as one list."""
    from slimkit.quant.passes import PASSES, Quantize
    from slimkit.quant.presets import resolve_quantize

    q = resolve_quantize(preset) if preset is not None else Quantize()
    unknown = [n for n in [*args.passes_add, *args.passes_drop] if n not in PASSES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(PASSES), n=1)
        raise ValueError(f"unknown quantization pass {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; the passes are {', '.join(PASSES)}")
    for name in args.passes_add:
        if q.find(PASSES[name]) is None:
            q = q.with_pass(PASSES[name]())
    for name, cls in PASSES.items():
        changes = _overrides(args, cls, name + "_")
        if changes:
            current = q.find(cls) or cls()
            q = q.with_pass(cls.from_dict({**current.to_dict(), **changes}))
    if args.passes_drop:
        q = q.without(*(PASSES[n] for n in args.passes_drop))
    batches = getattr(args, PREFIX + "calib_batches", None)
    return q.replace(calib_batches=batches) if batches is not None else q
