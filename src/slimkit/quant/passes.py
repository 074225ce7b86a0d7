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

The techniques' configs are in ``quant/techniques.py`` (importable from here too). Adding one is
one config class (``@quant_pass("name", stage)``) and one handler (``@pass_handler(ConfigClass)``);
``docs/quantization.md`` ("A pass of your own") shows one.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

from torch import nn

from slimkit.core.config import Config, check_choice, check_range
from slimkit.quant.calibrators import CALIBRATORS

__all__ = ["QuantPass", "Quantize", "Weights", "Activations", "Embeddings", "HalfPrecision", "Equalize", "SmoothQuant",
           "OutlierChannels", "GPTQ", "AWQ", "AdaRound", "BiasCorrection", "MixedPrecision", "KeepFloat",
           "quant_pass", "pass_handler", "handler_of", "PASSES", "STAGES", "cannot_saturate"]

WEIGHT_FORMATS = ("int", "fp8-e4m3", "fp8-e5m2", "nf4")
ACTIVATION_FORMATS = ("int", "fp8-e4m3", "fp8-e5m2")
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


@quant_pass("weights", "scheme", needs_data=False)
@dataclass(frozen=True, kw_only=True)
class Weights(QuantPass):
    """How Linear/Conv weights are stored.

    - ``bits``: the width of the signed symmetric integers (2 to 8).
    - ``per_channel``: a scale per output channel (else one per tensor).
    - ``reduce_range``: keep 8-bit weights to 7 bits. On x86 CPUs without VNNI the uint8 x int8
      kernels sum pairs of products in int16 and saturate; 7-bit weights cannot overflow (ONNX
      Runtime's own ``reduce_range`` advice). Narrower weights and depthwise convs, whose kernel
      widens both operands to 16 bits (``cannot_saturate``), keep their width.
    - ``group_size``: group-wise weights for Linear layers, weight-only (``Activations(mode="none")``),
      4 bits (exported as ONNX Runtime's MatMulNBits), or 3 or 2 (measured in PyTorch only).
    - ``symmetric``: ``False`` gives each group a zero-point (group-wise weights only).
    - ``grid``: each channel's scale from its largest magnitude (``"max"``), or a clipping of it
      (``clipping.py``): the one whose rounding moves the channel's output least on ``calib_data``
      (``"output"``) or the one with the least squared error in the weights (``"mse"``, no data).
    - ``format``: the number format: ``"int"`` (the signed integers above), ``"fp8-e4m3"`` /
      ``"fp8-e5m2"`` (8-bit floats with a scale per output channel, ``quant/fp8.py``: what current
      GPUs' FP8 tensor cores take; ``bits`` and the grid options do not apply), or ``"nf4"``
      (4-bit NormalFloat codes with an absmax per group, QLoRA's non-uniform grid, ``quant/nf4.py``:
      weight-only, needs ``group_size``).
    - ``layer_bits``: bits per layer (module name), overriding ``bits``.
    - ``int8_layers``: layers kept at INT8 in a narrower scheme: module names, or ``"first"``,
      ``"last"`` (the first and last Linear/Conv layer) and ``"depthwise"``; they become
      ``layer_bits`` (8 for a depthwise conv, 7 elsewhere) in the plan's passes.
    - ``exclude``: module names kept in float.
    - ``fold_bn``: fold BatchNorm into the convs before quantizing (static activations).
    """

    bits: int = 8
    per_channel: bool = True
    reduce_range: bool = True
    symmetric: bool = True
    group_size: int | None = None
    grid: str = "max"
    format: str = "int"
    layer_bits: dict[str, int] = field(default_factory=dict)
    int8_layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fold_bn: bool = True

    def validate(self) -> None:
        check_range("bits", self.bits, 2, 8)
        check_choice("grid", self.grid, ("max", "mse", "output"))
        check_choice("format", self.format, WEIGHT_FORMATS)
        if not all(isinstance(n, str) for n in self.exclude):
            raise ValueError("exclude must be a list of module names (strings)")
        if not isinstance(self.layer_bits, dict) or not all(isinstance(n, str) for n in self.layer_bits):
            raise ValueError("layer_bits must map module names (strings) to bit widths")
        for name, bits in self.layer_bits.items():
            check_range(f"layer_bits[{name!r}]", bits, 2, 8)
        if not all(isinstance(n, str) and n for n in self.int8_layers):
            raise ValueError(f"int8_layers must be module names or 'first', 'last', 'depthwise'; got {self.int8_layers!r}")
        if self.format.startswith("fp8"):
            if self.group_size is not None or self.grid != "max" or self.layer_bits or self.int8_layers:
                raise ValueError(f"format={self.format!r} scales each output channel by its largest magnitude: "
                                 "group_size, grid, layer_bits and int8_layers do not apply")
            return
        if self.format == "nf4" and (self.group_size is None or self.bits != 4):
            raise ValueError("format='nf4' stores 4-bit codes in groups, each with its absmax: give bits=4 and "
                             "group_size (64 is QLoRA's)")
        if self.group_size is None:
            if not self.symmetric:
                raise ValueError("symmetric=False (zero-points per group) needs group_size")
            return
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 16 \
                or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, at least 16 (MatMulNBits' blocks); got {self.group_size!r}")
        if self.bits not in (2, 3, 4):
            raise ValueError(f"group-wise weights are 2, 3 or 4 bits (stored as half bytes; 4 bits export as "
                             f"MatMulNBits); got bits={self.bits}")
        if self.grid != "max":
            raise ValueError(f"grid={self.grid!r} chooses per-channel scales; group-wise weights choose theirs "
                             "per group (AWQ clips them by the output error)")
        if self.layer_bits:
            raise ValueError("layer_bits sets per-channel widths; it does not combine with group_size yet")

    def check(self, q: Quantize) -> None:
        acts = q.activations
        if self.format.startswith("fp8") != acts.format.startswith("fp8") and acts.mode != "none":
            raise ValueError(f"Weights(format={self.format!r}) with Activations(format={acts.format!r}): FP8 "
                             "weights take FP8 activations (or none: Activations(mode='none')), integer weights "
                             "integer ones")
        other = [p for p in q.of_stage("model", "rounding", "layer")]
        if self.format.startswith("fp8") and other:
            raise ValueError(f"{type(other[0]).__name__} works on integer grids; FP8 weights are rounded to the "
                             "nearest 8-bit float, per channel")
        if self.format == "nf4" and (q.rounding is not None or q.of_stage("model")):
            raise ValueError(f"format='nf4' rounds each weight to the nearest NormalFloat code; "
                             f"{type(q.rounding or q.of_stage('model')[0]).__name__} chooses integers on a uniform "
                             "grid and does not apply")
        if self.group_size is not None and q.activations.mode != "none":
            raise ValueError("group_size quantizes weights only (MatMulNBits keeps activations in float): "
                             "add Activations(mode='none')")

    def wants_data(self, q: Quantize) -> bool:
        return self.grid == "output"

    def bits_for(self, layer: str, module: nn.Module | None = None) -> int:
        """The bits ``layer`` is quantized to (``layer_bits``, else ``bits``; 8 becomes 7 with
        ``reduce_range``, except for a depthwise conv ``module``, which cannot saturate)."""
        bits = self.layer_bits.get(layer, self.bits)
        return min(bits, 7) if self.reduce_range and not cannot_saturate(module) else bits

    @property
    def effective_bits(self) -> int:
        return self.bits_for("")


@quant_pass("activations", "scheme")
@dataclass(frozen=True, kw_only=True)
class Activations(QuantPass):
    """How layer inputs are quantized.

    - ``mode``: ``"static"`` (scales calibrated offline, the fastest form in ONNX Runtime),
      ``"dynamic"`` (computed at run time per tensor), ``"none"`` (weights only).
    - ``bits``: 8 (uint8 with a zero-point, per tensor).
    - ``calibrator``: how static ranges are chosen: ``minmax``, ``moving_average``, ``percentile``,
      ``entropy``, ``mse``; after a clamp with known bounds (ReLU6) min-max is used, since clipping
      a bounded activation can only lose its saturated values.
    - ``placement``: ``"onnxruntime"`` (uint8 with a zero-point, int32 biases: what ONNX Runtime's CPU
      kernels fuse) or ``"tensorrt"`` (TensorRT's explicit quantization: symmetric int8 activations,
      zero-point 0, float biases, Q/DQ on the inputs of weighted ops and on both inputs of residual adds;
      ``export/lint.py`` checks a file against those rules).
    - ``format``: ``"int"`` (uint8 with a zero-point), or ``"fp8-e4m3"`` / ``"fp8-e5m2"`` (8-bit
      floats, one scale per tensor from the calibrated largest magnitude: ``quant/fp8.py``).
    - ``percentile``: the ``percentile`` calibrator's percentile.
    """

    mode: str = "static"
    bits: int = 8
    calibrator: str = "minmax"
    percentile: float = 99.99
    format: str = "int"
    placement: str = "onnxruntime"

    def validate(self) -> None:
        check_choice("mode", self.mode, ("static", "dynamic", "none"))
        check_choice("format", self.format, ACTIVATION_FORMATS)
        check_choice("placement", self.placement, ("onnxruntime", "tensorrt"))
        if self.placement == "tensorrt" and self.mode != "static":
            raise ValueError("placement='tensorrt' places calibrated quantizers (TensorRT's explicit quantization "
                             "takes Q/DQ with fixed scales): use mode='static'")
        if self.format != "int" and self.mode == "dynamic":
            raise ValueError(f"format={self.format!r} activations are scaled by a calibrated range "
                             "(mode='static'): ONNX has no dynamic quantizer to 8-bit floats")
        check_choice("bits", self.bits, (8,))
        check_choice("calibrator", self.calibrator, tuple(CALIBRATORS))
        check_range("percentile", self.percentile, 50.0, 100.0, lo_open=True)

    def wants_data(self, q: Quantize) -> bool:
        return self.mode == "static"


@quant_pass("embeddings", "convert", needs_data=False)
@dataclass(frozen=True, kw_only=True)
class Embeddings(QuantPass):
    """Store ``nn.Embedding`` tables as int8 with a scale per row (a transformer's word embeddings
    are often half its file), or with ``bits=4`` as 4-bit groups of 32 along each row with a scale
    and zero-point each. A table tied to another layer's weight is quantized when that layer is, and
    kept in float (still shared) when it is not; the plan says so."""

    bits: int = 8

    def validate(self) -> None:
        check_choice("bits", self.bits, (8, 4))


@quant_pass("half", "scheme", needs_data=False)
@dataclass(frozen=True, kw_only=True)
class HalfPrecision(QuantPass):
    """The model in 16-bit floats (``quant/half.py``), alone in its list.

    - ``dtype``: ``"float16"`` or ``"bfloat16"``.
    - ``compute``: ``"half"``: 16-bit arithmetic, normalizations and softmax modules kept in FP32
      (the GPU form, exported as a 16-bit ONNX file with FP32 inputs and outputs); ``"float32"``:
      16-bit weights, FP32 arithmetic (the CPU form: half the file, any runtime runs it).
    - ``keep_float``: more modules (names, or class names) kept in FP32.
    """

    dtype: str = "float16"
    compute: str = "half"
    keep_float: tuple[str, ...] = ()

    def validate(self) -> None:
        check_choice("dtype", self.dtype, ("float16", "bfloat16"))
        check_choice("compute", self.compute, ("half", "float32"))
        if not all(isinstance(n, str) and n for n in self.keep_float):
            raise ValueError(f"keep_float must be module names or class names; got {self.keep_float!r}")

    def check(self, q: Quantize) -> None:
        others = [type(p).__name__ for p in q.passes if p is not self]
        if others:
            raise ValueError(f"HalfPrecision casts the whole model and stands alone in its list; got it with "
                             f"{', '.join(others)}")


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
