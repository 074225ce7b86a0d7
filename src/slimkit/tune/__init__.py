"""The tuner: the fastest (or smallest) model within an accuracy budget, measured in ONNX Runtime.

Given an evaluation function (higher is better, run on the exported ONNX file), the largest drop
allowed against the FP32 model, and an objective (``latency`` at batch 1 or ``size`` of the ONNX
file, both measured, never estimated), ``tune`` searches the families' knobs in a fixed order:

1. INT8 post-training quantization with each calibrator; if none meets the budget, layers go back
   to float by mixed precision at rising output-SQNR targets (``fallback_sqnr_db``).
2. Structured channel pruning, fine-tuned (with distillation from the original, on labels alone,
   or, with ``distill: auto``, both ways the first time and the better way after), then the INT8 choice of step 1: the sparsity ladder is searched by bisection for the largest
   sparsity that keeps the budget.
3. Depth pruning of that model (whole identity-shortcut blocks, ``depth`` fractions of them), the
   ladder searched the same way.
4. Low-rank factorization (``factorize_method`` at each of ``factorize_ratios``) of the best float
   model so far, fine-tuned, then quantized.

Last, the FP32 model and the fastest feasible trials are timed again, interleaved, and the pick is
made from those numbers (sub-millisecond latencies drift by tens of percent over minutes).

Every trial is exported and measured; the best-so-far (``best/``: an ``sk.save`` folder, its ONNX
file and its metrics) and the Pareto front (``pareto.json``) are rewritten on disk after every trial,
and ``trials.jsonl`` grows by one line per trial. The FP32 model is the first best, so a run always
ends with a saved model. The search stops when the next trial would overrun ``time_budget``
(estimated from the last trial of the same kind).

ONNX Runtime's own ``quantize_static`` is measured as a peer (on the Pareto plot, never picked).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.batch import Batch
from slimkit.core.files import write_json
from slimkit.tune.config import TuneConfig, TuneResult
from slimkit.tune.search import Search, pareto_front

__all__ = ["TuneConfig", "TuneResult", "tune", "pareto_front"]

log = logging.getLogger(__name__)


def tune(model: nn.Module, config: TuneConfig | dict[str, Any], evaluate: Callable[[nn.Module], float],
         example_inputs: Batch, calib_data: Iterable[Batch], out: str | os.PathLike[str],
         train_data: Iterable[Any] | None = None) -> TuneResult:
    """Search for the model with the lowest objective whose metric stays within ``max_drop`` of the
    FP32 model's (see the module doc for the order). ``evaluate(model) -> float`` (higher is better)
    is run on each exported ONNX file through ``OrtModule``. ``train_data`` (``(inputs, labels)``
    batches) fine-tunes pruned and factorized models; without it, they are measured untrained.
    Writes ``out/trials.jsonl``, ``out/pareto.json``, ``out/best/`` and ``out/tuner.json``; the
    caller's model is untouched."""
    from slimkit.core.batch import calibration_batches

    cfg = config if isinstance(config, TuneConfig) else TuneConfig.from_dict(config)
    out = Path(out)
    if (out / "tuner.json").exists() or (out / "trials.jsonl").exists():
        raise FileExistsError(f"{out} holds an earlier tuner run; give a new folder")
    calib = calibration_batches(model, calib_data, "calib_data")
    train = list(train_data) if train_data is not None else []
    if not train and (cfg.sparsities or cfg.factorize_ratios) and cfg.finetune_epochs:
        log.warning("tuner: no train_data, so pruned and factorized models are not fine-tuned")
    original = copy.deepcopy(model).eval()
    s = Search(original, cfg, evaluate, train, calib, example_inputs, out)
    s.trial("fp32", "FP32", lambda: copy.deepcopy(original))  # raises rather than fail: nothing to compare with
    if cfg.peers:
        s.measure_peers()
    qcfg = s.choose_quant(original)
    if qcfg is None:
        log.warning("tuner: no INT8 model met the budget (metric >= %.4g); pruning and factorizing in float", s.floor())
    base = s.prune_ladder(qcfg) if cfg.sparsities or cfg.depth else original
    if cfg.factorize_ratios and s.stopped == "finished":
        s.factorize_steps(base, qcfg)
    s.confirm()
    assert s.best is not None and s.best_model is not None and s.reference is not None
    result = TuneResult(s.best_model, s.best, s.reference, s.trials, s.peers, pareto_front(s.trials, cfg.objective),
                        s.stopped, out, cfg)
    write_json(out / "tuner.json", {"seconds": time.perf_counter() - s.start, **result.to_dict()})
    log.info("tuner: picked %s: %.3f ms (%.2fx FP32), %.1f kB, metric %.4g (FP32 %.4g); %s", s.best.label,
             s.best.latency_ms, s.best.latency_ms / s.reference.latency_ms, s.best.size_bytes / 1e3, s.best.metric,
             s.reference.metric, s.stopped)
    return result
