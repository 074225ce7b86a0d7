"""Mixed precision from sensitivity: a weight bit width per layer, chosen to meet a size or a
fidelity budget.

1. **Sensitivity**: for every layer and candidate width, the output noise when only that layer's
   weights are rounded to that width (relative squared error against the float outputs on the
   calibration data; SQNR is its ``-10 log10``).
2. **Allocation**, treating the noise of several layers as additive (which holds well when the
   rounding errors are independent, Zhou et al. 2018; HAWQ uses the same additivity):
   - a size budget (average bits per weight) starts every layer at the widest width and narrows,
     one step at a time, the layer whose step adds the least noise per bit saved;
   - a fidelity budget (output SQNR) starts at the narrowest width and widens, one step at a time,
     the layer whose step removes the most noise per bit spent, then keeps widening (and, if
     allowed, falls back to float) until the fully quantized model, activations included,
     measures up to the budget.

The allocation functions are pure: dicts of measured noise in, a dict of widths out.

>>> noise = {"a": {4: 0.04, 8: 0.001}, "b": {4: 0.002, 8: 0.0001}}
>>> params = {"a": 100, "b": 100}
>>> allocate_for_size(noise, params, target_bits=6.0)  # b tolerates 4 bits far better than a
{'a': 8, 'b': 4}
>>> allocate_for_noise(noise, params, budget=0.01)
{'a': 8, 'b': 4}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.batch import Batch, call, output_error, tensors_of
from slimkit.core.progress import progress

from .modules import WEIGHTED_LAYERS as _WEIGHTED
from .modules import fake_quant_weight
from .passes import MixedPrecision, Quantize

__all__ = ["layer_noise", "allocate_for_size", "allocate_for_noise", "next_upgrade", "search", "sqnr_db"]

log = logging.getLogger(__name__)

FLOAT_BITS = 32

Bits = dict[str, "int | None"]  # None: the layer stays in float


def sqnr_db(noise: float) -> float:
    """``-10 log10`` of a relative squared error (capped at 200 dB for an exact match)."""
    return 200.0 if noise <= 1e-20 else -10.0 * math.log10(noise)


@torch.no_grad()
def layer_noise(model: nn.Module, names: list[str], candidates: tuple[int, ...], batches: list[Batch],
                reference: list[list[torch.Tensor]], grid: Callable[[int], int], per_channel: bool = True,
                ) -> dict[str, dict[int, float]]:
    """Output noise of ``model`` with only layer ``name``'s weights at each candidate width.
    ``grid(bits)`` is the width actually used (``reduce_range`` makes 8 into 7)."""
    modules = dict(model.named_modules())
    out: dict[str, dict[int, float]] = {}
    for name in progress(names, desc="sensitivity"):
        layer = modules[name]
        w = layer.weight.detach().clone()
        out[name] = {}
        try:
            for bits in candidates:
                layer.weight.copy_(fake_quant_weight(w, grid(bits), per_channel))
                out[name][bits] = output_error(model, batches, reference)
        finally:
            layer.weight.copy_(w)
    return out


def _size(bits: Bits, params: dict[str, int]) -> float:
    return sum(params[n] * (FLOAT_BITS if b is None else b) for n, b in bits.items())


def allocate_for_size(noise: dict[str, dict[int, float]], params: dict[str, int], target_bits: float) -> dict[str, int]:
    """Widths meeting an average of at most ``target_bits`` per weight, adding the least noise."""
    widths = sorted({b for per in noise.values() for b in per})
    bits = {n: widths[-1] for n in noise}
    budget = target_bits * sum(params[n] for n in noise)
    while _size(dict(bits), params) > budget + 1e-9:
        best: tuple[float, str, int] | None = None
        for name in sorted(noise):
            i = widths.index(bits[name])
            if i == 0:
                continue
            lower = widths[i - 1]
            cost = (noise[name][lower] - noise[name][bits[name]]) / (params[name] * (bits[name] - lower))
            if best is None or cost < best[0]:
                best = (cost, name, lower)
        if best is None:
            break
        bits[best[1]] = best[2]
    while True:  # narrowing a large layer can overshoot: spend what is left on the best widenings that fit
        left = budget - _size(dict(bits), params)
        fits = {n: noise[n] for n in noise if bits[n] != widths[-1]
                and params[n] * (widths[widths.index(bits[n]) + 1] - bits[n]) <= left + 1e-9}
        step = next_upgrade(fits, params, dict(bits)) if fits else None
        if step is None or step[1] is None:
            return bits
        bits[step[0]] = step[1]


def next_upgrade(noise: dict[str, dict[int, float]], params: dict[str, int], bits: Bits,
                 float_fallback: bool = False) -> tuple[str, int | None] | None:
    """The one widening step that removes the most predicted noise per bit spent; float
    fallback only once every layer is at the widest width. ``None`` when nothing is left."""
    widths = sorted({b for per in noise.values() for b in per})
    best: tuple[float, str, int | None] | None = None
    for name in sorted(noise):
        b = bits[name]
        if b is None or b == widths[-1]:
            continue
        wider = widths[widths.index(b) + 1]
        gain = (noise[name][b] - noise[name][wider]) / (params[name] * (wider - b))
        if best is None or gain > best[0]:
            best = (gain, name, wider)
    if best is None and float_fallback:
        for name in sorted(noise):
            if bits[name] is None:
                continue
            gain = noise[name][widths[-1]] / (params[name] * (FLOAT_BITS - widths[-1]))
            if best is None or gain > best[0]:
                best = (gain, name, None)
    return None if best is None else (best[1], best[2])


def allocate_for_noise(noise: dict[str, dict[int, float]], params: dict[str, int], budget: float,
                       floor: float = 0.0, float_fallback: bool = False) -> Bits:
    """The narrowest widths whose predicted noise, ``floor + sum of the layers' noise``, is at
    most ``budget`` (``floor``: what the activations' quantization adds)."""
    widths = sorted({b for per in noise.values() for b in per})
    bits: Bits = {n: widths[0] for n in noise}

    def predicted() -> float:
        return floor + sum(0.0 if b is None else noise[n][b] for n, b in bits.items())

    while predicted() > budget:
        step = next_upgrade(noise, params, bits, float_fallback)
        if step is None:
            break
        bits[step[0]] = step[1]
    return bits


def _as_config(cfg: Quantize, bits: Bits) -> Quantize:
    floats = tuple(n for n, b in bits.items() if b is None)
    return cfg.with_weights(layer_bits={n: b for n, b in bits.items() if b is not None},
                            exclude=tuple(dict.fromkeys((*cfg.weights.exclude, *floats))))


def search(model: nn.Module, prepared: nn.Module, cfg: Quantize, p: MixedPrecision, batches: list[Batch],
           quantize: Callable[[Quantize], nn.Module]) -> tuple[Quantize, dict[str, Any]]:
    """Choose the widths for ``p``'s budget. ``cfg`` is the list without the search; ``prepared``
    is a copy of ``model`` with the weights PTQ will round (BatchNorm folded, equalized), changed
    temporarily; ``quantize(config)`` returns ``model`` quantized with a fixed choice. Returns the
    list with that choice and the report."""
    with torch.no_grad():
        reference = [[t.detach().clone() for t in tensors_of(call(model, b))] for b in batches]
    modules = dict(prepared.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, _WEIGHTED) and n not in cfg.weights.exclude]
    if not names:
        raise ValueError(f"mixed precision: {type(model).__name__} has no Linear/Conv layer to choose widths for")
    params = {n: modules[n].weight.numel() for n in names}
    candidates = tuple(sorted(set(p.bits)))
    measured_widths = tuple(sorted({*candidates, 8}))  # 8 bits: to tell the activations' share apart
    every = layer_noise(prepared, names, measured_widths, batches, reference,
                        lambda b: cfg.weights.replace(bits=b).effective_bits, cfg.weights.per_channel)
    noise = {n: {b: per[b] for b in candidates} for n, per in every.items()}

    def measure(bits: Bits) -> float:
        with torch.no_grad():
            return output_error(quantize(_as_config(cfg, bits)), batches, reference)

    # what quantizing the activations adds: the 8-bit model's noise less its weights' share
    floor = max(measure({n: 8 for n in names}) - sum(every[n][8] for n in names), 0.0)
    report: dict[str, Any] = {"candidates": list(candidates), "params": params,
                              "sensitivity_db": {n: {str(b): sqnr_db(v) for b, v in per.items()} for n, per in noise.items()},
                              "activations_db": sqnr_db(floor)}
    bits: Bits
    if p.target_bits is not None:
        report["target_bits"] = p.target_bits
        bits = dict(allocate_for_size(noise, params, p.target_bits))
        measured = measure(bits)
    else:
        assert p.target_sqnr_db is not None
        budget = 10 ** (-p.target_sqnr_db / 10)
        report["target_sqnr_db"] = p.target_sqnr_db
        if floor >= budget:
            raise ValueError(f"target_sqnr_db={p.target_sqnr_db} is out of reach: quantizing the activations alone "
                             f"gives about {sqnr_db(floor):.1f} dB on the calibration data (weights in float); "
                             "lower the target or keep more of the model in float with exclude")
        bits = allocate_for_noise(noise, params, budget, floor, p.float_fallback)
        measured = measure(bits)
        while measured > budget:  # the prediction was optimistic: widen until the real model meets it
            step = next_upgrade(noise, params, bits, p.float_fallback)
            if step is None:
                raise ValueError(f"target_sqnr_db={p.target_sqnr_db} is out of reach: {sqnr_db(measured):.1f} dB "
                                 f"with every layer at {candidates[-1]} bits"
                                 + (" or in float" if p.float_fallback else " (float_fallback is off)"))
            bits[step[0]] = step[1]
            measured = measure(bits)
    report["bits"] = {n: ("float" if b is None else b) for n, b in bits.items()}
    report["average_bits"] = _size(bits, params) / sum(params.values())
    report["measured_db"] = sqnr_db(measured)
    log.info("mixed precision: %s, average %.2f bits per weight, %.1f dB on the calibration data",
             ", ".join(f"{b}-bit x{sum(1 for v in bits.values() if v == b)}" for b in [*candidates, None]
                       if any(v == b for v in bits.values())).replace("None-bit", "float"),
             report["average_bits"], report["measured_db"])
    return _as_config(cfg, bits), report

