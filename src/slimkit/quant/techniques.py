"""The techniques among the quantization passes (``quant/registry.py`` holds the base,
``quant/schemes.py`` the scheme passes, ``quant/passes.py`` the list): model passes (``Equalize``, ``SmoothQuant``, ``OutlierChannels``), rounding
passes (``GPTQ``, ``AWQ``, ``AdaRound``), the layer pass ``BiasCorrection`` and the search passes
(``MixedPrecision``, ``KeepFloat``). Each validates its own fields and, in ``check``, its fit with
the rest of the list; its handler lives beside the algorithm it runs.

>>> GPTQ(damp=0.02).name, GPTQ.stage
('gptq', 'rounding')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slimkit.core.config import check_choice, check_range
from slimkit.quant.registry import QuantPass, quant_pass

if TYPE_CHECKING:
    from slimkit.quant.passes import Quantize

__all__ = ["Equalize", "SmoothQuant", "OutlierChannels", "GPTQ", "AWQ", "AdaRound", "BiasCorrection",
           "MixedPrecision", "KeepFloat"]


@quant_pass("equalize", "model")
@dataclass(frozen=True, kw_only=True)
class Equalize(QuantPass):
    """Cross-layer equalization (``quant/equalization.py``; ReLU6 becomes ReLU, as in the paper).
    The model is quantized with and without it on ``calib_data`` and it is kept only if it brings
    the outputs closer to the float model's (``plan.passes["equalization"]``)."""

    def check(self, q: Quantize) -> None:
        if not q.weights.fold_bn:
            raise ValueError("Equalize needs Weights(fold_bn=True): equalization scales the folded weights")


def _needs_dynamic(p: QuantPass, q: Quantize, why: str, preset: str) -> None:
    if q.activations.mode != "dynamic":
        raise ValueError(f"{type(p).__name__} works with Activations(mode='dynamic'): {why}; use the {preset!r} preset")


@quant_pass("smoothquant", "model")
@dataclass(frozen=True, kw_only=True)
class SmoothQuant(QuantPass):
    """SmoothQuant (``quant/smoothquant.py``): each Linear layer's input channels are divided by
    ``s = max|X|^alpha / max|W|^(1-alpha)`` (``alpha`` in [0, 1]) at run time and its weight columns multiplied by it,
    measured on ``calib_data``. A layer keeps the smoothing only if its simulated INT8 output error
    drops; ``plan.passes["smoothquant"]`` says which. Decided together with ``OutlierChannels``
    when both are given (the float channels are left out before the scales are searched)."""

    alpha: float = 0.5

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0)

    def check(self, q: Quantize) -> None:
        _needs_dynamic(self, q, "a static input quantizer would see the unsmoothed input", "int8-smoothquant")


@quant_pass("outlier_channels", "model")
@dataclass(frozen=True, kw_only=True)
class OutlierChannels(QuantPass):
    """LLM.int8()'s mixed-precision decomposition (``quant/llm_int8.py``): a Linear layer's input
    channels whose max ``|x|`` on ``calib_data`` exceeds ``threshold`` times its median channel's
    (at most 8 per layer, the largest) are multiplied in float beside the INT8 product. A layer keeps
    them only if they divide its simulated INT8 output error by at least ``min_gain`` (each float
    branch costs a Gather, a MatMul and an Add). ``plan.passes["outlier_channels"]`` names the kept
    ones, ``plan.passes["outlier_candidates"]`` every candidate with its error ratio."""

    threshold: float = 8.0
    min_gain: float = 3.0

    def validate(self) -> None:
        check_range("threshold", self.threshold, 1.0, float("inf"), lo_open=True)
        check_range("min_gain", self.min_gain, 1.0, float("inf"))

    def check(self, q: Quantize) -> None:
        _needs_dynamic(self, q, "a static input quantizer would see the outliers before the layer", "int8-smoothquant")


def _needs_groups(p: QuantPass, q: Quantize, preset: str) -> None:
    if q.weights.group_size is None:
        raise ValueError(f"{type(p).__name__} works on group-wise weights: give Weights(group_size=128, bits=4) and "
                         f"Activations(mode='none'), or use the {preset!r} preset")


@quant_pass("gptq", "rounding")
@dataclass(frozen=True, kw_only=True)
class GPTQ(QuantPass):
    """GPTQ (``quant/gptq.py``): the group-wise integers chosen column by column, each rounding's
    error spread over the columns not yet rounded through the inverse Hessian of the layer's inputs
    (``damp``: the fraction of its mean diagonal added; ``act_order``: the columns with the largest
    Hessian diagonal first)."""

    damp: float = 0.01
    act_order: bool = False

    def validate(self) -> None:
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)
        check_choice("act_order", self.act_order, (True, False))

    def check(self, q: Quantize) -> None:
        _needs_groups(self, q, "int4-gptq")


@quant_pass("awq", "rounding")
@dataclass(frozen=True, kw_only=True)
class AWQ(QuantPass):
    """AWQ (``quant/awq.py``): the salient input channels scaled up before rounding (the input
    divided by the same scales at run time); then, with ``clip``, each group's range shrunk where
    that lowers its share of the output error."""

    clip: bool = True

    def validate(self) -> None:
        check_choice("clip", self.clip, (True, False))

    def check(self, q: Quantize) -> None:
        _needs_groups(self, q, "int4-awq")


@quant_pass("adaround", "rounding")
@dataclass(frozen=True, kw_only=True)
class AdaRound(QuantPass):
    """AdaRound (``quant/adaround.py``): each weight's rounding up or down learned layer by layer,
    ``iterations`` steps each, on the layer's calibration inputs (convs on sampled positions).
    ``asymmetric``: reconstruct the float model's own output at the layer (its float inputs through
    the float weights) from the quantized model's inputs, the paper's asymmetric reconstruction, so
    each layer also makes up for the error the layers before it left."""

    iterations: int = 1000
    asymmetric: bool = False

    def validate(self) -> None:
        check_range("iterations", self.iterations, 1, 10**6)
        check_choice("asymmetric", self.asymmetric, (True, False))

    def wants_float_inputs(self) -> bool:
        return self.asymmetric

    def check(self, q: Quantize) -> None:
        if q.weights.group_size is not None:
            raise ValueError("AdaRound learns per-channel grids; for group-wise weights use GPTQ")


@quant_pass("bias_correction", "layer")
@dataclass(frozen=True, kw_only=True)
class BiasCorrection(QuantPass):
    """Subtract the output shift the layer's weight rounding causes, measured on its calibration
    inputs (``quant/bias_correction.py``). ``from_float``: the shift from the float model's own
    output at the layer instead (the error the quantized inputs carry included). ``compare`` (with
    ``from_float``): also quantize with the shift measured on the layer's own inputs and keep the
    one whose outputs on the calibration data are closer to the float model's; the float target
    can overshoot where a nonlinearity saturates (a random-weight MobileNetV2's ReLU6s on two
    images), and ``plan.passes["bias_correction_source"]`` records both and the choice."""

    from_float: bool = False
    compare: bool = True

    def validate(self) -> None:
        check_choice("from_float", self.from_float, (True, False))
        check_choice("compare", self.compare, (True, False))

    def compares(self) -> bool:
        """Whether the model is quantized both ways to choose the shift's source."""
        return self.from_float and self.compare

    def wants_float_inputs(self) -> bool:
        return self.from_float


@quant_pass("mixed_precision", "search")
@dataclass(frozen=True, kw_only=True)
class MixedPrecision(QuantPass):
    """Weight widths per layer from sensitivity: ``bits`` (the candidate widths, e.g. 4,8) with one budget,
    ``target_bits`` (average bits per weight: size) or ``target_sqnr_db`` (output SQNR against the
    float model on the calibration data: fidelity; layers fall back to float when
    ``float_fallback`` and the widest width is not enough). The choice becomes the plan's
    ``Weights.layer_bits`` (and ``exclude``); its measurements ``plan.passes["mixed_precision"]``."""

    bits: tuple[int, ...] = (4, 8)
    target_bits: float | None = None
    target_sqnr_db: float | None = None
    float_fallback: bool = True

    def validate(self) -> None:
        if not self.bits:
            raise ValueError("bits: give the candidate widths, e.g. [4, 8]")
        for bits in self.bits:
            check_range("bits", bits, 2, 8)
        budgets = [n for n in ("target_bits", "target_sqnr_db") if getattr(self, n) is not None]
        if len(budgets) != 1:
            raise ValueError("MixedPrecision needs exactly one budget: target_bits (size) or target_sqnr_db (fidelity)")
        if self.target_bits is not None:
            check_range("target_bits", self.target_bits, min(self.bits), max(self.bits))
        if self.target_sqnr_db is not None:
            check_range("target_sqnr_db", self.target_sqnr_db, 0.0, 200.0, lo_open=True)

    def check(self, q: Quantize) -> None:
        if q.weights.layer_bits:
            raise ValueError("give Weights(layer_bits=...) (a fixed choice) or MixedPrecision (a search), not both")
        if q.weights.int8_layers:
            raise ValueError("Weights(int8_layers=...) fixes some widths; with MixedPrecision the search chooses every "
                             "layer's width")
        if q.weights.group_size is not None:
            raise ValueError("mixed precision chooses per-channel widths; it does not combine with group_size yet")
        if isinstance(q.rounding, AdaRound):
            raise ValueError("the mixed-precision search measures round-to-nearest; run it first, then pass the "
                             "layer_bits it chose (the plan's Weights) with AdaRound")


@quant_pass("keep_float", "search")
@dataclass(frozen=True, kw_only=True)
class KeepFloat(QuantPass):
    """The sensitivity pass: each layer is quantized alone and the outputs' change on
    ``calib_data`` measured; up to ``layers`` (a number) of those that change them most stay in float,
    tried in that order, each kept only where leaving it in float brings the outputs closer to the
    float model's (added to the plan's ``Weights.exclude``; the scan and each try, by name, in
    ``plan.passes["keep_float"]``; fewer than ``layers`` is a warning naming the layers tried)."""

    layers: int = 1

    def validate(self) -> None:
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ValueError(f"layers is a number of layers, at least 1, got {self.layers!r}")

    def check(self, q: Quantize) -> None:
        if q.find(MixedPrecision) is not None:
            raise ValueError("KeepFloat chooses the float layers of a uniform model; with MixedPrecision, "
                             "float_fallback makes that choice")
        if q.weights.group_size is not None:
            raise ValueError("KeepFloat does not combine with group-wise weights yet")
