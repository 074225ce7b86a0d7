"""One measurement of one model, the way every face reports it: export to ONNX, check parity, then
fidelity (the user's evaluation function run on the ONNX file in ONNX Runtime), file size and batch-1
latency in ONNX Runtime.

>>> import tempfile, torch
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> r = measure(m, "fp32", tempfile.mkdtemp() + "/m.onnx", torch.randn(2, 4),
...             evaluate=lambda net: float(net(torch.ones(1, 4)).shape[-1]), runs=5)
>>> r.label, r.metric, r.parity_ok
('fp32', 3.0, True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from slimkit.core.batch import Batch

__all__ = ["Measurement", "EvaluationError", "measure", "measure_onnx", "first_rows", "count_weights"]

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module], float]


@dataclass
class Measurement:
    label: str
    path: str
    metric: float
    latency_ms: float
    latency_min_ms: float
    size_bytes: int
    params: int | None
    parity_rel_l2: float | None
    parity_ok: bool
    seconds: float
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def count_weights(model: nn.Module) -> int:
    """Trainable parameters plus the integer weights and biases quantized layers keep as buffers.

    >>> import torch, slimkit as sk
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> count_weights(m), count_weights(sk.quantize(m, "int8", calib_data=[torch.randn(4, 8)]))
    (36, 36)
    """
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        wq = getattr(m, "weight_q", None)
        if isinstance(wq, torch.Tensor):
            n += wq.numel()
        elif isinstance(getattr(m, "packed", None), torch.Tensor) and hasattr(m, "in_features"):
            n += int(getattr(m, "in_features")) * int(getattr(m, "out_features"))  # noqa: B009
        else:
            continue
        bias = getattr(m, "bias", None)
        if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter):
            n += bias.numel()
    return n


def first_rows(batch: Batch, n: int = 1) -> Batch:
    """The first ``n`` rows of a batch (a tensor, tuple or dict of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return tuple(t[:n] if isinstance(t, torch.Tensor) else t for t in batch)


class EvaluationError(RuntimeError):
    """The user's evaluation function raised or returned no finite number: a fault of the run, not
    of one compressed model, so searches stop on it."""


def _evaluate(evaluate: Evaluate, target: nn.Module, what: str) -> float:
    try:
        value = float(evaluate(target))
    except Exception as e:
        raise EvaluationError(f"the evaluation function raised on {what}: {type(e).__name__}: {e}") from e
    if value != value or value in (float("inf"), float("-inf")):
        raise EvaluationError(f"the evaluation function returned {value} on {what}")
    return value


def measure_onnx(path: str, label: str, example: Batch, evaluate: Evaluate, runs: int = 100,
                 params: int | None = None, started: float | None = None, min_seconds: float = 0.0,
                 parity_rel_l2: float | None = None, parity_ok: bool = True, **extra: Any) -> Measurement:
    """Measure an ONNX file that is already written (a peer's, say); ``extra`` is kept with it."""
    import os

    from slimkit.export.runtime import OrtModule, measure_latency

    t0 = time.perf_counter() if started is None else started
    metric = _evaluate(evaluate, OrtModule(path), path)
    lat = measure_latency(path, first_rows(example, 1), threads=2, warmup=max(5, runs // 10), runs=runs,
                          min_seconds=min_seconds)
    return Measurement(label, str(path), metric, lat["median_ms"], lat["min_ms"], os.path.getsize(path), params,
                       parity_rel_l2, parity_ok, time.perf_counter() - t0, extra)


def measure(model: nn.Module, label: str, path: str, example: Batch, evaluate: Evaluate, runs: int = 100,
            started: float | None = None, min_seconds: float = 0.0, **extra: Any) -> Measurement:
    """Export ``model`` to ``path`` (parity-checked), then measure the file (see the module doc):
    latency is the median of at least ``runs`` runs lasting at least ``min_seconds``."""
    from slimkit.export import export_onnx

    t0 = time.perf_counter() if started is None else started
    report = export_onnx(model, path, example)
    params = count_weights(model)
    m = measure_onnx(report.path, label, example, evaluate, runs, params, t0, min_seconds, parity_rel_l2=report.parity.rel_l2,
                     parity_ok=report.parity.ok, lint=report.lint.to_dict(), **extra)
    log.info("%s: metric %.4g, %.3f ms, %.1f kB", label, m.metric, m.latency_ms, m.size_bytes / 1e3)
    return m
