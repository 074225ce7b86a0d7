"""Quantization-aware training: ``sk.qat(model, preset_or_config, train_data)``.

1. The model is traced and every Linear/Conv becomes a ``FakeQuantWeighted`` (taking the BatchNorm
   after it along, to simulate folding); activation quantizers go where PTQ puts them.
2. Calibration sets the starting ranges, exactly as PTQ would (``calib_data``, or the first
   ``calib_batches`` of the training inputs).
3. The shared training loop (``slimkit.train.fit``: SGD with momentum, cosine decay) fine-tunes
   with the straight-through estimator, optionally taught by the float model. BatchNorm
   statistics and the moving-average ranges freeze at the configured steps.
4. The fake-quant modules are converted to the PTQ ones, so the result is an ordinary quantized
   model with a ``QuantPlan``: ``sk.export_onnx`` writes integer ONNX and ``sk.save``/``sk.load``
   round-trip it.

Good practice, which the defaults follow (Krishnamoorthi 2018; Nagel et al. 2021, sec. 4): about
10% of the original training budget, a learning rate about 1% of the original one, BatchNorm
statistics frozen half-way, ranges frozen three quarters of the way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from slimkit.core.batch import Batch, check_batches, model_inputs
from slimkit.core.config import Config, check_choice, check_range
from slimkit.core.dropin import replace_module
from slimkit.core.graph import (
    TraceError,
    batchnorm_pairs,
    float_tensor_nodes,
    fold_batchnorm,
    trace,
)
from slimkit.core.plans import attach
from slimkit.quant.calibrators import CALIBRATORS, make_observer
from slimkit.quant.modules import WEIGHTED_LAYERS as _WEIGHTED
from slimkit.quant.modules import ActQuant, QuantConv, QuantLinear
from slimkit.quant.passes import Activations, Quantize, Weights
from slimkit.quant.placement import bounded_nodes, find_placement, insert_quantizers
from slimkit.quant.ptq import CLIPPING_CALIBRATORS, QuantPlan, _quantize_biases, calibrate
from slimkit.quant.qat_modules import QAT_METHODS, FakeQuantAct, FakeQuantWeighted

__all__ = ["QATConfig", "QAT_PRESETS", "qat", "prepare_qat", "convert_qat"]

log = logging.getLogger(__name__)



@dataclass(frozen=True, kw_only=True)
class QATConfig(Config):
    """Quantization-aware training.

    The grid: ``weight_bits`` (signed symmetric, ``per_channel``), ``reduce_range``, 8-bit unsigned
    activations; ``calibrator`` and ``percentile`` set the starting ranges; ``exclude`` keeps
    layers in float. As in ``Weights``.

    - ``method``: ``"ste"`` (weights' ranges follow the weights, activations' ranges a moving
      average), ``"lsq"`` (learned step sizes for weights and activations, Esser et al. 2020) or
      ``"pact"`` (learned activation clipping, Choi et al. 2018).
    - ``epochs``, ``lr``, ``momentum``, ``weight_decay``, ``seed``: the fine-tuning run (SGD,
      cosine decay). Pick about 10% of the original epochs and 1% of the original learning rate.
    - ``freeze_bn_step``: the optimizer step after which BatchNorm statistics stop moving
      (``None``: half-way; 0: from the start).
    - ``freeze_observers_step``: the step after which the ``ste`` activation ranges stop moving
      (``None``: three quarters of the way). LSQ and PACT learn their ranges: no observer to freeze.
    - ``distill``: the float model teaches (``KDLoss``) instead of the labels alone.
    - ``calib_batches``: batches used for the starting ranges.
    """

    weight_bits: int = 8
    per_channel: bool = True
    reduce_range: bool = True
    calibrator: str = "minmax"
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()
    method: str = "ste"
    epochs: int = 2
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    freeze_bn_step: int | None = None
    freeze_observers_step: int | None = None
    distill: bool = False
    calib_batches: int = 8

    def validate(self) -> None:
        check_range("weight_bits", self.weight_bits, 2, 8)
        check_choice("calibrator", self.calibrator, tuple(CALIBRATORS))
        check_choice("method", self.method, QAT_METHODS)
        check_range("epochs", self.epochs, 1, 10**6)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_range("calib_batches", self.calib_batches, 1, 10**6)
        for name in ("freeze_bn_step", "freeze_observers_step"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 0, 10**9)
        if self.method != "ste" and self.freeze_observers_step is not None:
            raise ValueError(f"method={self.method!r} learns its ranges ({'step sizes' if self.method == 'lsq' else 'clipping levels'}); "
                             "there is no observer to freeze: leave freeze_observers_step unset, or use method='ste'")
        self.quant_config()  # the grid settings must make a valid PTQ config too

    def quant_config(self) -> Quantize:
        """The PTQ passes of the grid this run trains for (what the result's plan records)."""
        return Quantize.of([Weights(bits=self.weight_bits, per_channel=self.per_channel, reduce_range=self.reduce_range,
                                    exclude=self.exclude),
                            Activations(calibrator=self.calibrator, percentile=self.percentile)])


QAT_PRESETS: dict[str, QATConfig] = {
    "int8": QATConfig(),
    "w4a8": QATConfig(weight_bits=4, reduce_range=False),
    "w4a8-lsq": QATConfig(weight_bits=4, reduce_range=False, method="lsq"),
    "w4a8-pact": QATConfig(weight_bits=4, reduce_range=False, method="pact"),
}


def _wrap_weighted(gm: fx.GraphModule, cfg: QATConfig, plan: QuantPlan) -> list[str]:
    """Replace each quantizable layer by a FakeQuantWeighted, absorbing the BatchNorm after it.
    Returns the names of the BatchNorm nodes taken in."""
    bits = cfg.quant_config().weights.effective_bits
    modules = dict(gm.named_modules())
    taken: list[str] = []
    bn_of = {str(src.target): (node, bn) for node, src, _, bn in batchnorm_pairs(gm)}
    for node in list(gm.graph.nodes):
        name = str(node.target)
        layer = modules.get(name) if node.op == "call_module" else None
        if not isinstance(layer, _WEIGHTED):
            continue
        if name in cfg.exclude:
            plan.skipped[name] = "excluded by config"
            continue
        bn_node, bn = bn_of.get(name, (None, None))
        try:
            wrapped = FakeQuantWeighted(layer, bn, bits, cfg.per_channel, learn_scale=cfg.method == "lsq")
        except ValueError as e:
            plan.skipped[name] = str(e)
            continue
        replace_module(gm, name, wrapped)
        if bn_node is not None:
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            taken.append(bn_node.name)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return taken


def prepare_qat(model: nn.Module, cfg: QATConfig, calib: list[Batch]) -> tuple[fx.GraphModule, QuantPlan]:
    """Trace ``model`` (owned by the caller of this function), insert fake quantization and
    calibrate the starting ranges. Returns the trainable graph and the plan being built."""
    plan = QuantPlan(config=cfg.quant_config(), passes={"qat": {"method": cfg.method}})
    try:
        gm = trace(model.eval())
    except TraceError as e:
        raise TraceError(f"quantization-aware training needs an fx-traceable model: {e}") from e
    taken = _wrap_weighted(gm, cfg, plan)
    plan.folded_bn = taken + fold_batchnorm(gm)  # excluded layers keep float weights, BatchNorm folded
    if not any(isinstance(m, FakeQuantWeighted) for m in gm.modules()):
        raise ValueError(f"no layer of {type(model).__name__} can be quantized: "
                         f"{plan.skipped or 'it has no Linear/Conv1d/Conv2d layers'}")
    plan.placement = find_placement(gm, float_tensor_nodes(gm, calib[0]))

    bounded = bounded_nodes(gm)

    def make(node_name: str) -> FakeQuantAct:  # as PTQ: min-max after a bounded clamp (ReLU6)
        opts: dict[str, Any] = {"bits": 8, "signed": False, "symmetric": False}
        method = "minmax" if node_name in bounded and cfg.calibrator in CLIPPING_CALIBRATORS else cfg.calibrator
        if method == "percentile":
            opts["percentile"] = cfg.percentile
        return FakeQuantAct(8, cfg.method, observer=make_observer(method, **opts))

    acts = insert_quantizers(gm, plan.placement, make)
    calibrate(gm, calib, acts, lambda q: q.init_from_observer())
    return gm, plan


def _when(step: int | None, total: int, default: float) -> int:
    return step if step is not None else int(total * default)


def _freeze(gm: nn.Module, batchnorm: bool, ranges: bool) -> None:
    for m in gm.modules():
        if batchnorm and isinstance(m, FakeQuantWeighted):
            m.freeze_bn()
        if ranges and isinstance(m, FakeQuantAct):
            m.freeze_observer()


def _freezer(gm: nn.Module, cfg: QATConfig) -> Callable[[int, int], None]:
    """The ``after_step`` hook freezing BatchNorm statistics and moving-average ranges."""
    def hook(step: int, total: int) -> None:
        done = step + 1
        _freeze(gm, done == _when(cfg.freeze_bn_step, total, 0.5),
                cfg.method == "ste" and done == _when(cfg.freeze_observers_step, total, 0.75))

    return hook


def convert_qat(gm: fx.GraphModule, plan: QuantPlan) -> fx.GraphModule:
    """Turn the trained fake-quant graph into the PTQ modules, in place; completes ``plan``."""
    gm.eval()
    for name, m in list(gm.named_modules()):
        if isinstance(m, (FakeQuantWeighted, FakeQuantAct)):
            replace_module(gm, name, m.to_quant())
    gm.delete_all_unused_submodules()
    gm.recompile()
    plan.quantized_layers = [n for n, m in gm.named_modules() if isinstance(m, (QuantLinear, QuantConv))]
    for name, m in gm.named_modules():
        if isinstance(m, ActQuant):
            plan.qparams_[name] = (float(m.scale), int(m.zero_point))
    _quantize_biases(gm)
    return gm


def qat(model: nn.Module, cfg: QATConfig, train_data: Iterable[Any], calib_data: Iterable[Batch] | None = None,
        inplace: bool = False, evaluate: Callable[[nn.Module], float] | None = None,
        checkpoint: str | None = None) -> nn.Module:
    """Quantization-aware training of a copy of ``model`` on ``(inputs, labels)`` batches.
    Returns the quantized model (PTQ modules, ``.slimkit_plan``), ready for ``sk.export_onnx``."""
    from slimkit.train.fit import fit  # the training loop imports distillation, which imports quant

    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"quantization-aware training trains the model, but {type(model).__name__} has no "
                         "trainable parameters (none, or all with requires_grad=False); use sk.quantize for PTQ")
    data = check_batches(train_data, "train_data")
    for i, b in enumerate(data):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"train_data: batch {i} is not an (inputs, labels) pair")
    calib = check_batches(calib_data) if calib_data is not None else [model_inputs(b) for b in data]
    calib = calib[: cfg.calib_batches]
    teacher = copy.deepcopy(model).eval() if cfg.distill else None
    target = model if inplace else copy.deepcopy(model)
    gm, plan = prepare_qat(target, cfg, calib)
    _freeze(gm, cfg.freeze_bn_step == 0, cfg.freeze_observers_step == 0)
    steps = cfg.epochs * len(data)
    log.info("QAT (%s, W%dA8): %d epochs, %d steps, lr %g", cfg.method, cfg.weight_bits, cfg.epochs, steps, cfg.lr)
    fit(gm, data, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        seed=cfg.seed, teacher=teacher, after_step=_freezer(gm, cfg), evaluate=evaluate, checkpoint=checkpoint)
    plan.passes["qat"].update({"epochs": cfg.epochs, "steps": steps, "distill": cfg.distill,
                               "batchnorm_frozen_after": _when(cfg.freeze_bn_step, steps, 0.5),
                               "ranges_frozen_after": _when(cfg.freeze_observers_step, steps, 0.75) if cfg.method == "ste" else None})
    out = convert_qat(gm, plan)
    attach(out, model, plan)
    return out

