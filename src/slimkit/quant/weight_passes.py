"""The weight passes that run on the float model before PTQ rounds it: cross-layer equalization,
AdaRound and bias correction, in that order, each optional (``QuantConfig.equalize``,
``rounding="adaround"``, ``bias_correction``).

They leave a float model whose weights already sit on the quantization grid PTQ will use (the
learned one for AdaRound, the nearest one otherwise) and whose biases absorb the expected output
shift, so the ordinary PTQ path, export and ``sk.save``/``sk.load`` need nothing new: round to
nearest reproduces exactly the integers chosen here.

Layers are visited in execution order; each one's calibration inputs are taken from the model with
the earlier layers already on their grid, so each layer corrects for the error its inputs carry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimkit.core.batch import Batch, call
from slimkit.core.graph import TraceError, fold_batchnorm, trace

from .adaround import adaround
from .awq import awq_scales
from .bias_correction import output_shift
from .config import QuantConfig
from .equalization import equalize, relu6_to_relu
from .gptq import gptq, hessian
from .modules import WEIGHTED_LAYERS as _WEIGHTED
from .modules import fake_quant_weight, weight_qparams
from .weight_only import QuantLinearNBits, dequantize_groups, rtn_groups

__all__ = ["weight_passes", "needs_weight_passes"]

log = logging.getLogger(__name__)



def needs_weight_passes(cfg: QuantConfig) -> bool:
    return cfg.equalize or cfg.bias_correction or cfg.rounding != "nearest"


def _forward(layer: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The layer as a function of (input, weight), without its bias."""
    if isinstance(layer, nn.Linear):
        return lambda x, w: F.linear(x, w)
    conv: Any = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    c: Any = layer
    return lambda x, w: conv(x, w, None, c.stride, c.padding, c.dilation, c.groups)


@torch.no_grad()
def _inputs(model: nn.Module, layer: nn.Module, batches: list[Batch]) -> list[Tensor]:
    seen: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        for b in batches:
            call(model, b)
    finally:
        handle.remove()
    return seen


def _token_rows(xs: list[Tensor], batches: list[Batch]) -> Tensor:
    """A layer's calibration inputs as rows ``[n, features]``. For tokenizer batches, the rows of
    padding positions (``attention_mask == 0``) are left out: they are not text, and padded to a
    fixed length they would outnumber the real tokens in GPTQ's Hessian and AWQ's statistics."""
    rows = []
    for x, b in zip(xs, batches, strict=True):
        mask = b.get("attention_mask") if isinstance(b, Mapping) else None
        if isinstance(mask, Tensor) and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            rows.append(x[mask.bool()])
        else:
            rows.append(x.reshape(-1, x.shape[-1]))
    return torch.cat(rows)


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


def weight_passes(model: nn.Module, cfg: QuantConfig, batches: list[Batch]) -> tuple[nn.Module, dict[str, Any]]:
    """Run the passes ``cfg`` asks for on ``model`` (owned by the caller: changed in place or
    replaced by its traced, BatchNorm-folded graph); returns the model and a summary for the plan."""
    summary: dict[str, Any] = {}
    if cfg.equalize:
        summary["relu6_replaced"] = relu6_to_relu(model)
        try:
            gm = trace(model)
        except TraceError as e:
            raise ValueError(f"cross-layer equalization needs the model's graph: {e}") from e
        summary["folded_bn"] = fold_batchnorm(gm) if cfg.fold_bn else []
        summary["equalized_pairs"] = [list(p) for p in equalize(gm)]
        model = gm
    elif cfg.fold_bn:  # the passes must see the weights PTQ will quantize: BatchNorm folded in
        try:
            gm = trace(model)
            summary["folded_bn"] = fold_batchnorm(gm)
            model = gm
        except TraceError as e:
            log.warning("%s; the weight passes see BatchNorm unfolded", e)
    if not (cfg.bias_correction or cfg.rounding != "nearest"):
        return model, summary
    modules = dict(model.named_modules())
    names = [n for n in _order(model, batches[0]) if n not in cfg.exclude]
    corrected, rounded, grouped = [], [], []
    alphas: dict[str, float] = {}
    with torch.no_grad():
        for name in tqdm(names, desc=cfg.rounding if cfg.rounding != "nearest" else "bias correction", leave=False,
                         disable=None):
            layer = modules[name]
            bits = cfg.bits_for(name)
            grid, input_scale = None, None
            if cfg.group_size is not None:  # group-wise weight-only: Linear layers whose width the groups divide
                if not isinstance(layer, nn.Linear) or layer.in_features % cfg.group_size:
                    continue
            xs = _inputs(model, layer, batches)
            fwd = _forward(layer)
            w = layer.weight.detach().clone()
            if cfg.rounding == "gptq":
                assert cfg.group_size is not None
                h = hessian(_token_rows(xs, batches))
                grid = gptq(w, h, bits, cfg.group_size, cfg.weight_symmetric, damp=cfg.gptq_damp,
                            act_order=cfg.gptq_act_order)
                wq = dequantize_groups(*grid)
                rounded.append(name)
            elif cfg.rounding == "awq":
                assert cfg.group_size is not None
                input_scale, alpha, _ = awq_scales(w, _token_rows(xs, batches), bits,
                                                   cfg.group_size, cfg.weight_symmetric)
                grid = rtn_groups(w * input_scale, bits, cfg.group_size, cfg.weight_symmetric)
                wq = dequantize_groups(*grid) / input_scale
                rounded.append(name)
                alphas[name] = alpha
            elif cfg.group_size is not None:
                grid = rtn_groups(w, bits, cfg.group_size, cfg.weight_symmetric)
                wq = dequantize_groups(*grid)
            elif cfg.rounding == "adaround":
                scale, lo, hi = weight_qparams(w, bits, cfg.per_channel)
                with torch.enable_grad():
                    wq = adaround(w, scale, lo, hi, fwd, xs, iterations=cfg.adaround_iterations, seed=0)
                rounded.append(name)
            else:
                wq = fake_quant_weight(w, bits, cfg.per_channel)
            if cfg.bias_correction:
                shift = output_shift(fwd, w, wq, xs, channel_dim=-1 if isinstance(layer, nn.Linear) else 1)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros_like(shift))
                layer.bias.sub_(shift)
                corrected.append(name)
            if grid is not None:  # the integers are chosen: the layer becomes the packed 4-bit one now
                assert cfg.group_size is not None and isinstance(layer, nn.Linear)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        QuantLinearNBits(layer, bits, cfg.group_size, cfg.weight_symmetric, grid=grid,
                                         input_scale=input_scale))
                grouped.append(name)
            else:
                layer.weight.copy_(wq)  # on the grid: later layers see quantized weights before them
    if cfg.rounding != "nearest":
        summary[{"adaround": "adarounded"}.get(cfg.rounding, cfg.rounding)] = rounded
    if alphas:
        summary["awq_alpha"] = alphas
    summary["bias_corrected"] = corrected
    log.info("weight passes: %d layers rounded by %s, %d biases corrected, %d grouped", len(rounded), cfg.rounding,
             len(corrected), len(grouped))
    return model, summary
