"""SmoothQuant and outlier channels as one model pass (``smooth``): the Linear layers that read an
input with outlier channels take those channels out of the INT8 product (``quant/llm_int8.py``),
and with ``SmoothQuant`` the layers whose simulated INT8 error drops get a per-channel input scale
(``quant/smoothquant.py``). Layers that read the same input share one decision.
"""

from __future__ import annotations

import logging
import math
import weakref
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, call
from slimkit.core.dropin import replace_module
from slimkit.core.progress import progress

from .llm_int8 import outlier_channels
from .modules import QuantLinear
from .passes import OutlierChannels, Quantize, SmoothQuant
from .sequential import sequential_inputs, token_rows
from .smoothquant import smooth_search

__all__ = ["smooth", "shared_inputs"]

log = logging.getLogger(__name__)


@torch.no_grad()
def shared_inputs(model: nn.Module, names: list[str], batch: Batch) -> list[list[str]]:
    """The layers of ``names`` grouped by the input tensor they read (a transformer's query, key
    and value), in the order the forward pass on ``batch`` first calls them. Inputs are held by weak
    reference only: the pass keeps no activations alive, and a freed tensor's memory reused by a
    later one cannot pass for it."""
    groups: list[list[str]] = []
    live: list[tuple[weakref.ref[Tensor], list[str]]] = []
    placed: set[str] = set()

    def hook(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        if name in placed:
            return
        placed.add(name)
        x = args[0]
        live[:] = [(r, g) for r, g in live if r() is not None]
        group = next((g for r, g in live if r() is x), None)
        if group is None:
            groups.append(group := [])
            live.append((weakref.ref(x), group))
        group.append(name)

    handles = [model.get_submodule(n).register_forward_pre_hook(partial(hook, n)) for n in names]
    try:
        call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return groups


@torch.no_grad()
def smooth(model: nn.Module, q: Quantize, batches: list[Batch]) -> dict[str, Any]:
    """SmoothQuant and outlier channels, the passes that make dynamic ``QuantLinear`` layers before
    PTQ. The Linear layers (not excluded) with outlier input channels (``OutlierChannels``,
    ``quant/llm_int8.py``) take them out of the INT8 product; then, with ``SmoothQuant``, those
    whose simulated INT8 output error drops with smoothing (outlier channels left out) get their
    ``input_scale``. Layers reading the same input share one scale and one outlier set, so that ONNX
    Runtime divides and quantizes that input once. Returns the plan's entries: per layer, whether
    it was smoothed and its group's output SQNR without and with (``"smoothquant"``), the float
    channels of each layer that keeps some (``"outlier_channels"``: those that divide the INT8
    product's error by at least ``OutlierChannels.min_gain``), and every candidate set with that ratio
    (``"outlier_candidates"``).

    The inputs come from the layer-by-layer driver (``sequential.py``), one block of the model's
    stack at a time, so memory holds one block's calibration inputs rather than every layer's."""
    sq: SmoothQuant | None = q.find(SmoothQuant)
    oc: OutlierChannels | None = q.find(OutlierChannels)
    cfg = q.weights
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in cfg.exclude]
    groups = {g[0]: g for g in shared_inputs(model, linear, batches[0])}  # in the order they run
    report: dict[str, Any] = {}
    split: dict[str, list[int]] = {}
    candidates: dict[str, dict[str, Any]] = {}
    chosen: list[tuple[list[str], Tensor | None, Tensor | None]] = []
    # One block's inputs at a time, from the layer-by-layer driver. The layers are replaced only at
    # the end, so every group is calibrated on the float model's activations, as the paper does.
    for leader, calls in progress(sequential_inputs(model, list(groups), batches, frozen=True),
                                  total=len(groups),
                                  desc="smoothquant" if sq is not None else "outlier channels"):
        group = groups[leader]
        layers = [cast(nn.Linear, model.get_submodule(n)) for n in group]
        if len(calls) % len(batches):
            raise ValueError(f"layer {leader!r} ran {len(calls)} times on {len(batches)} calibration batches, not the "
                             "same number of times on each; list it in `exclude`")
        # a layer shared by several blocks (ALBERT) runs k times per batch: its statistics pool every call,
        # and one scale serves them all (x / s @ (W s)^T is the same product whatever x is)
        k = len(calls) // len(batches)
        xs = [token_rows([x], [b]) for x, b in zip(calls, [b for b in batches for _ in range(k)], strict=True)]
        del calls
        seen = [x for x in xs if len(x)]
        if not seen:
            raise ValueError(f"layer {leader!r} saw no calibration inputs (every position masked?)")
        absmax = torch.stack([x.abs().amax(0) for x in seen]).amax(0)
        bits = cfg.bits_for(leader)
        alphas = () if sq is None else (sq.alpha,)
        data = ([m.weight for m in layers], xs, absmax)  # what the INT8 product will see
        outliers = None if oc is None else outlier_channels(absmax, oc.threshold)
        if outliers is not None and not outliers.numel():
            outliers = None
        found = smooth_search(*data, alphas, bits) if sq is not None or outliers is not None else None
        if outliers is not None and found is not None:
            # a float branch costs a Gather, a MatMul and an Add at run time: it must pay for them
            keep = torch.ones_like(absmax)
            keep[outliers] = 0.0
            split_data = ([w * keep for w in data[0]], [x * keep for x in xs], absmax * keep)
            split_found = smooth_search(*split_data, alphas, bits)
            gain = min(found[2].values()) / max(min(split_found[2].values()), 1e-30)
            candidates.update({n: {"channels": outliers.tolist(), "error_down": gain} for n in group})
            assert oc is not None
            if gain >= oc.min_gain:
                split.update({n: outliers.tolist() for n in group})
                data, found = split_data, split_found
            else:
                outliers = None
        scale = None
        if sq is not None and found is not None:
            scale, _, errors = found
            weights, inputs = data[0], data[1]
            power = float(sum(float((x @ w.T).pow(2).mean()) * len(x) for x in inputs for w in weights)) / max(
                1, sum(len(x) for x in inputs))  # summed over the group's layers, as the errors are
            for name in group:
                report[name] = {"smoothed": scale is not None, "shares_input_with": [n for n in group if n != name],
                                "sqnr_db_without": _db(power, errors[None]),
                                "sqnr_db_with": _db(power, errors[sq.alpha])}
        if scale is not None or outliers is not None:
            chosen.append((group, scale, outliers))
    for group, scale, outliers in chosen:
        for name in group:
            replace_module(model, name, QuantLinear(cast(nn.Linear, model.get_submodule(name)), cfg.bits_for(name),
                                                    dynamic=True, per_channel=cfg.per_channel, input_scale=scale,
                                                    outliers=outliers))
    out: dict[str, Any] = {}
    if sq is not None:
        out["smoothquant"] = report
        log.info("smoothquant: %d of %d Linear layers smoothed (alpha %.2f)",
                 sum(r["smoothed"] for r in report.values()), len(report), sq.alpha)
    if oc is not None:
        out["outlier_channels"] = split
        out["outlier_candidates"] = candidates
        log.info("outlier channels: %d of %d Linear layers multiply %d input channels in float", len(split),
                 sum(map(len, groups.values())), sum(len(v) for v in split.values()))
    return out


def _db(power: float, error: float) -> float:
    return float("inf") if error <= 0 else 10 * math.log10(max(power, 1e-30) / error)
