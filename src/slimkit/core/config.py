"""Configs as data: frozen keyword-only dataclasses, validated when built, round-tripping to dicts.

Every family declares its configs by subclassing ``Config`` and registering a handler for the config
type; the public verbs resolve "a config, a dict or a preset name" with ``resolve``. Adding an
algorithm is one config, one handler and one test, with no central if/elif.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True, kw_only=True)
... class Toy(Config):
...     bits: int = 8
...     def validate(self) -> None:
...         check_range("bits", self.bits, 2, 8)
>>> Toy.from_dict({"bits": 4}).to_dict()
{'bits': 4}
>>> Toy(bits=9)
Traceback (most recent call last):
...
ValueError: bits must be in [2, 8], got 9
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["Config", "check_range", "check_choice", "register", "handler_for", "resolve", "suggest"]

C = TypeVar("C", bound="Config")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every config. Subclasses override ``validate`` and may set ``kind``."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter and the allowed values."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"unknown key(s) for {cls.__name__}: {', '.join(hints)}; "
                f"allowed keys: {', '.join(names)}"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                v = data[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def check_range(
    name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
    """Fail unless ``lo <= value <= hi`` (bounds open where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad or value != value:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


_HANDLERS: dict[type, Callable[..., Any]] = {}


def register(config_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@register(MyConfig)`` makes ``fn`` the handler of ``MyConfig``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[config_type] = fn
        return fn

    return deco


def handler_for(config: Config) -> Callable[..., Any]:
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise TypeError(f"no handler is registered for {type(config).__name__}")


def suggest(name: str, names: list[str]) -> str | None:
    """The name ``name`` was probably meant to be: a near-exact spelling, else the longest name it
    starts with (``int8-static`` is ``int8``: static is the default), else the closest spelling.

    >>> suggest("int8-static", ["int8", "int8-dynamic"]), suggest("int8-dynamc", ["int8", "int8-dynamic"])
    ('int8', 'int8-dynamic')
    """
    typo = difflib.get_close_matches(name, names, n=1, cutoff=0.85)
    if typo:
        return typo[0]
    prefixes = [n for n in names if name.startswith(n + "-")]
    if prefixes:
        return max(prefixes, key=len)
    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


def resolve(
    spec: Config | Mapping[str, Any] | str,
    base: type[C],
    presets: Mapping[str, C],
    dict_type: Callable[[Mapping[str, Any]], C] | None = None,
) -> C:
    """A config from a config object, a dict, or a preset name."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        if spec not in presets:
            close = suggest(spec, list(presets))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ValueError(
                f"unknown preset {spec!r}{hint}; available: {', '.join(sorted(presets))}"
            )
        return presets[spec]
    if isinstance(spec, Mapping):
        return dict_type(spec) if dict_type else base.from_dict(spec)
    raise TypeError(
        f"expected a {base.__name__}, a dict or a preset name, got {type(spec).__name__}"
    )
