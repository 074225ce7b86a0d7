"""The Pretrain-Prune-Retrain loop: reach the final sparsity in ``steps`` rounds of pruning and
fine-tuning instead of one cut, so that the network recovers between cuts.

Each round removes the same fraction of what is left, ``1 - (1 - sparsity) ** (1 / steps)``, so the
model after the last round has the requested ``sparsity`` overall: channels (structured; the rounds'
plans chain, and ``sk.save``/``sk.load`` replay them) or weights (unstructured / N:M; zeros found in
earlier rounds stay zero, since fine-tuning holds them).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from slimkit.core.batch import Batch

from .config import PruneConfig

__all__ = ["prune_iteratively", "round_sparsities"]

log = logging.getLogger(__name__)


def round_sparsities(sparsity: float, steps: int, method: str) -> list[float]:
    """What each round asks of ``sk.prune``: of the current model (structured: the fraction of its
    channels to remove now) or of the original weights (unstructured: the cumulative fraction).

    >>> [round(s, 3) for s in round_sparsities(0.875, 3, "structured")]
    [0.5, 0.5, 0.5]
    >>> [round(s, 3) for s in round_sparsities(0.875, 3, "unstructured")]
    [0.5, 0.75, 0.875]
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    keep = (1.0 - sparsity) ** (1.0 / steps)
    if method == "structured":
        return [1.0 - keep] * steps
    return [1.0 - keep ** (k + 1) for k in range(steps)]


def prune_iteratively(model: nn.Module, config: PruneConfig | Mapping[str, Any], train_data: Sequence[Any],
                      steps: int = 3, epochs: int = 1, lr: float = 0.01, distill: bool = True,
                      example_inputs: Batch | None = None,
                      evaluate: Callable[[nn.Module], float] | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Prune a copy of ``model`` to ``config``'s sparsity in ``steps`` rounds, fine-tuning ``epochs``
    on ``(inputs, labels)`` batches after each (the original teaching when ``distill``). Returns the
    model and one row per round (``sparsity`` asked, parameters, ``metric`` when ``evaluate``)."""
    from slimkit import api as sk_api
    from slimkit.train import fit

    from .masks import hold_zeros

    cfg = config if isinstance(config, PruneConfig) else PruneConfig.from_dict(config)
    if cfg.method not in ("structured", "unstructured", "nm"):
        raise ValueError(f"iterative pruning takes structured, unstructured or nm configs, got {cfg.method!r}")
    if cfg.method == "nm":
        steps = 1  # an N:M pattern is one fixed cut
    if not train_data:
        raise ValueError("iterative pruning fine-tunes between rounds: train_data is empty")
    teacher = copy.deepcopy(model).eval() if distill else None
    current = model
    rows: list[dict[str, Any]] = []
    for k, s in enumerate(round_sparsities(cfg.sparsity, steps, cfg.method)):
        current = sk_api.prune(current, cfg.replace(sparsity=s), example_inputs=example_inputs, data=list(train_data)[:8])
        with hold_zeros(current) if cfg.method != "structured" else contextlib.nullcontext():
            fit(current, list(train_data), epochs=epochs, lr=lr, teacher=teacher, seed=k)
        current.eval()
        row: dict[str, Any] = {"round": k + 1, "sparsity": s, "parameters": sum(p.numel() for p in current.parameters())}
        if evaluate is not None:
            row["metric"] = float(evaluate(current))
        rows.append(row)
        log.info("iterative pruning, round %d/%d: %s", k + 1, steps, row)
    return current, rows
