"""Post-training quantization: build the plan from calibration data, then apply it.

The plan (``QuantPlan``) is plain data: the config, where the activation quantizers sit, their
fitted scales and zero-points, and which layers were quantized or skipped (and why). Applying a
plan to a freshly built base model is deterministic and needs no data, which is how ``sk.load``
rebuilds a quantized model without unpickling anything.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn

from slimkit.core.batch import Batch, cache_free, call_checked, check_batches, modes_kept
from slimkit.core.config import register
from slimkit.core.fidelity import check_fidelity, coverage
from slimkit.core.graph import TraceError, float_tensor_nodes, fold_batchnorm, trace
from slimkit.core.held import graph_of, hold_graph
from slimkit.core.layers import canonicalize, restore
from slimkit.core.plans import attach, register_plan
from slimkit.core.progress import progress
from slimkit.quant.calibrators import make_observer
from slimkit.quant.config import QuantConfig, resolve_int8_layers
from slimkit.quant.equalization import relu6_to_relu
from slimkit.quant.half import to_half
from slimkit.quant.modules import ActQuant, QuantConv, QuantLinear
from slimkit.quant.passes import (
    Activations,
    BiasCorrection,
    Equalize,
    HalfPrecision,
    Quantize,
    handler_of,
)
from slimkit.quant.placement import Placement, bounded_nodes, find_placement, insert_quantizers
from slimkit.quant.swap import quantize_held, swap_weighted
from slimkit.quant.weight_passes import needs_weight_passes, weight_passes

__all__ = ["QuantPlan", "quantize_ptq", "apply_plan"]

log = logging.getLogger(__name__)



@dataclass
class QuantPlan:
    """What PTQ decided. ``qparams_`` are fitted from data (scikit-learn's trailing underscore)."""

    kind = "quant"

    config: Quantize
    mode: str = "graph"  # "graph" (fx) or "module" (fallback for models fx cannot trace)
    placement: Placement = field(default_factory=Placement)
    qparams_: dict[str, tuple[float, int]] = field(default_factory=dict)
    quantized_layers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    passes: dict[str, Any] = field(default_factory=dict)  # what equalization / AdaRound / bias correction did
    coverage_: dict[str, Any] = field(default_factory=dict)  # share of the weights quantized, what was left alone
    fidelity_: dict[str, float] = field(default_factory=dict)  # output vs the float model on the first batch

    def summary(self) -> str:
        """What was quantized and what was left alone, with the reasons, as a markdown table."""
        c = self.coverage_
        head = [f"quantized {len(self.quantized_layers)} layers, {c.get('fraction', 0.0):.1%} of the weights"
                + (f"; output on the first batch: relative L2 {self.fidelity_['relative_l2']:.3g}, "
                   f"cosine {self.fidelity_['cosine']:.4f}" if self.fidelity_ else "")]
        alone = c.get("left_alone", self.skipped)
        if not alone:
            return head[0] + "; no weight-holding layer left alone"
        return "\n".join(head + ["", "| left alone | why |", "|---|---|"] + [f"| {n} | {why} |" for n, why in alone.items()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "quant",
            "config": self.config.to_dict(),
            "mode": self.mode,
            "placement": self.placement.to_dict(),
            "qparams": {k: [s, z] for k, (s, z) in self.qparams_.items()},
            "quantized_layers": self.quantized_layers,
            "skipped": self.skipped,
            "folded_bn": self.folded_bn,
            "passes": self.passes,
            "coverage": self.coverage_,
            "fidelity": self.fidelity_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantPlan:
        config = d["config"]  # plans saved before the passes recorded the flat QuantConfig: translated
        return cls(
            config=Quantize.from_dict(config) if "passes" in config else QuantConfig.from_dict(config).to_passes(),
            mode=d["mode"],
            placement=Placement.from_dict(d["placement"]),
            qparams_={k: (float(v[0]), int(v[1])) for k, v in d["qparams"].items()},
            quantized_layers=list(d["quantized_layers"]),
            skipped=dict(d["skipped"]),
            folded_bn=list(d["folded_bn"]),
            passes=dict(d.get("passes", {})),
            coverage_=dict(d.get("coverage", {})),
            fidelity_=dict(d.get("fidelity", {})),
        )


def _observer_factory(cfg: Activations) -> Any:
    """Observers by ``cfg.calibrator``, except after a clamp with known bounds (ReLU6): min-max there,
    since clipping a bounded activation can only lose its saturated values (the KL search clipped the
    digits MobileNetV2's ReLU6 outputs at 1.6 and took its SQNR from 35 to 10 dB)."""
    def make(node_name: str, bounded: bool = False) -> ActQuant:
        # a range symmetric about zero: its largest magnitude sets the FP8 scale, or TensorRT's int8 one
        sym = cfg.format != "int" or cfg.placement == "tensorrt"
        opts: dict[str, Any] = {"bits": cfg.bits, "signed": sym, "symmetric": sym}
        method = "minmax" if bounded and cfg.calibrator in CLIPPING_CALIBRATORS else cfg.calibrator
        if method == "percentile":
            opts["percentile"] = cfg.percentile
        return ActQuant(cfg.bits, signed=_signed(cfg), observer=make_observer(method, **opts), fmt=cfg.format)

    return make


CLIPPING_CALIBRATORS = ("percentile", "entropy", "mse")


def _frozen_factory(cfg: Activations) -> Any:
    return lambda node_name, bounded=False: ActQuant(cfg.bits, signed=_signed(cfg), fmt=cfg.format)


def _signed(cfg: Activations) -> bool:
    """int8 activations (TensorRT's symmetric ones), else uint8 (ONNX Runtime's CPU kernels)."""
    return cfg.placement == "tensorrt" and cfg.format == "int"


def _prepare(model: nn.Module, plan: QuantPlan, make: Any, example: Batch | None,
             user: nn.Module | None = None) -> nn.Module:
    """Fold, swap and place quantizers on a copy-owned ``model``; fills ``plan`` when it is new.
    A traced model's graph is run by ``user`` (the copy-owned model of the user's class that
    ``model`` was made from, when the weight passes traced it; ``model`` itself by default)."""
    cfg = plan.config
    if cfg.find(Equalize) is not None:  # structural, so a saved plan replays it on a fresh base model
        relu6_to_relu(model)
    if cfg.activations.mode != "static":
        plan.mode = "module"
        if user is None or user is model or not isinstance(model, fx.GraphModule):
            swap_weighted(model, cfg, plan)
            return model
        swap_weighted(model, cfg, plan, held=False)  # the weight passes traced it: the user's model runs it
        out = hold_graph(user, model)
        quantize_held(out, cfg, plan)
        return out
    if plan.mode == "graph":
        try:
            gm = trace(model)
        except TraceError as e:
            log.warning("%s; falling back to module-level quantization of Linear/Conv "
                        "(BatchNorm not folded, activations quantized at layer inputs only)", e)
            plan.mode = "module"
    if plan.mode == "module":
        return _prepare_module_level(model, plan, make)
    if cfg.weights.fold_bn:
        plan.folded_bn = fold_batchnorm(gm) or list(plan.passes.get("folded_bn", []))
    swap_weighted(gm, cfg, plan, held=False)
    gm.recompile()
    if example is not None:
        plan.placement = find_placement(gm, float_tensor_nodes(gm, example))
    bounded = bounded_nodes(gm)
    insert_quantizers(gm, plan.placement, lambda name: make(name, name in bounded))
    # the user's model runs the graph: its class, methods and containers stay (core/held.py)
    held = hold_graph(user if user is not None else model, gm)
    quantize_held(held, cfg, plan)  # read by the graph through the model's own modules
    return held


def _prepare_module_level(model: nn.Module, plan: QuantPlan, make: Any) -> nn.Module:
    """Module-level fallback: each quantized layer quantizes its own input (``input_quant``)."""
    swap_weighted(model, plan.config, plan)
    for name, m in list(model.named_modules()):
        if isinstance(m, (QuantLinear, QuantConv)) and not m.dynamic:
            m.input_quant = make(name)
    return model


def _act_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}


def _quantize_biases(model: nn.Module, cfg: Quantize | None = None) -> None:
    """Give each static quantized layer fed by a quantizer an int32 bias at scale s_x * s_w (TensorRT's
    placement keeps float biases: TensorRT quantizes them itself when it fuses)."""
    if cfg is not None and cfg.activations.placement == "tensorrt":
        return
    graph = graph_of(model)
    if graph is not None:
        modules = dict(model.named_modules())
        for node in graph.nodes:
            layer = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(layer, (QuantLinear, QuantConv)) and not layer.dynamic:
                src = node.args[0]
                quant = modules.get(str(src.target)) if isinstance(src, fx.Node) and src.op == "call_module" else None
                if isinstance(quant, ActQuant):
                    layer.quantize_bias(quant.scale)
    for m in model.modules():  # module-level: the layer's own input quantizer
        quant = m._modules.get("input_quant")
        if isinstance(m, (QuantLinear, QuantConv)) and isinstance(quant, ActQuant):
            m.quantize_bias(quant.scale)


def quantize_ptq(model: nn.Module, cfg: Quantize, calib_data: Any = None,
                 inplace: bool = False) -> nn.Module:
    """Quantize ``model`` after training with the passes of ``cfg``. Returns the quantized model
    with ``.slimkit_plan``. A search pass (``KeepFloat``, ``MixedPrecision``) quantizes with the
    others several times and keeps its choice; ``Equalize`` with data is kept only where it helps."""
    from slimkit.quant import choose  # the passes that measure to choose call back here

    half = cfg.find(HalfPrecision)
    if half is not None:
        return quantize_half(model, cfg, half, calib_data, inplace)
    cfg = resolve_int8_layers(model, cfg)  # "first", "last", "depthwise": names, in the plan's passes
    for p in cfg.of_stage("search"):
        return cast(nn.Module, handler_of(p)(model, cfg, p, calib_data, inplace))
    if cfg.find(Equalize) is not None and calib_data is not None:
        return choose.equalization(model, cfg, calib_data)
    bc = cfg.find(BiasCorrection)
    if bc is not None and bc.compares() and calib_data is not None and not inplace:
        return choose.quantize_compared(model, cfg, choose._data(calib_data, cfg))
    return quantize_fixed(model, cfg, calib_data, inplace)


def quantize_half(model: nn.Module, cfg: Quantize, half: HalfPrecision, calib_data: Any = None,
                  inplace: bool = False) -> nn.Module:
    """``HalfPrecision``: the model cast (``half.py``); the plan lists the modules cast and those
    kept in FP32, and, given ``calib_data``, the fidelity on its first batch."""
    batch = None
    if calib_data is not None:
        batch = cache_free(model, check_batches(calib_data)[0])
        with torch.no_grad(), modes_kept(model):
            call_checked(model.eval(), batch, "calib_data batch 0")
    out, cast_, kept = to_half(model.eval() if inplace else model, half.dtype, half.compute, half.keep_float, inplace)
    out.eval()
    plan = QuantPlan(config=cfg, mode="module", quantized_layers=cast_, skipped=dict(kept))
    _report(model, out, plan, batch, inplace)
    attach(out, model, plan)
    log.info("%s (%s arithmetic): %d modules cast, %d kept in float32", half.dtype,
             "16-bit" if half.compute == "half" else "float32", len(cast_), len(kept))
    return out


def quantize_fixed(model: nn.Module, cfg: Quantize, calib_data: Any = None, inplace: bool = False) -> nn.Module:
    """Quantize with exactly ``cfg``: no pass that measures to choose (``choose``) runs here."""
    if calib_data is not None:  # a batch the model cannot take: say so before anything is built
        calib_data = check_batches(calib_data)  # once: it may be an iterator
        with torch.no_grad(), modes_kept(model):
            call_checked(model.eval(), cache_free(model, calib_data[0]), "calib_data batch 0")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    canonicalize(target)  # Hugging Face's Conv1D as the Linear it is, while the passes work
    plan = QuantPlan(config=cfg)
    mode = cfg.activations.mode
    user = target  # the weight passes may trace it; the result keeps its class (core/held.py)
    if needs_weight_passes(cfg):
        wanted = cfg.wants_data()
        if calib_data is None and wanted:
            raise ValueError(f"calib_data is required but none was given: {', '.join(wanted)} need calib_data, "
                             "batches of the model's inputs")
        passes_data = [cache_free(model, b) for b in check_batches(calib_data)] if calib_data is not None else []
        if cfg.calib_batches is not None:
            passes_data = passes_data[: cfg.calib_batches]
        target, plan.passes = weight_passes(target, cfg, passes_data)
    if mode != "static":
        if calib_data is not None and not needs_weight_passes(cfg):
            log.info("%s quantization needs no calibration data; ignoring calib_data", mode)
        out = _prepare(target, plan, None, None, user)
        restore(out)
        _report(model, out, plan, cache_free(model, check_batches(calib_data)[0]) if calib_data is not None else None,
                inplace)
        attach(out, model, plan)
        return out
    if calib_data is None:
        raise ValueError("calib_data is required but none was given: Activations(mode='static') need calib_data, "
                         "batches of the model's inputs (Activations(mode='dynamic') needs none)")
    batches = [cache_free(model, b) for b in check_batches(calib_data)]
    if cfg.calib_batches is not None:
        batches = batches[: cfg.calib_batches]
    out = _prepare(target, plan, _observer_factory(cfg.activations), batches[0], user)
    quantizers = _act_quantizers(out)
    if not quantizers:
        raise ValueError(f"no layer of {type(model).__name__} could be quantized: {plan.skipped or 'no Linear/Conv layers'}")
    calibrate(out, batches, quantizers, lambda q: q.freeze())
    for name, q in quantizers.items():
        plan.qparams_[name] = (float(q.scale), int(q.zero_point))
    _quantize_biases(out, cfg)
    restore(out)
    _report(model, out, plan, batches[0], inplace)
    attach(out, model, plan)
    log.info("quantized %d layers, %d activation quantizers, %d kept in float",
             len(plan.quantized_layers), len(quantizers), len(plan.skipped))
    return out


def _report(model: nn.Module, out: nn.Module, plan: QuantPlan, batch: Batch | None, inplace: bool) -> None:
    """Fill the plan's coverage and, given a batch (and the float model, when not ``inplace``), its
    fidelity; raises ``FidelityError`` when the output departs far beyond quantization noise."""
    cfg = plan.config
    if not plan.quantized_layers and (not plan.skipped or any(w != "excluded by config" for w in plan.skipped.values())):
        reasons = "; ".join(f"{n}: {why}" for n, why in list(plan.skipped.items())[:3]) or \
            "it has no Linear, Conv1d/Conv2d or Embedding layer"
        raise ValueError(f"no layer of {type(model).__name__} could be quantized with this config ({reasons})")
    plan.coverage_ = coverage(out if inplace else model, plan.quantized_layers, plan.skipped)
    fraction = plan.coverage_["fraction"]
    if fraction < 0.5:
        alone = sorted(plan.coverage_["left_alone"].items(), key=lambda kv: kv[0])[:3]
        log.warning("quantized only %.0f%% of the weights of %s; left alone: %s%s", 100 * fraction,
                    type(model).__name__, "; ".join(f"{n} ({why})" for n, why in alone),
                    " ..." if len(plan.coverage_["left_alone"]) > 3 else "")
    if batch is not None and not inplace:
        # FP8 counts as narrow: E4M3 carries 4 significant bits (E5M2 3), an INT4's relative precision, and a
        # random-weight MobileNetV2 reaches a relative error of 0.93 at E4M3 (ONNX Runtime's own FP8
        # quantizer: cosine 0.10 against slimkit's 0.74, benchmarks/arch_coverage.py)
        narrow = min([cfg.weights.bits, *cfg.weights.layer_bits.values()]) < 8 or cfg.activations.bits < 8 \
            or cfg.weights.format != "int" or cfg.activations.format != "int"
        # 0.7 at 8 bits: a random-weight MobileNetV2 (17 depthwise blocks, ReLU6 saturating) reaches 0.53 at
        # int8 as its honest rounding noise, while a layer that computes something else gives ~1 or more
        plan.fidelity_ = check_fidelity(model, out, batch, 1.0 if narrow else 0.7, "quantization")


def calibrate(model: nn.Module, batches: list[Batch], quantizers: Mapping[str, nn.Module],
              finish: Callable[[Any], None]) -> None:
    """Run the calibration batches through ``model`` (its quantizers observing), then ``finish``
    each quantizer (fix its range); errors name the batch or the quantizer at fault."""
    with torch.no_grad():
        for i, batch in enumerate(progress(batches, desc="calibrating")):
            call_checked(model, batch, f"calibration batch {i} (while observing activations)")
    for name, q in quantizers.items():
        try:
            finish(q)
        except ValueError as e:
            raise ValueError(f"activation quantizer {name!r}: {e}") from e


def apply_plan(base: nn.Module, plan: QuantPlan) -> nn.Module:
    """Rebuild the quantized model from a freshly built ``base`` and a saved plan, without data.
    Weights are then loaded from the saved state dict by the caller."""
    half = plan.config.find(HalfPrecision)
    if half is not None:  # deterministic: the cast again, then the caller loads the saved weights
        out, _, _ = to_half(base, half.dtype, half.compute, half.keep_float)
        attach(out.eval(), base, plan)
        return out
    model = copy.deepcopy(base).eval()
    canonicalize(model)
    saved = QuantPlan(config=plan.config, mode=plan.mode, placement=plan.placement)
    out = _prepare(model, saved, _frozen_factory(plan.config.activations), None)
    quantizers = _act_quantizers(out)
    if set(quantizers) != set(plan.qparams_):
        diff = set(quantizers) ^ set(plan.qparams_)
        raise ValueError(f"the plan does not match this base model: quantizers differ ({sorted(diff)[:5]})")
    if set(saved.quantized_layers) != set(plan.quantized_layers):
        raise ValueError("the plan does not match this base model: its quantized layers differ "
                         f"(plan: {plan.quantized_layers[:5]}..., model: {saved.quantized_layers[:5]}...)")
    for name, (s, z) in plan.qparams_.items():
        quantizers[name].set_qparams(torch.tensor(s), torch.tensor(z))
    _quantize_biases(out, plan.config)
    restore(out)
    attach(out, base, plan)
    return out


@register(Quantize)
def _handle(model: nn.Module, cfg: Quantize, calib_data: Any = None, inplace: bool = False) -> nn.Module:
    return quantize_ptq(model, cfg, calib_data, inplace)


@register(QuantConfig)
def _handle_legacy(model: nn.Module, cfg: QuantConfig, calib_data: Any = None, inplace: bool = False) -> nn.Module:
    return quantize_ptq(model, cfg.to_passes(), calib_data, inplace)



register_plan("quant", "quantization", QuantPlan.from_dict, apply_plan)
