"""The tuner's config (what it may spend and search) and its result."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.config import Config, check_choice, check_range
from slimkit.measure import Measurement

__all__ = ["CALIBRATORS", "TuneConfig", "TuneResult"]

CALIBRATORS = ("minmax", "percentile", "entropy", "mse", "moving_average")


@dataclass(frozen=True, kw_only=True)
class TuneConfig(Config):
    """What the tuner may spend and search.

    - ``max_drop``: largest fall of the metric below FP32's allowed (the metric's own units).
    - ``objective``: ``"latency"`` (ONNX Runtime, batch 1, 2 threads, median) or ``"size"`` (bytes
      of the ONNX file).
    - ``time_budget``: seconds; the search stops before a trial that would overrun it.
    - ``calibrators``: INT8 calibrators tried in step 1.
    - ``fallback_sqnr_db``: output-SQNR targets tried, in order, with float fallback when no plain
      INT8 model meets the budget.
    - ``sparsities``: the structured-pruning ladder (fraction of channels removed), ``importance``
      and ``round_to`` as in ``PruneConfig``.
    - ``depth``: the depth-pruning ladder (fraction of the removable blocks removed; ``()`` skips it).
    - ``factorize_method``/``factorize_ratios``: low-rank trials (``()`` skips them).
    - ``finetune_epochs``, ``lr``: the fine-tuning after pruning and factorizing; ``distill``: with
      the original model teaching (``true``), on labels alone (``false``), or ``"auto"``: the first
      compressed model is fine-tuned both ways and the better way is kept for the rest.
    - ``latency_runs``, ``latency_seconds``: each latency is the median of at least that many runs
      lasting at least that long (sub-millisecond models need both to be stable).
    - ``peers``: measure ONNX Runtime's ``quantize_static`` on the FP32 model too.
    """

    max_drop: float = 1.0
    objective: str = "latency"
    time_budget: float = 600.0
    calibrators: tuple[str, ...] = ("minmax", "percentile", "entropy")
    fallback_sqnr_db: tuple[float, ...] = (30.0, 40.0)
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9)
    importance: str = "l1"
    round_to: int = 8
    depth: tuple[float, ...] = (0.5, 1.0)
    factorize_method: str = "tucker"
    factorize_ratios: tuple[float, ...] = (0.5,)
    finetune_epochs: int = 5
    lr: float = 0.01
    distill: bool | str = "auto"
    latency_runs: int = 200
    latency_seconds: float = 1.0
    peers: bool = True

    def validate(self) -> None:
        check_range("max_drop", self.max_drop, 0.0, float("inf"))
        check_choice("objective", self.objective, ("latency", "size"))
        check_range("time_budget", self.time_budget, 0.0, float("inf"), lo_open=True)
        for c in self.calibrators:
            check_choice("calibrators[]", c, CALIBRATORS)
        if not self.calibrators:
            raise ValueError("calibrators must name at least one calibrator")
        for s in self.sparsities:
            check_range("sparsities[]", s, 0.0, 1.0, lo_open=True, hi_open=True)
        for d in self.depth:
            check_range("depth[]", d, 0.0, 1.0, lo_open=True)
        for r in self.factorize_ratios:
            check_range("factorize_ratios[]", r, 0.0, 1.0, lo_open=True, hi_open=True)
        for db in self.fallback_sqnr_db:
            check_range("fallback_sqnr_db[]", db, 0.0, 200.0, lo_open=True)
        check_choice("importance", self.importance, ("l1", "l2", "taylor"))
        check_choice("factorize_method", self.factorize_method, ("svd", "spatial-svd", "tucker", "cp"))
        check_range("round_to", self.round_to, 1, 1024)
        check_range("finetune_epochs", self.finetune_epochs, 0, 1000)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_range("latency_runs", self.latency_runs, 5, 100000)
        check_choice("distill", self.distill, (True, False, "auto"))
        check_range("latency_seconds", self.latency_seconds, 0.0, 600.0)


@dataclass
class TuneResult:
    model: nn.Module
    best: Measurement
    reference: Measurement
    trials: list[Measurement]
    peers: list[Measurement]
    pareto: list[Measurement]
    stopped: str
    out: Path
    config: TuneConfig

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "max_drop": self.config.max_drop, "objective": self.config.objective,
                "best": self.best.to_dict(), "reference": self.reference.to_dict(),
                "trials": [t.to_dict() for t in self.trials], "peers": [p.to_dict() for p in self.peers],
                "pareto": [p.label for p in self.pareto], "stopped": self.stopped}
