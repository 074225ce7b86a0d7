"""Quantization configs and presets.

>>> QuantConfig(calibrator="entropy").activations
'static'
>>> QuantConfig.from_dict({"weight_bits": 9})
Traceback (most recent call last):
...
ValueError: weight_bits must be in [2, 8], got 9
"""

from __future__ import annotations

from dataclasses import dataclass

from slimkit.core.config import Config, check_choice, check_range
from slimkit.quant.calibrators import CALIBRATORS

__all__ = ["QuantConfig", "PRESETS"]


@dataclass(frozen=True, kw_only=True)
class QuantConfig(Config):
    """Post-training quantization of Linear/Conv weights and of activations.

    - ``activations``: ``"static"`` (scales calibrated offline, the fastest form in ONNX Runtime),
      ``"dynamic"`` (scales computed at run time per tensor), ``"none"`` (weights only).
    - ``weight_bits``: signed symmetric weights, per output channel (``per_channel``) or per tensor.
    - ``reduce_range``: keep weights to ``weight_bits - 1`` bits. On x86 CPUs without VNNI the
      uint8 x int8 kernels sum pairs of products in int16 and saturate; 7-bit weights cannot
      overflow (ONNX Runtime's own ``reduce_range`` advice). Costs about one bit of weight precision.
    - ``calibrator``: one of ``minmax``, ``moving_average``, ``percentile``, ``entropy``, ``mse``.
      Known issue: ``entropy`` over-clips some CNN activations (benchmarks/results/ptq_cnn.md), so
      no preset uses it yet.
    - ``exclude``: module names (fx/``named_modules`` names) kept in float.
    - ``calib_batches``: how many calibration batches to use at most (``None``: all).
    - ``equalize``: cross-layer equalization before quantizing (ReLU6 becomes ReLU, as in the paper).
    - ``bias_correction``: subtract the output shift weight rounding causes, measured on the data.
    - ``rounding``: ``"nearest"``, or ``"adaround"`` (learned up/down rounding per weight, layer by
      layer, ``adaround_iterations`` steps each). Equalization, AdaRound and bias correction need
      ``calib_data`` and compose in that order.
    """

    activations: str = "static"
    weight_bits: int = 8
    per_channel: bool = True
    reduce_range: bool = True
    activation_bits: int = 8
    calibrator: str = "minmax"
    percentile: float = 99.99
    fold_bn: bool = True
    exclude: tuple[str, ...] = ()
    calib_batches: int | None = None
    equalize: bool = False
    bias_correction: bool = False
    rounding: str = "nearest"
    adaround_iterations: int = 1000

    def validate(self) -> None:
        check_choice("activations", self.activations, ("static", "dynamic", "none"))
        check_range("weight_bits", self.weight_bits, 2, 8)
        check_choice("activation_bits", self.activation_bits, (8,))
        check_choice("calibrator", self.calibrator, tuple(CALIBRATORS))
        check_range("percentile", self.percentile, 50.0, 100.0, lo_open=True)
        if self.calib_batches is not None:
            check_range("calib_batches", self.calib_batches, 1, float("inf"))
        if self.reduce_range and self.weight_bits < 3:
            raise ValueError("reduce_range needs weight_bits >= 3")
        check_choice("rounding", self.rounding, ("nearest", "adaround"))
        check_range("adaround_iterations", self.adaround_iterations, 1, 10**6)
        if self.equalize and not self.fold_bn:
            raise ValueError("equalize needs fold_bn=True: equalization scales the folded weights")
        if not all(isinstance(n, str) for n in self.exclude):
            raise ValueError("exclude must be a list of module names (strings)")

    @property
    def effective_weight_bits(self) -> int:
        return self.weight_bits - 1 if self.reduce_range else self.weight_bits


PRESETS: dict[str, QuantConfig] = {
    # Static W8A8 for the ONNX Runtime CPU: per-channel int8 weights, per-tensor uint8 activations.
    "int8": QuantConfig(),
    "int8-dynamic": QuantConfig(activations="dynamic"),
    "int8-percentile": QuantConfig(calibrator="percentile"),
    "int8-entropy": QuantConfig(calibrator="entropy"),
    # Cross-layer equalization and bias correction before INT8 (helps depthwise nets).
    "int8-cle": QuantConfig(equalize=True, bias_correction=True),
    # 4-bit per-channel weights (int8 storage in ONNX, values in [-7, 7]), 8-bit activations.
    "w4a8": QuantConfig(weight_bits=4, reduce_range=False),
    "w4a8-adaround": QuantConfig(weight_bits=4, reduce_range=False, rounding="adaround"),
}
