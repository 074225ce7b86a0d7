"""Per-layer sensitivity scan for structured pruning: prune one channel group alone at several
ratios and measure what it costs, so the fragile layers show before anything is cut (Li et al.
2017 scan every layer this way before choosing per-layer ratios).

The cost is the relative output error on ``data`` (``||f_pruned(x) - f(x)|| / ||f(x)||``), or the
drop of a ``metric`` (higher is better) when one is given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from slimkit.core.batch import Batch, call, check_batches, model_inputs, output_error, tensors_of
from slimkit.core.progress import progress

from .config import PruneConfig
from .plan import _search_structured, apply_plan

__all__ = ["sensitivity_scan"]

log = logging.getLogger(__name__)


def sensitivity_scan(model: nn.Module, example_inputs: Batch, data: Iterable[Batch],
                     ratios: tuple[float, ...] = (0.25, 0.5, 0.75), importance: str = "l1",
                     metric: Callable[[nn.Module], float] | None = None) -> dict[str, list[list[float]]]:
    """``{group: [[ratio, cost], ...]}`` for every prunable channel group of ``model``, named by
    the first layer producing its channels (``+N`` when N more share them through adds)."""
    if importance not in ("l1", "l2"):
        raise ValueError(f"the scan ranks channels by magnitude: importance must be 'l1' or 'l2', got {importance!r}")
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be fractions in (0, 1), got {ratios!r}")
    inputs = [model_inputs(b) for b in check_batches(data, "data")]
    base = copy.deepcopy(model).eval()  # the caller's model keeps its train/eval flags
    with torch.no_grad():
        ref = [tensors_of(call(base, b)) for b in inputs] if metric is None else []
    base_metric = metric(base) if metric is not None else 0.0
    probe = _search_structured(base, PruneConfig(sparsity=0.5, importance=importance), example_inputs, None)
    out: dict[str, list[list[float]]] = {}
    groups = [g for g in probe.groups_ if g.get("frozen") is None]
    for g in progress(groups, desc="sensitivity scan"):
        producers = g["producers"]
        label = producers[0] + (f" +{len(producers) - 1}" if len(producers) > 1 else "")
        curve: list[list[float]] = []
        for r in ratios:
            cfg = PruneConfig(sparsity=r, importance=importance, layers=tuple(producers))
            plan = _search_structured(base, cfg, example_inputs, None)
            pruned = apply_plan(base, plan).eval()
            cost = base_metric - metric(pruned) if metric is not None else output_error(pruned, inputs, ref) ** 0.5
            curve.append([r, float(cost)])
        out[label] = curve
        log.debug("%s: %s", label, curve)
    return out
