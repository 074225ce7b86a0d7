"""The old flat quantization config, kept so that old dicts, YAML and saved plans keep working:
``QuantConfig.to_passes()`` is the one translation into the list of passes (``quant/passes.py``)
that ``sk.quantize`` runs. Passing one to ``sk.quantize`` warns (``DeprecationWarning``).

>>> [p.name for p in QuantConfig(activations="dynamic", smooth_alpha=0.5).to_passes().passes]
['weights', 'activations', 'smoothquant']
>>> QuantConfig.from_dict({"weight_bits": 9})
Traceback (most recent call last):
...
ValueError: weight_bits must be in [2, 8], got 9
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from slimkit.core.config import Config, check_choice, check_range
from slimkit.quant.calibrators import CALIBRATORS
from slimkit.quant.passes import (
    AWQ,
    GPTQ,
    Activations,
    AdaRound,
    BiasCorrection,
    Embeddings,
    Equalize,
    KeepFloat,
    MixedPrecision,
    OutlierChannels,
    Quantize,
    QuantPass,
    SmoothQuant,
    Weights,
    cannot_saturate,
)
from slimkit.quant.schemes import check_layer_names

__all__ = ["QuantConfig", "cannot_saturate", "resolve_int8_layers"]


@dataclass(frozen=True, kw_only=True)
class QuantConfig(Config):
    """Post-training quantization of Linear/Conv weights and of activations.

    - ``activations``: ``"static"`` (scales calibrated offline, the fastest form in ONNX Runtime),
      ``"dynamic"`` (scales computed at run time per tensor), ``"none"`` (weights only).
    - ``weight_bits``: signed symmetric weights, per output channel (``per_channel``) or per tensor.
    - ``reduce_range``: keep 8-bit weights to 7 bits. On x86 CPUs without VNNI the uint8 x int8
      kernels sum pairs of products in int16 and saturate; 7-bit weights cannot overflow (ONNX
      Runtime's own ``reduce_range`` advice). Costs about one bit of weight precision. Narrower
      weights cannot overflow and are left alone, and so are depthwise convs, whose kernel widens
      both operands to 16 bits (``cannot_saturate``): they keep 8 bits. Dynamic layers with full 8-bit weights export
      them as uint8 with a zero-point of 128, which the uint8 x uint8 kernels multiply exactly but
      more slowly (benchmarks/results/transformer_quant.md).
    - ``calibrator``: one of ``minmax``, ``moving_average``, ``percentile``, ``entropy``, ``mse``.
      Known issue: ``entropy`` over-clips some CNN activations (benchmarks/results/ptq_cnn.md), so
      no preset uses it yet.
    - ``exclude``: module names (fx/``named_modules`` names) kept in float.
    - ``calib_batches``: how many calibration batches to use at most (``None``: all).
    - ``equalize``: cross-layer equalization before quantizing (ReLU6 becomes ReLU, as in the paper).
      With ``calib_data`` the model is quantized with and without it and equalization is kept only
      if it brings the outputs closer to the float model's on that data.
    - ``bias_correction``: subtract the output shift weight rounding causes, measured on the data.
    - ``weight_grid``: each channel's weight scale from its largest magnitude (``"max"``), or a
      clipping ratio of it (``clipping.py``; worth it at four bits, where a few outliers would take
      most of the 15 levels): the one whose rounding moves the channel's output least on
      ``calib_data`` (``"output"``, the grid for round-to-nearest), or the one leaving the least
      squared error in the weights themselves (``"mse"``, no data needed; the grid AdaRound starts from).
    - ``rounding``: ``"nearest"``, or ``"adaround"`` (learned up/down rounding per weight, layer by
      layer, ``adaround_iterations`` steps each). Equalization, AdaRound and bias correction need
      ``calib_data`` and compose in that order.
    - ``group_size``: group-wise weights for Linear layers, weight-only (``activations="none"``),
      ``weight_bits`` 4 (exported as ONNX Runtime's MatMulNBits), or 3 or 2 (the same half-byte
      layout, for measuring in PyTorch: ONNX Runtime's CPU kernel has no 3-bit form and slimkit does
      not write the 2-bit packing, so exporting one is an error naming the layer); ``weight_symmetric=False`` gives
      each group a zero-point. ``rounding="gptq"`` chooses the integers with GPTQ (``gptq_damp``,
      ``gptq_act_order``) from ``calib_data``; ``rounding="awq"`` scales the salient input channels
      first (AWQ), dividing the input by the same scales at run time, then (``awq_clip``, on by
      default) shrinks each group's range where that lowers its share of the output error.
    - ``smooth_alpha``: SmoothQuant before dynamic INT8 (``quant/smoothquant.py``): each Linear
      layer's input channels are divided by ``s = max|X|^alpha / max|W|^(1-alpha)`` at run time and
      its weight columns multiplied by it, measured on ``calib_data``. A layer keeps the smoothing
      only if its simulated INT8 output error drops; ``plan.passes["smoothquant"]`` says which.
    - ``outlier_threshold``: mixed-precision decomposition (LLM.int8(), ``quant/llm_int8.py``) for
      dynamic INT8: a Linear layer's input channels whose max ``|x|`` on ``calib_data`` exceeds
      ``outlier_threshold`` times its median channel's (at most 8 per layer, the largest) are
      multiplied in float beside the INT8 product, which no longer sizes its grid for them. Each
      float branch costs a Gather, a MatMul and an Add at run time, so a layer keeps its float
      channels only if they divide its simulated INT8 output error (after smoothing, if any) by at
      least ``outlier_min_gain``. ``plan.passes["outlier_channels"]`` names the kept ones per layer,
      ``plan.passes["outlier_candidates"]`` every candidate with its error ratio.
    - ``quantize_embeddings``: store ``nn.Embedding`` tables as int8 with a scale per row (a
      transformer's word embeddings are often half its file), or with ``embedding_bits=4`` as
      4-bit groups of 32 along each row with a scale and zero-point each. A table tied to another
      layer's weight is quantized when that layer is, and kept in float (still shared) when it is
      not; the plan says so.
    - ``layer_bits``: weight bits per layer (module name), overriding ``weight_bits``.
    - ``int8_layers``: layers that keep INT8 weights in a narrower config: module names, or
      ``"first"`` and ``"last"`` (the first and last Linear/Conv layer the model defines, not
      excluded: a CNN's stem and classifier) and ``"depthwise"`` (every depthwise conv: a few
      weights per channel, which four bits cannot hold). They become ``layer_bits`` in the plan's
      config: 8 for a depthwise conv, 7 elsewhere (the int8 preset's widths: no kernel saturates).
    - ``keep_float``: the sensitivity pass. Each layer is quantized alone and the outputs' change on
      ``calib_data`` measured; the ``keep_float`` layers that change them most stay in float (added
      to ``exclude`` in the plan's config; the scan, by name, in ``plan.passes["keep_float"]``).
    - Mixed precision from sensitivity: ``mixed_bits`` (the candidate weight widths, e.g. ``[4, 8]``)
      with one budget, ``target_bits`` (average weight bits per parameter, a size budget) or
      ``target_sqnr_db`` (output SQNR against the float model on the calibration data, a fidelity
      budget; layers fall back to float when ``float_fallback`` and the widest width is not
      enough). The search's choice becomes ``layer_bits`` (and ``exclude``) in the plan's config;
      its measurements are in ``plan.passes["mixed_precision"]``.
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
    weight_grid: str = "max"
    rounding: str = "nearest"
    adaround_iterations: int = 1000
    group_size: int | None = None
    weight_symmetric: bool = True
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    awq_clip: bool = True
    smooth_alpha: float | None = None
    outlier_threshold: float | None = None
    outlier_min_gain: float = 3.0
    quantize_embeddings: bool = False
    embedding_bits: int = 8
    layer_bits: dict[str, int] = field(default_factory=dict)
    int8_layers: tuple[str, ...] = ()
    mixed_bits: tuple[int, ...] = ()
    target_bits: float | None = None
    target_sqnr_db: float | None = None
    float_fallback: bool = True
    keep_float: int = 0

    def validate(self) -> None:
        check_choice("activations", self.activations, ("static", "dynamic", "none"))
        check_range("weight_bits", self.weight_bits, 2, 8)
        check_choice("activation_bits", self.activation_bits, (8,))
        check_choice("calibrator", self.calibrator, tuple(CALIBRATORS))
        check_range("percentile", self.percentile, 50.0, 100.0, lo_open=True)
        if self.calib_batches is not None:
            check_range("calib_batches", self.calib_batches, 1, float("inf"))
        check_choice("rounding", self.rounding, ("nearest", "adaround", "gptq", "awq"))
        check_choice("weight_grid", self.weight_grid, ("max", "mse", "output"))
        if self.weight_grid != "max" and self.group_size is not None:
            raise ValueError(f"weight_grid={self.weight_grid!r} chooses per-channel scales; group-wise weights choose theirs "
                             "per group (rounding='awq' clips them by the output error)")
        self._validate_groups()
        check_range("adaround_iterations", self.adaround_iterations, 1, 10**6)
        if self.equalize and not self.fold_bn:
            raise ValueError("equalize needs fold_bn=True: equalization scales the folded weights")
        check_layer_names(self.exclude, self.layer_bits, self.int8_layers)
        if self.int8_layers and self.mixed_bits:
            raise ValueError("int8_layers fixes some widths; with mixed_bits the search chooses every layer's width")
        self._validate_mixed()
        self._validate_keep_float()
        check_choice("embedding_bits", self.embedding_bits, (8, 4))
        if self.embedding_bits != 8 and not self.quantize_embeddings:
            raise ValueError("embedding_bits sets how embedding tables are stored; it needs quantize_embeddings=True")
        if self.smooth_alpha is not None:
            check_range("smooth_alpha", self.smooth_alpha, 0.0, 1.0)
            if self.activations != "dynamic":
                raise ValueError("smooth_alpha (SmoothQuant) works with activations='dynamic' here: a static "
                                 "input quantizer would see the unsmoothed input; use the 'int8-smoothquant' preset")
        if self.outlier_threshold is not None:
            check_range("outlier_threshold", self.outlier_threshold, 1.0, float("inf"), lo_open=True)
            if self.activations != "dynamic":
                raise ValueError("outlier_threshold (float outlier channels) works with activations='dynamic': "
                                 "a static input quantizer would see the outliers before the layer")
        check_range("outlier_min_gain", self.outlier_min_gain, 1.0, float("inf"))
        if self.outlier_min_gain != 3.0 and self.outlier_threshold is None:
            raise ValueError("outlier_min_gain decides which float outlier channels are kept; it needs outlier_threshold")

    def _validate_groups(self) -> None:
        check_range("gptq_damp", self.gptq_damp, 0.0, 1.0, lo_open=True)
        check_choice("awq_clip", self.awq_clip, (True, False))
        if self.group_size is None:
            if self.rounding in ("gptq", "awq"):
                raise ValueError(f"rounding={self.rounding!r} works on group-wise weights: set group_size (e.g. 128) "
                                 f"and activations='none', or use the 'int4-{self.rounding}' preset")
            if not self.weight_symmetric:
                raise ValueError("weight_symmetric=False (zero-points per group) needs group_size")
            return
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 16 \
                or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, at least 16 (MatMulNBits' blocks); got {self.group_size!r}")
        if self.activations != "none":
            raise ValueError("group_size quantizes weights only (MatMulNBits keeps activations in float): "
                             "set activations='none'")
        if self.weight_bits not in (2, 3, 4):
            raise ValueError(f"group-wise weights are 2, 3 or 4 bits (stored as half bytes; 4 bits export as "
                             f"MatMulNBits); got weight_bits={self.weight_bits}")
        if self.rounding == "adaround":
            raise ValueError("AdaRound learns per-channel grids; for group-wise weights use rounding='gptq'")
        if self.mixed_bits or self.layer_bits:
            raise ValueError("mixed precision chooses per-channel widths; it does not combine with group_size yet")

    def _validate_keep_float(self) -> None:
        if isinstance(self.keep_float, bool) or not isinstance(self.keep_float, int) or self.keep_float < 0:
            raise ValueError(f"keep_float is a number of layers, at least 0, got {self.keep_float!r}")
        if self.keep_float and (self.mixed_bits or self.group_size is not None):
            raise ValueError("keep_float chooses the float layers of a uniform INT8 or low-bit model; with mixed_bits, "
                             "float_fallback makes that choice, and group-wise weights do not combine with it yet")

    def _validate_mixed(self) -> None:
        budgets = [n for n in ("target_bits", "target_sqnr_db") if getattr(self, n) is not None]
        if not self.mixed_bits:
            if budgets:
                raise ValueError(f"{budgets[0]} is a mixed-precision budget: give the candidate widths too, "
                                 "e.g. mixed_bits=[4, 8]")
            return
        for bits in self.mixed_bits:
            check_range("mixed_bits", bits, 2, 8)
        if len(budgets) != 1:
            raise ValueError("mixed_bits needs exactly one budget: target_bits (size) or target_sqnr_db (fidelity)")
        if self.layer_bits:
            raise ValueError("give layer_bits (a fixed choice) or mixed_bits (a search), not both")
        if self.rounding == "adaround":
            raise ValueError("the mixed-precision search measures round-to-nearest; run it first, then pass the "
                             "layer_bits it chose (plan.config.layer_bits) with rounding='adaround'")
        if self.target_bits is not None:
            check_range("target_bits", self.target_bits, min(self.mixed_bits), max(self.mixed_bits))
        if self.target_sqnr_db is not None:
            check_range("target_sqnr_db", self.target_sqnr_db, 0.0, 200.0, lo_open=True)

    @property
    def effective_weight_bits(self) -> int:
        return self.bits_for("")

    def bits_for(self, layer: str, module: nn.Module | None = None) -> int:
        """The weight bits ``layer`` is quantized to (``layer_bits``, else ``weight_bits``; 8 becomes
        7 with ``reduce_range``, except for a depthwise conv ``module``, which cannot saturate)."""
        bits = self.layer_bits.get(layer, self.weight_bits)
        return min(bits, 7) if self.reduce_range and not cannot_saturate(module) else bits

    def to_passes(self) -> Quantize:
        """The same quantization as a list of passes: what ``sk.quantize`` runs."""
        passes: list[QuantPass] = [
            Weights(bits=self.weight_bits, per_channel=self.per_channel, reduce_range=self.reduce_range,
                    symmetric=self.weight_symmetric, group_size=self.group_size, grid=self.weight_grid,
                    layer_bits=dict(self.layer_bits), int8_layers=self.int8_layers, exclude=self.exclude,
                    fold_bn=self.fold_bn),
            Activations(mode=self.activations, bits=self.activation_bits, calibrator=self.calibrator,
                        percentile=self.percentile)]
        if self.equalize:
            passes.append(Equalize())
        if self.smooth_alpha is not None:
            passes.append(SmoothQuant(alpha=self.smooth_alpha))
        if self.outlier_threshold is not None:
            passes.append(OutlierChannels(threshold=self.outlier_threshold, min_gain=self.outlier_min_gain))
        rounding = {"gptq": lambda: GPTQ(damp=self.gptq_damp, act_order=self.gptq_act_order),
                    "awq": lambda: AWQ(clip=self.awq_clip),
                    "adaround": lambda: AdaRound(iterations=self.adaround_iterations)}.get(self.rounding)
        if rounding is not None:
            passes.append(rounding())
        if self.bias_correction:
            passes.append(BiasCorrection())
        if self.quantize_embeddings:
            passes.append(Embeddings(bits=self.embedding_bits))
        if self.mixed_bits:
            passes.append(MixedPrecision(bits=self.mixed_bits, target_bits=self.target_bits,
                                         target_sqnr_db=self.target_sqnr_db, float_fallback=self.float_fallback))
        if self.keep_float:
            passes.append(KeepFloat(layers=self.keep_float))
        return Quantize(passes=tuple(passes), calib_batches=self.calib_batches)


def resolve_int8_layers(model: nn.Module, q: Quantize) -> Quantize:
    """``q`` with ``Weights.int8_layers`` turned into ``layer_bits`` for ``model`` (explicit
    ``layer_bits`` win); names that are not Linear/Conv layers of ``model`` are an error."""
    cfg = q.weights
    if not cfg.int8_layers:
        return q
    from .modules import WEIGHTED_LAYERS

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS)
              and not any(n == e or n.startswith(e + ".") for e in cfg.exclude)]
    names = dict(layers)
    chosen: list[str] = []
    for entry in cfg.int8_layers:
        if entry == "first":
            chosen += [n for n, _ in layers[:1]]
        elif entry == "last":
            chosen += [n for n, _ in layers[-1:]]
        elif entry == "depthwise":
            chosen += [n for n, m in layers if cannot_saturate(m)]
        elif entry in names:
            chosen.append(entry)
        else:
            raise ValueError(f"int8_layers names {entry!r}, which is not a Linear/Conv layer of {type(model).__name__} "
                             f"(or is excluded); its layers are {[n for n, _ in layers][:6]} ...")
    bits = {n: 8 if cannot_saturate(names[n]) else 7 for n in chosen}
    return q.with_weights(layer_bits={**bits, **cfg.layer_bits}, int8_layers=())
