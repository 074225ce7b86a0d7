"""PTQ passes that quantize more than once and measure to choose the config, then return the model
quantized with the choice (recorded in ``plan.passes``): ``keep_float`` (which layers stay in float),
``mixed_precision`` (a width per layer) and ``equalization`` (keep cross-layer equalization only where
it helps). They are the handlers of the search passes ``KeepFloat`` and ``MixedPrecision`` (and
of ``Equalize`` given data); ``ptq.quantize_ptq`` dispatches here, ``ptq.quantize_fixed`` quantizes
with one fixed list.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, cast

import torch
from torch import nn

from slimkit.core.batch import call, check_batches, modes_kept, output_error, tensors_of
from slimkit.core.dropin import replace_module
from slimkit.core.fidelity import FidelityError
from slimkit.core.progress import progress
from slimkit.quant import mixed_precision as mp
from slimkit.quant.modules import WEIGHTED_LAYERS as _WEIGHTED
from slimkit.quant.passes import (
    BiasCorrection,
    Equalize,
    KeepFloat,
    MixedPrecision,
    Quantize,
    pass_handler,
)
from slimkit.quant.ptq import QuantPlan, quantize_fixed, quantize_ptq
from slimkit.quant.weight_passes import weight_passes

__all__ = ["keep_float", "mixed_precision", "equalization", "quantize_compared"]

log = logging.getLogger(__name__)

SCAN_BATCHES = 4  # the keep_float scan's data: enough to rank layers; MiniLM's scan takes about 30 s


def _data(calib_data: Any, cfg: Quantize, what: str = "calib_data") -> list[Any]:
    data = check_batches(calib_data, what)
    return data[: cfg.calib_batches] if cfg.calib_batches is not None else data


def _reference(model: nn.Module, data: list[Any]) -> list[list[torch.Tensor]]:
    """The float model's outputs on ``data``, in eval mode (its modes restored after)."""
    with modes_kept(model), torch.no_grad():
        model.eval()
        return [[t.detach().clone() for t in tensors_of(call(model, b))] for b in data]


@pass_handler(KeepFloat)
def keep_float(model: nn.Module, cfg: Quantize, p: KeepFloat, calib_data: Any, inplace: bool) -> nn.Module:
    """The sensitivity pass: quantize each layer alone, measure how far the outputs move on the
    calibration data (its first ``SCAN_BATCHES`` batches: one pass over them per layer), and keep
    up to ``p.layers`` of the layers that move them most in float, each only where it brings the
    outputs closer (``_keep_greedily``). The scan and the choice, by name, are in
    ``plan.passes["keep_float"]``."""
    data = _data(calib_data, cfg, "calib_data (the keep_float scan measures each layer on it)")
    fixed = cfg.without(KeepFloat)
    exclude = cfg.weights.exclude
    names = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED) and n not in exclude]
    if len(names) <= p.layers:
        raise ValueError(f"KeepFloat(layers={p.layers}) would keep every quantizable layer of {type(model).__name__} "
                         f"({len(names)}) in float")
    reference = _reference(model, data)
    scan, scan_ref = data[:SCAN_BATCHES], reference[:SCAN_BATCHES]
    error = _scan_swapping(model, fixed, names, data, scan, scan_ref) if cfg.activations.mode != "static" else {}
    for name in progress([n for n in names if n not in error], desc="keep_float scan"):
        alone = quantize_ptq(model, fixed.with_weights(exclude=tuple(n for n in names if n != name) + exclude), data)
        with torch.no_grad():
            error[name] = output_error(alone, scan, scan_ref)
    kept, tried, final = _keep_greedily(model, fixed, exclude, sorted(names, key=lambda n: error[n], reverse=True),
                                        p.layers, data, reference)
    out = quantize_ptq(model, fixed.with_weights(exclude=(*exclude, *kept)), data, inplace)
    plan = cast(QuantPlan, out.slimkit_plan)
    plan.passes["keep_float"] = {"kept": kept, "sqnr_db_alone": {n: mp.sqnr_db(e) for n, e in error.items()},
                                 "sqnr_db_tried": tried, "sqnr_db": mp.sqnr_db(final)}
    passed = [n for n in tried if n not in kept]
    if len(kept) < p.layers:
        log.warning("keep_float: %d of the %d layers asked for stay in float; keeping %s in float as well did not "
                    "bring the outputs closer to the float model's", len(kept), p.layers, ", ".join(passed))
    log.info("keep_float: %s stay in float (each alone: %s dB); %.1f dB on the calibration data",
             ", ".join(kept) or "no layer", ", ".join(f"{mp.sqnr_db(error[n]):.1f}" for n in kept), mp.sqnr_db(final))
    return out


def _keep_greedily(model: nn.Module, cfg: Quantize, exclude: tuple[str, ...], ranked: list[str], layers: int,
                   data: list[Any], reference: list[list[torch.Tensor]]) -> tuple[list[str], dict[str, float], float]:
    """The float layers, chosen greedily: the most sensitive layers (``ranked``, its first ``2 * layers + 1``)
    are tried in turn and one stays in float only when keeping it there, beside those already kept,
    brings the outputs on ``data`` closer to the float model's. Sensitivities measured alone do not
    add up: a layer left in float changes what the activation grids after it are calibrated on, and
    on the digits ResNet keeping its stem in float beside the head moves the outputs further away.
    Returns the kept layers, the SQNR with each tried layer added, and the final output error."""
    with torch.no_grad():
        best = output_error(quantize_ptq(model, cfg.with_weights(exclude=exclude), data), data, reference)
    kept: list[str] = []
    tried: dict[str, float] = {}
    for name in progress(ranked[: 2 * layers + 1], desc="keep_float choice"):
        if len(kept) == layers:
            break
        trial = quantize_ptq(model, cfg.with_weights(exclude=(*exclude, *kept, name)), data)
        with torch.no_grad():
            err = output_error(trial, data, reference)
        tried[name] = mp.sqnr_db(err)
        if err < best:
            kept.append(name)
            best = err
    return kept, tried, best


def _scan_swapping(model: nn.Module, cfg: Quantize, names: list[str], data: list[Any], scan: list[Any],
                   reference: list[list[torch.Tensor]]) -> dict[str, float]:
    """The keep_float scan without re-quantizing per layer, where quantized layers do not depend on
    each other (dynamic or weight-only activations): quantize the whole model once, then put each
    quantized layer alone into a float copy and measure. Layers a weight pass did not leave
    swappable one by one are measured the slow way by the caller."""
    full = quantize_ptq(model, cfg, data)
    work = copy.deepcopy(model).eval()
    error: dict[str, float] = {}
    quantized = set(cast(QuantPlan, full.slimkit_plan).quantized_layers)
    with torch.no_grad():
        for name in progress([n for n in names if n in quantized], desc="keep_float scan"):
            original = replace_module(work, name, full.get_submodule(name))
            try:
                error[name] = output_error(work, scan, reference)
            finally:
                replace_module(work, name, original)
    return error


@pass_handler(MixedPrecision)
def mixed_precision(model: nn.Module, cfg: Quantize, p: MixedPrecision, calib_data: Any, inplace: bool) -> nn.Module:
    """Search the per-layer widths (``mixed_precision.search``), then quantize with that choice."""
    data = _data(calib_data, cfg, "calib_data (the mixed-precision search measures on it)")
    fixed = cfg.without(MixedPrecision)
    # the weights PTQ rounds: BatchNorm folded and, if asked, equalized (no rounding yet)
    prepared, _ = weight_passes(copy.deepcopy(model).eval(), fixed.without(BiasCorrection), data)
    chosen, report = mp.search(model, prepared, fixed, p, data, lambda c: quantize_ptq(model, c, data))
    out = quantize_ptq(model, chosen, data, inplace)
    plan = cast(QuantPlan, out.slimkit_plan)
    plan.passes["mixed_precision"] = report
    return out


TIE_DB = 0.1  # closer than this, two quantized models tie: another CPU's rounding could order them either way


def _clearly_better(err: float, than: float) -> bool:
    """Whether an output error ``err`` beats ``than`` by more than TIE_DB: a choice between two ways of
    quantizing keeps the configured one on a tie, so it does not flip with the kernels' summation order."""
    return mp.sqnr_db(err) > mp.sqnr_db(than) + TIE_DB


def _one_of_two(first: Any, second: Any, data: list[Any], model: nn.Module) -> tuple[nn.Module, bool, dict[str, Any]]:
    """Quantize both ways (``first`` is the configured one, kept on a tie) and keep the one whose outputs
    on ``data`` are closer to the float model's. A way whose result departs past its noise
    (``FidelityError``) loses to the other; when both do, the first one's error is raised. Returns the
    model kept, whether it is the first, and the two SQNRs (None for a way that departed). The first way
    runs before the float model's reference outputs: it names the layer a batch the model cannot take fails in."""
    made: list[nn.Module | None] = []
    failed: list[FidelityError] = []
    for way in (first, second):
        try:
            made.append(way())
        except FidelityError as e:
            made.append(None)
            failed.append(e)
    a, b = made
    if a is None and b is None:
        raise failed[0]
    reference = _reference(model, data)
    with torch.no_grad():
        errs = [float("inf") if m is None else output_error(m, data, reference) for m in made]
    kept_first = b is None or (a is not None and not _clearly_better(errs[1], errs[0]))
    sqnr = [None if m is None else mp.sqnr_db(e) for m, e in zip(made, errs, strict=True)]
    return cast(nn.Module, a if kept_first else b), kept_first, {"first": sqnr[0], "second": sqnr[1]}


def _db(v: float | None) -> str:
    return "departs" if v is None else f"{v:.1f} dB"


def equalization(model: nn.Module, cfg: Quantize, calib_data: Any) -> nn.Module:
    """Cross-layer equalization balances the weights' ranges but rescales the activations between
    the pairs, which per-tensor activation grids can pay for: on one training of the digits
    MobileNetV2 it lowers the per-tensor INT8 SQNR by 4 dB, on another it raises it by 4 dB. So the
    model is quantized both ways and the one whose outputs on the calibration data are closer to the
    float model's is kept (equalized on a tie, within TIE_DB; a way that departs past its noise loses);
    ``plan.passes["equalization"]`` records both (None for one that departs) and the decision."""
    data = _data(calib_data, cfg)
    choice, kept, db = _one_of_two(lambda: quantize_compared(model, cfg, data),
                                   lambda: quantize_compared(model, cfg.without(Equalize), data), data, model)
    report = {"kept": kept, "sqnr_db_with": db["first"], "sqnr_db_without": db["second"]}
    cast(QuantPlan, choice.slimkit_plan).passes["equalization"] = report
    log.info("cross-layer equalization %s: %s with it, %s without (calibration data)",
             "kept" if kept else "left out", _db(db["first"]), _db(db["second"]))
    return choice


def quantize_compared(model: nn.Module, cfg: Quantize, data: list[Any], inplace: bool = False) -> nn.Module:
    """``quantize_fixed``, except that a ``BiasCorrection(from_float=True)`` that ``compares`` is
    tried both ways, the shift from the float model's output and from the layer's own inputs, and
    the model whose outputs on ``data`` are closer to the float model's is kept (the float model's
    output on a tie, within TIE_DB; recorded in ``plan.passes["bias_correction_source"]``)."""
    bc = cfg.find(BiasCorrection)
    if bc is None or not bc.compares() or inplace:
        return quantize_fixed(model, cfg, data, inplace)
    own_cfg = cfg.with_pass(dataclasses.replace(bc, from_float=False))
    choice, kept, db = _one_of_two(lambda: quantize_fixed(model, cfg, data), lambda: quantize_fixed(model, own_cfg, data),
                                   data, model)
    report = {"from_float": kept, "sqnr_db_from_float": db["first"], "sqnr_db_own_inputs": db["second"]}
    plan = cast(QuantPlan, choice.slimkit_plan)
    plan.passes["bias_correction_source"] = report
    log.info("bias correction from the %s: %s from the float model's output, %s from the layers' own "
             "inputs (calibration data)", "float model's output" if kept else "layers' own inputs",
             _db(db["first"]), _db(db["second"]))
    return choice
