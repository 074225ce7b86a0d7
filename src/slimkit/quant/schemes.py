"""The scheme passes: the number formats a quantization list writes in. ``Weights`` (bits, grids,
groups, formats) and ``Activations`` (static, dynamic or none; calibrators; placement), then
``Embeddings`` (tables stored quantized) and ``HalfPrecision`` (the FP16/BF16 cast, alone in its list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from slimkit.core.config import check_choice, check_range
from slimkit.quant.calibrators import CALIBRATORS
from slimkit.quant.registry import QuantPass, cannot_saturate, quant_pass

if TYPE_CHECKING:
    from slimkit.quant.passes import Quantize

__all__ = ["Weights", "Activations", "Embeddings", "HalfPrecision", "WEIGHT_FORMATS", "ACTIVATION_FORMATS",
           "check_layer_names"]

WEIGHT_FORMATS = ("int", "fp8-e4m3", "fp8-e5m2", "nf4")
ACTIVATION_FORMATS = ("int", "fp8-e4m3", "fp8-e5m2")


def check_layer_names(exclude: Any, layer_bits: Any, int8_layers: Any) -> None:
    """The per-layer fields of a weight scheme: module names, and bit widths from 2 to 8."""
    if not all(isinstance(n, str) for n in exclude):
        raise ValueError("exclude must be a list of module names (strings)")
    if not isinstance(layer_bits, dict) or not all(isinstance(n, str) for n in layer_bits):
        raise ValueError("layer_bits must map module names (strings) to bit widths")
    for name, bits in layer_bits.items():
        check_range(f"layer_bits[{name!r}]", bits, 2, 8)
    if not all(isinstance(n, str) and n for n in int8_layers):
        raise ValueError(f"int8_layers must be module names or 'first', 'last', 'depthwise'; got {int8_layers!r}")


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
        check_layer_names(self.exclude, self.layer_bits, self.int8_layers)
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
