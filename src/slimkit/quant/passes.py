"""Quantization as an ordered list of passes: one small config per technique, each with its own
validation and its own handler, composed in one ``sk.quantize`` call.

Two passes describe the number formats (the *scheme*): ``Weights`` and ``Activations``; the others
are techniques that run on the model in the order written:

- model passes change the float model before any layer is rounded (``Equalize``, ``SmoothQuant``,
  ``OutlierChannels``);
- layer passes run inside one sweep over the layers in execution order, each layer's calibration
  inputs taken with the layers before it already on their grid: a rounding pass chooses the layer's
  integers (``GPTQ``, ``AWQ``, ``AdaRound``; round-to-nearest when none is given), then the passes
  that correct it (``BiasCorrection``);
- conversion passes add what is stored quantized besides Linear/Conv (``Embeddings``);
- search passes quantize several times and keep what measures best (``KeepFloat``,
  ``MixedPrecision``).

>>> q = Quantize.of([Weights(bits=4, group_size=128, reduce_range=False), Activations(mode="none"), GPTQ()])
>>> [type(p).__name__ for p in q.passes]
['Weights', 'Activations', 'GPTQ']
>>> Quantize.from_dict({"passes": [{"weights": {"bits": 4, "group_size": 128}}, {"activations": {"mode": "none"}},
...                                "awq"]}).rounding
AWQ(clip=True)
>>> Quantize.of([Activations(mode="static"), SmoothQuant()])
Traceback (most recent call last):
...
ValueError: SmoothQuant works with Activations(mode='dynamic'): a static input quantizer would see the unsmoothed input; use the 'int8-smoothquant' preset

The scheme passes are in ``quant/schemes.py``, the techniques' configs in ``quant/techniques.py``, the
base and the registry in ``quant/registry.py`` (all importable from here too). Adding one is
one config class (``@quant_pass("name", stage)``) and one handler (``@pass_handler(ConfigClass)``);
``docs/quantization.md`` ("A pass of your own") shows one.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from slimkit.core.config import Config, check_range
from slimkit.quant.registry import (
    PASSES,
    STAGES,
    QuantPass,
    cannot_saturate,
    handler_of,
    pass_handler,
    quant_pass,
)
from slimkit.quant.schemes import Activations, Embeddings, HalfPrecision, Weights

__all__ = ["QuantPass", "Quantize", "Weights", "Activations", "Embeddings", "HalfPrecision", "Equalize", "SmoothQuant",
           "OutlierChannels", "GPTQ", "AWQ", "AdaRound", "BiasCorrection", "MixedPrecision", "KeepFloat",
           "quant_pass", "pass_handler", "handler_of", "PASSES", "STAGES", "cannot_saturate"]



def _pass_from(entry: Any, where: str) -> QuantPass:
    """A pass from a config object, a name (``"gptq"``) or a one-key dict (``{"gptq": {"damp": 0.02}}``)."""
    if isinstance(entry, QuantPass):
        return entry
    if isinstance(entry, str):
        name, fields = entry, cast(Mapping[str, Any], {})
    elif isinstance(entry, Mapping) and len(entry) == 1:
        name, fields = next(iter(entry.items()))
        fields = fields or {}
        if not isinstance(fields, Mapping):
            raise ValueError(f"{where}: the fields of pass {name!r} must be a mapping, got {fields!r}")
    else:
        raise ValueError(f"{where}: a pass is a name or a one-key mapping {{name: {{field: value}}}}, got {entry!r}")
    if name not in PASSES:
        close = difflib.get_close_matches(str(name), list(PASSES), n=1)
        raise ValueError(f"{where}: unknown quantization pass {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; the passes are {', '.join(PASSES)}")
    try:
        return PASSES[name].from_dict(fields)
    except ValueError as e:
        raise ValueError(f"{where} ({name}): {e}") from e


@dataclass(frozen=True, kw_only=True)
class Quantize(Config):
    """What ``sk.quantize`` runs: ``passes`` in order, and ``calib_batches`` (how many calibration
    batches to use at most; ``None``: all). ``Weights()`` and ``Activations()`` are taken with their
    defaults (static INT8) when the list has none. Each pass validates its own fields when built and
    its fit with the others here; the list must be written in the order it runs (``STAGES``)."""

    passes: tuple[QuantPass, ...] = ()
    calib_batches: int | None = None

    def validate(self) -> None:
        if not isinstance(self.passes, tuple) or not all(isinstance(p, QuantPass) for p in self.passes):
            raise ValueError("passes must be quantization passes (Weights(...), GPTQ(...), ...); "
                             f"got {self.passes!r}")
        if self.calib_batches is not None:
            check_range("calib_batches", self.calib_batches, 1, float("inf"))
        for klass in {type(p) for p in self.passes}:
            if sum(type(p) is klass for p in self.passes) > 1:
                raise ValueError(f"{klass.__name__} appears more than once in the passes")
        rounding = [p for p in self.passes if p.stage == "rounding"]
        if len(rounding) > 1:
            raise ValueError(f"one rounding pass chooses each layer's integers; got {', '.join(type(p).__name__ for p in rounding)}")
        ranks = [STAGES.index(p.stage) for p in self.passes]
        for i in range(1, len(ranks)):
            if ranks[i] < ranks[i - 1]:
                order = sorted(self.passes, key=lambda p: STAGES.index(p.stage))
                raise ValueError(f"{type(self.passes[i]).__name__} runs before {type(self.passes[i - 1]).__name__} "
                                 f"({self.passes[i].stage} passes run before {self.passes[i - 1].stage} passes); "
                                 f"write them in the order they run: {[type(p).__name__ for p in order]}")
        for p in self.passes:
            p.check(self)

    @classmethod
    def of(cls, passes: Iterable[Any], calib_batches: int | None = None) -> Quantize:
        """A list from pass configs, names or one-key dicts."""
        return cls(passes=tuple(_pass_from(p, f"pass {i}") for i, p in enumerate(passes)), calib_batches=calib_batches)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | list[Any]) -> Quantize:  # type: ignore[override]
        if isinstance(data, (list, tuple)):
            return cls.of(data)
        unknown = [k for k in data if k not in ("passes", "calib_batches")]
        if unknown:
            raise ValueError(f"unknown key(s) for Quantize: {', '.join(map(repr, unknown))}; allowed keys: passes, "
                             "calib_batches (a list of passes: [{weights: {bits: 4, group_size: 128}}, gptq])")
        return cls.of(data.get("passes", ()), data.get("calib_batches"))

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [{p.name: p.to_dict()} for p in self.passes], "calib_batches": self.calib_batches}

    def __str__(self) -> str:
        """``[Weights(bits=4, group_size=128), Activations(mode='none'), GPTQ()]``"""
        return "[" + ", ".join(map(str, self.passes)) + "]" + (f" on {self.calib_batches} batches" if self.calib_batches
                                                              else "")

    def find(self, klass: type[QuantPass]) -> Any:
        return next((p for p in self.passes if isinstance(p, klass)), None)

    @property
    def weights(self) -> Weights:
        return self.find(Weights) or Weights()

    @property
    def activations(self) -> Activations:
        return self.find(Activations) or Activations()

    @property
    def rounding(self) -> QuantPass | None:
        return next((p for p in self.passes if p.stage == "rounding"), None)

    def of_stage(self, *stages: str) -> list[QuantPass]:
        return [p for p in self.passes if p.stage in stages]

    def with_pass(self, p: QuantPass) -> Quantize:
        """This list with ``p`` in place of the pass of its type (added in its stage's place if absent)."""
        if any(type(x) is type(p) for x in self.passes):
            return self.replace(passes=tuple(p if type(x) is type(p) else x for x in self.passes))
        passes = list(self.passes)
        at = next((i for i, x in enumerate(passes) if STAGES.index(x.stage) > STAGES.index(p.stage)), len(passes))
        passes.insert(at, p)
        return self.replace(passes=tuple(passes))

    def without(self, *klasses: type[QuantPass]) -> Quantize:
        return self.replace(passes=tuple(p for p in self.passes if not isinstance(p, klasses)))

    def with_weights(self, **changes: Any) -> Quantize:
        return self.with_pass(dataclasses.replace(self.weights, **changes))

    def wants_data(self) -> list[str]:
        """The passes that need ``calib_data``, as the user would write them."""
        if self.find(HalfPrecision) is not None:
            return []
        out = ["Weights(grid='output')"] if self.weights.wants_data(self) else []
        out += [f"Activations(mode={self.activations.mode!r})"] if self.activations.wants_data(self) else []
        return out + [type(p).__name__ for p in self.passes if p.stage != "scheme" and p.wants_data(self)]


# The techniques, registered on import and importable from here too.
from slimkit.quant.techniques import (  # noqa: E402
    AWQ,
    GPTQ,
    AdaRound,
    BiasCorrection,
    Equalize,
    KeepFloat,
    MixedPrecision,
    OutlierChannels,
    SmoothQuant,
)
