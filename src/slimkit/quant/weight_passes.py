"""The passes that run on the float model before PTQ rounds it, and their handlers: the model
passes (``Equalize``, ``SmoothQuant``, ``OutlierChannels``) in the order the list gives them, then
one sweep over the layers in which the rounding pass (``GPTQ``, ``AWQ``, ``AdaRound``, or round to
nearest on the ``Weights`` grid) chooses each layer's integers and the layer passes
(``BiasCorrection``) correct it. Each pass's handler is registered with ``@pass_handler``.

They leave a float model whose weights already sit on the quantization grid PTQ will use (the
learned one for AdaRound, the nearest one otherwise) and whose biases absorb the expected output
shift, so the ordinary PTQ path, export and ``sk.save``/``sk.load`` need nothing new: round to
nearest reproduces exactly the integers chosen here.

Layers are visited in execution order; each one's calibration inputs are taken from the model with
the earlier layers already on their grid, so each layer corrects for the error its inputs carry.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.batch import Batch, call
from slimkit.core.dropin import replace_module
from slimkit.core.graph import TraceError, fold_batchnorm, trace
from slimkit.core.progress import progress

from .adaround import adaround
from .awq import awq_clip, awq_scales
from .bias_correction import output_shift, output_shift_from_float
from .clipping import mse_weight_scale, output_clip_scale
from .equalization import equalize, relu6_to_relu
from .gptq import gptq, hessian
from .modules import WEIGHTED_LAYERS as _WEIGHTED
from .modules import fake_quant_weight, weight_qparams
from .nf4 import QuantLinearNF4, dequantize_nf4, nf4_groups
from .passes import (
    AWQ,
    GPTQ,
    AdaRound,
    BiasCorrection,
    Equalize,
    OutlierChannels,
    Quantize,
    QuantPass,
    SmoothQuant,
    Weights,
    handler_of,
    pass_handler,
)
from .patches import conv_patches
from .sequential import sequential_inputs, token_rows
from .smoothing import smooth
from .weight_only import QuantLinearNBits, dequantize_groups, quantize_groups, rtn_groups

__all__ = ["weight_passes", "needs_weight_passes", "smooth", "Job", "Layer"]

log = logging.getLogger(__name__)



def needs_weight_passes(q: Quantize) -> bool:
    return bool(q.of_stage("model", "rounding", "layer")) or q.weights.grid != "max"


@dataclass
class Job:
    """What the model and layer passes share: the model being quantized (owned: changed in place,
    or replaced by its traced graph), the list, the calibration batches and the plan's summary."""

    model: nn.Module
    q: Quantize
    batches: list[Batch]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Layer:
    """One layer in the sweep: its float weight ``w``, its calibration inputs ``xs`` and its width;
    the rounding pass sets ``wq`` (the weight on its grid) and, for group-wise layers, ``grid`` (the
    integers, scales, zero-points) and ``input_scale`` (AWQ), or ``nf4`` (NF4 codes and absmax)."""

    name: str
    module: nn.Linear | nn.Conv1d | nn.Conv2d
    w: Tensor
    xs: list[Tensor]
    bits: int
    xs_float: list[Tensor] | None = None  # its inputs on the float model, for passes that ask
    wq: Tensor | None = None
    grid: tuple[Tensor, Tensor, Tensor] | None = None
    input_scale: Tensor | None = None
    nf4: tuple[Tensor, Tensor] | None = None


@pass_handler(SmoothQuant)
@pass_handler(OutlierChannels)
def _smooth_pass(job: Job, cfg: QuantPass) -> None:
    if isinstance(cfg, OutlierChannels) and job.q.find(SmoothQuant) is not None:
        return  # decided together with SmoothQuant, when its turn comes
    job.summary.update(smooth(job.model, job.q, job.batches))


def _grid(layer: nn.Module, w: Tensor, bits: int, cfg: Weights, xs: list[Tensor]) -> tuple[Tensor, int, int]:
    """The weight grid ``cfg.grid`` asks for (``clipping.py``): the largest magnitude's, the
    clipping with the least squared error in the weights, or the one with the least error in the
    layer's output on its inputs ``xs`` (convs on sampled positions)."""
    if cfg.grid == "max":
        return weight_qparams(w, bits, cfg.per_channel)
    if cfg.grid == "mse":
        return mse_weight_scale(w, bits, cfg.per_channel)
    fast = conv_patches(layer, xs[:4], per_image=64, seed=1) if isinstance(layer, nn.Conv2d) else None
    fwd, inputs, dim = (*fast, -1) if fast else (_forward(layer), xs[:4], -1 if isinstance(layer, nn.Linear) else 1)
    return output_clip_scale(w, bits, cfg.per_channel, fwd, inputs, dim)


def _on_grid(layer: nn.Module, w: Tensor, bits: int, cfg: Weights, xs: list[Tensor]) -> Tensor:
    """Round to nearest on ``_grid`` (``fake_quant_weight`` on the max grid)."""
    if cfg.grid == "max":
        return fake_quant_weight(w, bits, cfg.per_channel)
    scale, lo, hi = _grid(layer, w, bits, cfg, xs)
    return torch.clamp(torch.round(w / _along(scale, w)), lo, hi) * _along(scale, w)


def _along(scale: Tensor, w: Tensor) -> Tensor:
    return scale.reshape([-1] + [1] * (w.dim() - 1))


def _forward(layer: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The layer as a function of (input, weight), without its bias."""
    if isinstance(layer, nn.Linear):
        return lambda x, w: F.linear(x, w)
    conv: Any = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    c: Any = layer
    return lambda x, w: conv(x, w, None, c.stride, c.padding, c.dilation, c.groups)


def _warn_unmasked(batches: list[Batch]) -> None:
    for i, b in enumerate(batches):
        if isinstance(b, Mapping) and "input_ids" in b and "attention_mask" not in b:
            log.warning("calibration batch %d has input_ids but no attention_mask: any padding in it counts as "
                        "text in the statistics (pass the tokenizer's attention_mask)", i)
            return


def _order(model: nn.Module, batch: Batch) -> list[str]:
    """Weighted layers in the order the forward pass runs them."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(partial(lambda n, *a: order.append(n), name))
               for name, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    try:
        with torch.no_grad():
            call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


@pass_handler(Equalize)
def _equalize_pass(job: Job, cfg: Equalize) -> None:
    job.summary["relu6_replaced"] = relu6_to_relu(job.model)
    try:
        gm = trace(job.model)
    except TraceError as e:
        raise ValueError(f"cross-layer equalization needs the model's graph: {e}") from e
    job.summary["folded_bn"] = fold_batchnorm(gm) if job.q.weights.fold_bn else []
    job.summary["equalized_pairs"] = [list(p) for p in equalize(gm)]
    job.model = gm


def _nearest(job: Job, layer: Layer) -> None:
    """Without a rounding pass: round to nearest on the ``Weights`` grid (per group, or per channel;
    ``format="nf4"``: the nearest NF4 code per group)."""
    weights = job.q.weights
    if weights.format == "nf4":
        assert weights.group_size is not None
        layer.nf4 = nf4_groups(layer.w, weights.group_size)
        layer.wq = dequantize_nf4(*layer.nf4) if job.q.of_stage("layer") else None
    elif weights.group_size is not None:
        layer.grid = rtn_groups(layer.w, layer.bits, weights.group_size, weights.symmetric)
        layer.wq = dequantize_groups(*layer.grid) if job.q.of_stage("layer") else None
    else:
        layer.wq = _on_grid(layer.module, layer.w, layer.bits, weights, layer.xs)


@pass_handler(GPTQ)
def _gptq_pass(job: Job, cfg: GPTQ, layer: Layer) -> None:
    weights = job.q.weights
    assert weights.group_size is not None
    layer.grid = gptq(layer.w, hessian(token_rows(layer.xs, job.batches)), layer.bits, weights.group_size,
                      weights.symmetric, damp=cfg.damp, act_order=cfg.act_order, overwrite=True)
    # the float weights on the grid, for a layer pass after (a whole copy: an output head's is large)
    layer.wq = dequantize_groups(*layer.grid) if job.q.of_stage("layer") else None
    job.summary.setdefault("gptq", []).append(layer.name)


@pass_handler(AWQ)
def _awq_pass(job: Job, cfg: AWQ, layer: Layer) -> None:
    weights = job.q.weights
    assert weights.group_size is not None
    rows = token_rows(layer.xs, job.batches)
    input_scale, alpha, _ = awq_scales(layer.w, rows, layer.bits, weights.group_size, weights.symmetric)
    ws = layer.w * input_scale
    if cfg.clip:
        scale, zp = awq_clip(ws, rows / input_scale, layer.bits, weights.group_size, weights.symmetric)
        layer.grid = (quantize_groups(ws, scale, zp, layer.bits), scale, zp)
    else:
        layer.grid = rtn_groups(ws, layer.bits, weights.group_size, weights.symmetric)
    layer.wq = dequantize_groups(*layer.grid) / input_scale if job.q.of_stage("layer") else None
    layer.input_scale = input_scale
    job.summary.setdefault("awq", []).append(layer.name)
    job.summary.setdefault("awq_alpha", {})[layer.name] = alpha


@pass_handler(AdaRound)
def _adaround_pass(job: Job, cfg: AdaRound, layer: Layer) -> None:
    scale, lo, hi = _grid(layer.module, layer.w, layer.bits, job.q.weights, layer.xs)
    # a conv's loss on sampled output positions, as products of its input patches (patches.py)
    fast = conv_patches(layer.module, layer.xs, seed=0) if isinstance(layer.module, nn.Conv2d) else None
    forward, inputs = fast if fast is not None else (_forward(layer.module), layer.xs)
    targets = None
    if cfg.asymmetric:  # the same positions (same seed, same shapes) sampled from the float model's inputs
        assert layer.xs_float is not None
        fast_float = conv_patches(layer.module, layer.xs_float, seed=0) if fast is not None else None
        targets = fast_float[1] if fast_float is not None else layer.xs_float
    with torch.enable_grad():
        layer.wq = adaround(layer.w, scale, lo, hi, forward, inputs, iterations=cfg.iterations, seed=0,
                            target_inputs=targets)
    job.summary.setdefault("adarounded", []).append(layer.name)


@pass_handler(BiasCorrection)
def _bias_correction_pass(job: Job, cfg: BiasCorrection, layer: Layer) -> None:
    assert layer.wq is not None
    m = layer.module
    dim = -1 if isinstance(m, nn.Linear) else 1
    if cfg.from_float:
        assert layer.xs_float is not None
        shift = output_shift_from_float(_forward(m), layer.w, layer.wq, layer.xs, layer.xs_float, channel_dim=dim)
    else:
        shift = output_shift(_forward(m), layer.w, layer.wq, layer.xs, channel_dim=dim)
    if m.bias is None:
        m.bias = nn.Parameter(torch.zeros_like(shift))
    m.bias.sub_(shift)
    job.summary["bias_corrected"].append(layer.name)


def weight_passes(model: nn.Module, q: Quantize, batches: list[Batch]) -> tuple[nn.Module, dict[str, Any]]:
    """Run the model passes of ``q`` in order on ``model`` (owned by the caller: changed in place or
    replaced by its traced, BatchNorm-folded graph), then the layer sweep; returns the model and a
    summary for the plan."""
    _warn_unmasked(batches)
    job = Job(model, q, batches)
    weights = q.weights
    if q.find(Equalize) is None and weights.fold_bn and q.activations.mode == "static":
        try:  # the weights PTQ will quantize: BatchNorm folded in (Equalize folds them itself)
            gm = trace(job.model)
            job.summary["folded_bn"] = fold_batchnorm(gm)
            job.model = gm
        except TraceError as e:
            log.warning("%s; the weight passes see BatchNorm unfolded", e)
    for p in q.of_stage("model"):
        handler_of(p)(job, p)
    rounding, layer_passes = q.rounding, q.of_stage("layer")
    model = job.model
    if weights.grid == "mse" and rounding is None and not layer_passes:
        with torch.no_grad():  # the weights' own error: no data needed
            for name, m in model.named_modules():
                if isinstance(m, _WEIGHTED) and name not in weights.exclude:
                    m.weight.copy_(_on_grid(m, m.weight.detach(), weights.bits_for(name, m), weights, []))
                    job.summary.setdefault("clipped_grid", []).append(name)
        return model, job.summary
    if rounding is None and not layer_passes and weights.grid == "max":
        return model, job.summary
    modules = dict(model.named_modules())

    def takes(n: str) -> bool:  # group-wise weight-only: Linear layers whose width the groups divide
        m = modules[n]
        return weights.group_size is None or isinstance(m, nn.Linear) and m.in_features % weights.group_size == 0

    names = [n for n in _order(model, batches[0]) if n not in weights.exclude and takes(n)]
    job.summary["bias_corrected"] = []
    if rounding is not None:
        job.summary[{"adaround": "adarounded"}.get(rounding.name, rounding.name)] = []
    clipped, grouped = [], []
    # passes that reconstruct the float model's own outputs get each layer's inputs on it too: a
    # float copy walked in step with the model being rounded
    float_walk = sequential_inputs(copy.deepcopy(model), names, batches) \
        if any(p.wants_float_inputs() for p in [*([rounding] if rounding else []), *layer_passes]) else None
    with torch.no_grad():
        for name, xs in progress(sequential_inputs(model, names, batches), total=len(names),
                                 desc=rounding.name if rounding is not None else "bias correction"):
            module = cast(nn.Linear | nn.Conv1d | nn.Conv2d, model.get_submodule(name))
            # a group-wise layer is replaced, never changed in place: its weight needs no copy
            w = module.weight.detach()
            layer = Layer(name, module, w if weights.group_size is not None else w.clone(), xs,
                          weights.bits_for(name, module))
            if float_walk is not None:
                float_name, layer.xs_float = next(float_walk)
                assert float_name == name
            if rounding is not None:
                handler_of(rounding)(job, rounding, layer)
            else:
                _nearest(job, layer)
            if weights.grid != "max" and weights.group_size is None:
                clipped.append(name)
            for p in layer_passes:
                handler_of(p)(job, p, layer)
            if layer.grid is not None:  # the integers are chosen: the layer becomes the packed 4-bit one now
                assert weights.group_size is not None and isinstance(module, nn.Linear)
                replace_module(model, name, QuantLinearNBits(module, layer.bits, weights.group_size, weights.symmetric,
                                                             grid=layer.grid, input_scale=layer.input_scale))
                grouped.append(name)
            elif layer.nf4 is not None:  # NF4 codes: the packed layer, its bias as the layer passes left it
                assert weights.group_size is not None and isinstance(module, nn.Linear)
                replace_module(model, name, QuantLinearNF4(module, weights.group_size, grid=layer.nf4))
                grouped.append(name)
            else:
                assert layer.wq is not None
                module.weight.copy_(layer.wq)  # on the grid: later layers see quantized weights before them
    if clipped:
        job.summary["clipped_grid"] = clipped
    log.info("weight passes: %d layers rounded by %s, %d biases corrected, %d grouped",
             len(job.summary.get({"adaround": "adarounded"}.get(rounding.name, rounding.name), []) if rounding else []),
             rounding.name if rounding is not None else "nearest", len(job.summary["bias_corrected"]), len(grouped))
    return model, job.summary
