"""Running ONNX models in ONNX Runtime: sessions, parity with PyTorch, latency.

>>> import numpy as np
>>> summarize([3.0, 1.0, 2.0])["median_ms"]
2.0
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from slimkit.core.batch import Batch, call, tensors_of

__all__ = ["session", "run", "Parity", "check_parity", "measure_latency", "summarize", "feeds", "OrtModule", "compare_latency"]


def session(path: str, threads: int = 2, level: str = "all") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, batch: Batch, names: list[str] | None = None) -> dict[str, np.ndarray]:
    names = names or [i.name for i in sess.get_inputs()]
    if isinstance(batch, Mapping):
        return {n: batch[n].detach().cpu().numpy() for n in names}
    ts = tensors_of(batch)
    if len(ts) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs ({names}) but the batch has {len(ts)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, ts, strict=True)}


def run(sess: ort.InferenceSession, batch: Batch) -> list[np.ndarray]:
    return sess.run(None, feeds(sess, batch))


class OrtModule(nn.Module):
    """An ONNX file in ONNX Runtime behind the ``nn.Module`` call, so any evaluation function written
    for the PyTorch model measures the exported file instead (tensor outputs; a tuple if several).

    >>> import tempfile, os, torch, slimkit as sk
    >>> m = torch.nn.Linear(4, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> _ = sk.export_onnx(m, path, torch.randn(3, 4))
    >>> x = torch.randn(5, 4)
    >>> bool(torch.allclose(OrtModule(path)(x), m(x), atol=1e-5))
    True
    """

    def __init__(self, path: str, threads: int = 2) -> None:
        super().__init__()
        self.path = str(path)
        self.sess = session(self.path, threads)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        batch: Batch = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        out = [torch.from_numpy(o) for o in run(self.sess, batch)]
        return out[0] if len(out) == 1 else tuple(out)


NOISE_RATIO = 1.5  # how much further from the float model than the PyTorch result a file may be
NOISE_FLOOR = 1e-3


@dataclass
class Parity:
    """Agreement between ONNX Runtime and PyTorch on one batch.

    With a float reference (the model before compression), the file passes when it is about as
    close to it as the PyTorch result is: ``file_vs_float <= NOISE_RATIO * model_vs_float +
    NOISE_FLOOR`` (relative L2). The two round differently, so neither must match the other bit for
    bit; a file that computes another function is far from both. Without one, the file must be
    within ``tolerance`` of the PyTorch result."""

    rel_l2: float
    max_abs: float
    top1_agreement: float | None
    tolerance: float
    file_vs_float: float | None = None
    model_vs_float: float | None = None

    @property
    def ok(self) -> bool:
        if self.file_vs_float is not None and self.model_vs_float is not None:
            return self.file_vs_float <= NOISE_RATIO * self.model_vs_float + NOISE_FLOOR
        return self.rel_l2 <= self.tolerance

    def __str__(self) -> str:
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {100 * self.top1_agreement:.1f}%"
        if self.file_vs_float is not None and self.model_vs_float is not None:
            return (f"file vs float model {self.file_vs_float:.2e}, PyTorch result vs float model "
                    f"{self.model_vs_float:.2e} (the file may be at most {NOISE_RATIO:g}x as far, + {NOISE_FLOOR:g}); "
                    f"file vs PyTorch result {self.rel_l2:.2e}, max abs {self.max_abs:.3g}{top1}")
        return f"relative L2 error {self.rel_l2:.2e} (tolerance {self.tolerance:.0e}), max abs {self.max_abs:.3g}{top1}"


def _rel(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    num = sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, ref, strict=True))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return float((num / max(den, 1e-30)) ** 0.5)


def _outputs(model: nn.Module, batch: Batch) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.detach().float().numpy() for t in tensors_of(call(model, batch))]


def check_parity(model: nn.Module, path: str, batch: Batch, names: list[str] | None,
                 tolerance: float, reference: nn.Module | None = None, runtime: str = "onnxruntime") -> Parity:
    """Run the file on ``batch`` in ``runtime`` (``export/runtimes.py``) and compare with ``model``,
    and with ``reference`` (the float model ``model`` was compressed from) when given (see ``Parity``)."""
    if runtime == "onnxruntime":
        sess = session(path)
        got = sess.run(None, feeds(sess, batch, names))
    else:
        from slimkit.export.runtimes import open_file

        runner = open_file(path, runtime)
        ts = [t.detach().cpu().numpy() for t in tensors_of(batch)] if not isinstance(batch, Mapping) else None
        order = names or runner.input_names
        given = {n: batch[n].detach().cpu().numpy() for n in order} if isinstance(batch, Mapping) else \
            dict(zip(order, ts or [], strict=True))
        got = runner.run({n: given[n] for n in runner.input_names})
    ref = _outputs(model, batch)
    if len(got) != len(ref):
        raise ValueError(f"ONNX model has {len(got)} outputs, PyTorch {len(ref)}")
    shapes = [g.shape for g in got], [r.shape for r in ref]
    if shapes[0] != shapes[1]:
        raise ValueError(f"ONNX model's output shapes {shapes[0]} differ from PyTorch's {shapes[1]}")
    rel = _rel(got, ref)
    max_abs = max(float(np.max(np.abs(g - r))) if g.size else 0.0 for g, r in zip(got, ref, strict=True))
    top1 = None
    if ref[0].ndim == 2 and ref[0].shape[1] > 1:
        top1 = float(np.mean(got[0].argmax(1) == ref[0].argmax(1)))
    file_vs, model_vs = None, None
    if reference is not None:
        floats = _outputs(reference, batch)
        if [f.shape for f in floats] == shapes[1]:
            file_vs, model_vs = _rel(got, floats), _rel(ref, floats)
    return Parity(rel, max_abs, top1, tolerance, file_vs, model_vs)


def summarize(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms), "runs": float(len(times_ms))}


def measure_latency(path: str, batch: Batch, threads: int = 2, warmup: int = 10, runs: int = 50,
                    min_seconds: float = 0.0) -> dict[str, float]:
    """Latency of one ONNX model in ONNX Runtime: warm-up, then ``runs`` timed runs (more while
    ``min_seconds`` has not elapsed); median and min in milliseconds."""
    sess = session(path, threads)
    f = feeds(sess, batch)
    for _ in range(warmup):
        sess.run(None, f)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        sess.run(None, f)
        times.append((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = summarize(times)
    out["threads"] = threads
    return out


def compare_latency(paths: list[str], batch: Batch, threads: int = 2, rounds: int = 5, seconds: float = 0.5,
                    warmup: int = 20) -> list[dict[str, float]]:
    """Latencies of several ONNX models measured interleaved: ``rounds`` rounds, each running every
    model for ``seconds``; per model, the median over all its runs and the median of the round
    medians. Drift of the machine (frequency, other load) then hits every model alike, so ratios
    between them are steadier than from measurements taken one after another. Each model gets a
    fresh session in each round, closed after it: the idle thread pools of other live sessions
    would otherwise spin on the same cores."""
    times: list[list[float]] = [[] for _ in paths]
    per_round: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, path in enumerate(paths):
            sess = session(path, threads)
            f = feeds(sess, batch)
            for _ in range(warmup):
                sess.run(None, f)
            start, got = time.perf_counter(), list[float]()
            while time.perf_counter() - start < seconds or len(got) < 5:
                t0 = time.perf_counter()
                sess.run(None, f)
                got.append((time.perf_counter() - t0) * 1e3)
            del sess
            times[i] += got
            per_round[i].append(statistics.median(got))
    return [{**summarize(t), "median_of_rounds_ms": statistics.median(r), "threads": threads}
            for t, r in zip(times, per_round, strict=True)]
