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
    the ``p.layers`` layers that move them most in float. The scan and the choice, by name, are
    in ``plan.passes["keep_float"]``."""
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
    kept = sorted(names, key=lambda n: error[n], reverse=True)[: p.layers]
    out = quantize_ptq(model, fixed.with_weights(exclude=(*exclude, *kept)), data, inplace)
    with torch.no_grad():
        final = output_error(out, data, reference)
    plan = cast(QuantPlan, out.slimkit_plan)
    plan.passes["keep_float"] = {"kept": kept, "sqnr_db_alone": {n: mp.sqnr_db(e) for n, e in error.items()},
                                 "sqnr_db": mp.sqnr_db(final)}
    log.info("keep_float: %s stay in float (each alone: %s dB); %.1f dB on the calibration data", ", ".join(kept),
             ", ".join(f"{mp.sqnr_db(error[n]):.1f}" for n in kept), mp.sqnr_db(final))
    return out


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


def equalization(model: nn.Module, cfg: Quantize, calib_data: Any) -> nn.Module:
    """Cross-layer equalization balances the weights' ranges but rescales the activations between
    the pairs, which per-tensor activation grids can pay for: on one training of the digits
    MobileNetV2 it lowers the per-tensor INT8 SQNR by 4 dB, on another it raises it by 4 dB. So the
    model is quantized both ways and the one whose outputs on the calibration data are closer to the
    float model's is kept; ``plan.passes["equalization"]`` records both and the decision."""
    data = _data(calib_data, cfg)
    reference = _reference(model, data)
    with_eq = quantize_compared(model, cfg, data)
    without = quantize_compared(model, cfg.without(Equalize), data)
    with torch.no_grad():
        err_with, err_without = output_error(with_eq, data, reference), output_error(without, data, reference)
    kept = err_with <= err_without
    choice = with_eq if kept else without
    report = {"kept": kept, "sqnr_db_with": mp.sqnr_db(err_with),
              "sqnr_db_without": mp.sqnr_db(err_without)}
    cast(QuantPlan, choice.slimkit_plan).passes["equalization"] = report
    log.info("cross-layer equalization %s: %.1f dB with it, %.1f dB without (calibration data)",
             "kept" if kept else "left out", report["sqnr_db_with"], report["sqnr_db_without"])
    return choice


def quantize_compared(model: nn.Module, cfg: Quantize, data: list[Any], inplace: bool = False) -> nn.Module:
    """``quantize_fixed``, except that a ``BiasCorrection(from_float=True)`` that ``compares`` is
    tried both ways, the shift from the float model's output and from the layer's own inputs, and
    the model whose outputs on ``data`` are closer to the float model's is kept (recorded in
    ``plan.passes["bias_correction_source"]``)."""
    bc = cfg.find(BiasCorrection)
    if bc is None or not bc.compares() or inplace:
        return quantize_fixed(model, cfg, data, inplace)
    from_float = quantize_fixed(model, cfg, data)  # first: it names the layer a batch the model cannot take fails in
    reference = _reference(model, data)
    own = quantize_fixed(model, cfg.with_pass(dataclasses.replace(bc, from_float=False)), data)
    with torch.no_grad():
        err_float, err_own = output_error(from_float, data, reference), output_error(own, data, reference)
    kept = err_float <= err_own
    choice = from_float if kept else own
    report = {"from_float": kept, "sqnr_db_from_float": mp.sqnr_db(err_float), "sqnr_db_own_inputs": mp.sqnr_db(err_own)}
    plan = cast(QuantPlan, choice.slimkit_plan)
    plan.passes["bias_correction_source"] = report
    log.info("bias correction from the %s: %.1f dB from the float model's output, %.1f dB from the layers' own "
             "inputs (calibration data)", "float model's output" if kept else "layers' own inputs",
             report["sqnr_db_from_float"], report["sqnr_db_own_inputs"])
    return choice
