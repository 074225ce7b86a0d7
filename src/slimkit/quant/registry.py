"""The base of every quantization pass and the registry behind them: ``QuantPass``, the
``@quant_pass`` decorator (a pass's name in dicts and YAML, its stage) and ``@pass_handler`` (the
function that runs it). The passes themselves: ``quant/schemes.py`` (the number formats) and
``quant/techniques.py``; the list that composes them: ``quant/passes.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import nn

from slimkit.core.config import Config, check_choice

if TYPE_CHECKING:
    from slimkit.quant.passes import Quantize

__all__ = ["QuantPass", "quant_pass", "pass_handler", "handler_of", "PASSES", "STAGES", "cannot_saturate"]

STAGES = ("scheme", "model", "rounding", "layer", "convert", "search")  # the order a list's passes run in
PASSES: dict[str, type[QuantPass]] = {}  # dict key ("gptq") -> config class
_HANDLERS: dict[type, Callable[..., Any]] = {}

P = TypeVar("P", bound="type[QuantPass]")


def cannot_saturate(module: nn.Module | None) -> bool:
    """Whether ONNX Runtime's integer kernel for ``module`` computes its products exactly whatever
    the weights: a depthwise conv runs on MLAS's depthwise kernel, which widens the uint8 inputs
    and int8 weights to 16 bits before multiplying (``qdwconv``), not on the uint8 x int8 pair-sum
    instructions that saturate in int16 on CPUs without VNNI."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels \
        and module.out_channels % module.groups == 0


def quant_pass(name: str, stage: str, needs_data: bool = True) -> Callable[[P], P]:
    """Class decorator: the pass's key in dicts and YAML (``{"gptq": {...}}``), the stage it runs
    in (one of ``STAGES``) and whether it needs ``calib_data``."""
    check_choice("stage", stage, STAGES)

    def deco(cls: P) -> P:
        if name in PASSES and PASSES[name] is not cls:
            raise ValueError(f"a quantization pass named {name!r} exists already ({PASSES[name].__name__})")
        cls.name, cls.stage, cls.needs_data = name, stage, needs_data
        PASSES[name] = cls
        return cls

    return deco


def pass_handler(cls: type[QuantPass]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``@pass_handler(MyPass)`` makes ``fn`` what runs ``MyPass``. Its signature is
    the stage's (``quant/pipeline.py``): ``fn(job, cfg)`` for model and conversion passes,
    ``fn(job, cfg, layer)`` for rounding and layer passes, ``fn(model, quantize, cfg, calib_data,
    inplace)`` for search passes."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _HANDLERS[cls] = fn
        return fn

    return deco


def handler_of(p: QuantPass) -> Callable[..., Any]:
    try:
        return _HANDLERS[type(p)]
    except KeyError:
        raise TypeError(f"no handler is registered for the quantization pass {type(p).__name__}: "
                        "decorate one with @pass_handler") from None


@dataclass(frozen=True, kw_only=True)
class QuantPass(Config):
    """Base of every quantization pass. ``check`` validates the pass against the rest of the list."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True

    def check(self, q: Quantize) -> None:
        """Raise ``ValueError`` when this pass cannot run with the list's other passes."""

    def wants_data(self, q: Quantize) -> bool:
        return self.needs_data

    def wants_float_inputs(self) -> bool:
        """Whether the layer sweep must give this pass each layer's inputs on the float model too."""
        return False

    def __str__(self) -> str:
        """The pass as one would write it, with the fields that differ from the defaults."""
        try:
            default: QuantPass | None = type(self)()
        except (ValueError, TypeError):  # no valid default (MixedPrecision needs a budget): every field
            default = None
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if default is None or getattr(self, f.name) != getattr(default, f.name)]
        return f"{type(self).__name__}({', '.join(fields)})"
