"""The tuner's search: one object that runs, measures and records trials in the order the
package doc gives, keeps the best so far and the Pareto front on disk, and confirms the pick."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.batch import Batch
from slimkit.core.files import atomic_dir, write_json
from slimkit.core.progress import log as progress
from slimkit.measure import EvaluationError, Measurement, measure, measure_onnx
from slimkit.tune.config import TuneConfig

__all__ = ["pareto_front"]

log = logging.getLogger(__name__)

CONFIRM = 4  # trials re-measured in the confirming round


def pareto_front(points: Iterable[Measurement], objective: str) -> list[Measurement]:
    """The trials no other trial beats on both the objective (lower) and the metric (higher).

    >>> def m(label, ms, metric):
    ...     return Measurement(label, "", metric, ms, ms, 1, None, None, True, 0.0, {})
    >>> [p.label for p in pareto_front([m("a", 1, 90), m("b", 2, 95), m("c", 3, 94), m("d", 1, 91)], "latency")]
    ['d', 'b']
    """
    pts = sorted(points, key=lambda p: _rank(p, objective))
    front: list[Measurement] = []
    for p in pts:
        if not front or p.metric > front[-1].metric:
            front.append(p)
    return front


def _objective(m: Measurement, objective: str) -> float:
    return m.latency_ms if objective == "latency" else float(m.size_bytes)


def _rank(m: Measurement, objective: str) -> tuple[float, float]:
    """Lower is better: the objective first, then the higher metric."""
    return _objective(m, objective), -m.metric


class Search:
    """One tuner run's state: the trials, peers and best so far, what is written under ``out``,
    and the time budget. ``tune`` calls its steps in order."""

    def __init__(self, model: nn.Module, cfg: TuneConfig, evaluate: Callable[[nn.Module], float],
                 train: list[Any], calib: list[Batch], example: Batch, out: Path) -> None:
        self.model, self.cfg, self.evaluate = model, cfg, evaluate
        self.train, self.calib, self.example, self.out = train, calib, example, out
        self.start = time.perf_counter()
        self.trials: list[Measurement] = []
        self.peers: list[Measurement] = []
        self.durations: dict[str, float] = {}
        self.best: Measurement | None = None
        self.best_model: nn.Module | None = None
        self.kept: dict[str, nn.Module] = {}  # the fastest feasible models, for the confirming round
        self.use_distill: bool = cfg.distill is not False  # "auto" is settled by the first fine-tuning
        self.distill_open = cfg.distill == "auto"
        self.reference: Measurement | None = None
        self.stopped = "finished"
        (out / "trials").mkdir(parents=True, exist_ok=True)

    # -- bookkeeping -------------------------------------------------------------------------------
    def floor(self) -> float:
        assert self.reference is not None
        return self.reference.metric - self.cfg.max_drop

    def feasible(self, m: Measurement) -> bool:
        return m.parity_ok and m.metric >= self.floor() - 1e-9

    def time_left(self, kind: str) -> bool:
        elapsed = time.perf_counter() - self.start
        if elapsed + self.durations.get(kind, 0.0) > self.cfg.time_budget:
            self.stopped = f"time budget of {self.cfg.time_budget:.0f} s reached before a {kind} trial"
            log.info("tuner: %s", self.stopped)
            return False
        return True

    def failed(self, kind: str, label: str, error: Exception) -> None:
        """A compressed model that could not be built, exported or measured: logged, recorded, skipped."""
        log.warning("tuner: trial %r failed: %s", label, error)
        self._append({"label": label, "kind": kind, "failed": f"{type(error).__name__}: {error}"})

    def trial(self, kind: str, label: str, build: Callable[[], nn.Module], **extra: Any) -> tuple[nn.Module, Measurement] | None:
        t0 = time.perf_counter()
        path = str(self.out / "trials" / f"{len(self.trials) + len(self.peers):02d}-{_slug(label)}.onnx")
        try:
            model = build()
            m = measure(model, label, path, self.example, self.evaluate, self.cfg.latency_runs, t0,
                        self.cfg.latency_seconds, kind=kind, **extra)
        except EvaluationError:
            raise  # the user's function is at fault, not this trial
        except (ValueError, RuntimeError) as e:
            if self.reference is None:
                raise ValueError(f"the FP32 model could not be exported or measured: {e}") from e
            self.failed(kind, label, e)
            self.durations[kind] = time.perf_counter() - t0
            return None
        self.durations[kind] = m.seconds
        self.trials.append(m)
        self._append({**m.to_dict(), "feasible": self.feasible(m) if self.reference else True})
        progress.info("tuner: trial %d, %s: metric %.4g, %.3f ms, %.1f kB (%.0f s)", len(self.trials), label, m.metric,
                      m.latency_ms, m.size_bytes / 1e3, m.seconds)
        if self.reference is None:
            self.reference = m
        if self.feasible(m):
            self.kept[label] = model
            fastest = sorted((t for t in self.trials if t.label in self.kept), key=lambda t: _rank(t, self.cfg.objective))
            for t in fastest[CONFIRM + 1:]:
                if t is not self.reference:
                    self.kept.pop(t.label, None)
            if self.best is None or self._better(m, self.best):
                self.best, self.best_model = m, model
                self._save_best()
        self._save_pareto()
        return model, m

    def confirm(self) -> None:
        """Re-measure the FP32 model and the fastest feasible trials interleaved (latency drifts
        between trials measured minutes apart) and pick again from those numbers."""
        from slimkit.export.runtime import compare_latency
        from slimkit.measure import first_rows

        assert self.reference is not None
        cands = [t for t in self.trials[1:] if t.label in self.kept and self.feasible(t)]
        cands = sorted(cands, key=lambda t: (t.latency_ms, -t.metric))[:CONFIRM]
        if self.cfg.objective != "latency" or not cands or not self.time_left("confirm"):
            return
        group = [self.reference, *cands]
        got = compare_latency([m.path for m in group], first_rows(self.example, 1), rounds=5,
                              seconds=max(self.cfg.latency_seconds / 2, 0.01))
        for m, r in zip(group, got, strict=True):
            m.extra["latency_single_ms"] = m.latency_ms
            m.latency_ms, m.latency_min_ms = r["median_ms"], r["min_ms"]
        best = min(group, key=lambda t: (t.latency_ms, -t.metric))
        self._append({"confirmed": {m.label: m.latency_ms for m in group}, "best": best.label})
        if best is not self.best:
            self.best = best
            self.best_model = self.kept.get(best.label, self.model if best is self.reference else None)
            assert self.best_model is not None
            self._save_best()
        else:
            write_json(self.out / "best" / "metrics.json", best.to_dict())
        self._save_pareto()

    def _better(self, a: Measurement, b: Measurement) -> bool:
        return _rank(a, self.cfg.objective) < _rank(b, self.cfg.objective)

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.out / "trials.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _save_pareto(self) -> None:
        front = pareto_front(self.trials, self.cfg.objective)
        write_json(self.out / "pareto.json", {"objective": self.cfg.objective, "front": [p.to_dict() for p in front],
                                               "peers": [p.to_dict() for p in self.peers]})

    def _save_best(self) -> None:
        from slimkit.io import save

        assert self.best is not None and self.best_model is not None
        with atomic_dir(self.out / "best") as tmp:
            save(self.best_model, tmp / "model")
            shutil.copyfile(self.best.path, tmp / "model.onnx")
            write_json(tmp / "metrics.json", self.best.to_dict())
        log.info("tuner: best so far %s (%.3f ms, %.1f kB, metric %.4g)", self.best.label, self.best.latency_ms,
                 self.best.size_bytes / 1e3, self.best.metric)

    # -- the steps -----------------------------------------------------------------------------------
    def finetune(self, model: nn.Module, distill: bool | None = None) -> nn.Module:
        from slimkit.train import fit

        distill = self.use_distill if distill is None else distill
        if self.cfg.finetune_epochs and self.train:
            fit(model, self.train, epochs=self.cfg.finetune_epochs, lr=self.cfg.lr,
                teacher=self.model if distill else None)
        return model.eval()

    def quantize(self, model: nn.Module, qcfg: dict[str, Any]) -> nn.Module:
        from slimkit import quantize

        return quantize(model, qcfg, calib_data=self.calib)


    def choose_quant(self, base: nn.Module) -> dict[str, Any] | None:
        """Step 1: the INT8 config with the best metric within the budget (or None)."""
        found: list[tuple[Measurement, dict[str, Any]]] = []
        for cal in self.cfg.calibrators:
            q: dict[str, Any] = _int8(cal)
            if not self.time_left("quantize"):
                return _pick(found, self.cfg.objective)
            r = self.trial("quantize", f"int8 {cal}", lambda q=q: self.quantize(base, q), config=q)  # type: ignore[misc]
            if r is not None and self.feasible(r[1]):
                found.append((r[1], q))
        if found:
            return _pick(found, self.cfg.objective)
        for db in self.cfg.fallback_sqnr_db:
            q = _int8(self.cfg.calibrators[0], db)
            if not self.time_left("quantize"):
                return None
            r = self.trial("quantize", f"int8 with float fallback ({db:g} dB)", lambda q=q: self.quantize(base, q), config=q)  # type: ignore[misc]
            if r is not None and self.feasible(r[1]):
                return q
        return None

    def compressed(self, kind: str, label: str, make: Callable[[], nn.Module], qcfg: dict[str, Any] | None,
                   **extra: Any) -> tuple[nn.Module, bool] | None:
        """``make()`` a float model, fine-tune it and measure it; with ``qcfg``, quantize it with
        that config and, if that misses the budget, with the other calibrators. Returns the float
        model and whether any of these met the budget."""
        if not self.time_left(kind):
            return None
        if self.distill_open and self.cfg.finetune_epochs and self.train:
            r = self.both_ways(kind, label, make, **extra)
        else:
            r = self.trial(kind, label, lambda: self.finetune(make()), **extra)
        if r is None:
            return None
        floatm, fm = r
        ok = self.feasible(fm)
        if qcfg is None:
            return floatm, ok
        others = [_int8(c, _fallback_db(qcfg)) for c in self.cfg.calibrators if c != _calibrator(qcfg)]
        for q in [qcfg, *others]:
            if not self.time_left(kind + "+int8"):
                break
            t = self.trial(kind + "+int8", f"{label} + int8 {_calibrator(q)}",
                           lambda q=q: self.quantize(floatm, q), **extra, config=q)  # type: ignore[misc]
            if t is not None and self.feasible(t[1]):
                return floatm, True
        return floatm, ok

    def ladder(self, kind: str, key: str, steps: Iterable[float], base: nn.Module, qcfg: dict[str, Any] | None,
               make: Callable[[float], nn.Module], label: Callable[[float], str]) -> tuple[nn.Module, float | None]:
        """Bisection over ``steps`` for the largest that keeps the budget (float or INT8); returns
        the float model of that step and the step, or ``base`` and None when none does."""
        ladder = sorted(steps)
        best: float | None = None
        lo, hi = 0, len(ladder) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            s = ladder[mid]
            r = self.compressed(kind, label(s), lambda s=s: make(s), qcfg, **{key: s})  # type: ignore[misc]
            if r is None:
                if self.stopped != "finished":
                    break
                hi = mid - 1
                continue
            if r[1]:
                base, best, lo = r[0], s, mid + 1
            else:
                hi = mid - 1
        return base, best

    def both_ways(self, kind: str, label: str, make: Callable[[], nn.Module],
                  **extra: Any) -> tuple[nn.Module, Measurement] | None:
        """The ``distill: auto`` knob: fine-tune one compressed model with the original teaching and
        on labels alone, keep the better way for the rest of the search."""
        try:
            made = make()
        except (ValueError, RuntimeError) as e:
            self.failed(kind, label, e)
            return None
        kd = self.trial(kind, f"{label} (distilled)", lambda: self.finetune(copy.deepcopy(made), True), **extra,
                        distill=True)
        ce = self.trial(kind, f"{label} (labels only)", lambda: self.finetune(copy.deepcopy(made), False), **extra,
                        distill=False)
        if kd is None or ce is None:
            return kd or ce
        self.distill_open = False
        self.use_distill = kd[1].metric >= ce[1].metric
        log.info("tuner: fine-tuning %s from now on (%.4g distilled, %.4g on labels)",
                 "with distillation" if self.use_distill else "on labels alone", kd[1].metric, ce[1].metric)
        self._append({"distill": self.use_distill, "distilled": kd[1].metric, "labels_only": ce[1].metric})
        return kd if self.use_distill else ce

    def prune_ladder(self, qcfg: dict[str, Any] | None) -> nn.Module:
        """Steps 2 and 3: channels, then blocks; returns the best float base (pruned or not)."""
        from slimkit.api import prune

        def channels(s: float) -> nn.Module:
            return prune(self.model, {"method": "structured", "sparsity": s, "importance": self.cfg.importance,
                                      "round_to": self.cfg.round_to}, example_inputs=self.example, data=self.train[:8])

        base, pruned = self.model, None
        if self.cfg.sparsities:
            base, pruned = self.ladder("prune", "sparsity", self.cfg.sparsities, base, qcfg, channels,
                                       lambda s: f"pruned {s:.0%}")
        if self.cfg.depth and self.stopped == "finished":
            start = base
            prefix = f"pruned {pruned:.0%} + " if pruned is not None else ""

            def depth_label(s: float) -> str:  # the share is of the blocks a shortcut can stand in for
                return prefix + ("every removable block removed" if s >= 1.0 else f"{s:.0%} of the removable blocks removed")

            def blocks(s: float) -> nn.Module:
                return prune(start, {"method": "depth", "sparsity": s}, example_inputs=self.example,
                             data=self.train[:8])

            base, _ = self.ladder("depth", "depth", self.cfg.depth, start, qcfg, blocks, depth_label)
        return base

    def factorize_steps(self, base: nn.Module, qcfg: dict[str, Any] | None) -> None:
        from slimkit import factorize

        for ratio in self.cfg.factorize_ratios:
            fcfg = {"method": self.cfg.factorize_method, "ratio": ratio}
            pruned = base is not self.model
            label = f"{'best pruned + ' if pruned else ''}{self.cfg.factorize_method} {ratio:.0%}"
            make: Callable[[], nn.Module] = lambda f=fcfg: factorize(base, f)  # type: ignore[misc]  # noqa: E731
            if self.compressed("factorize", label, make, qcfg, ratio=ratio) is None and self.stopped != "finished":
                return

    def measure_peers(self) -> None:
        from slimkit.export.peers import ort_quantize_static

        assert self.reference is not None
        path = str(self.out / "trials" / "peer-ort-quantize-static.onnx")
        try:
            ort_quantize_static(self.reference.path, path, self.calib)
            peer = measure_onnx(path, "ORT quantize_static", self.example, self.evaluate, self.cfg.latency_runs,
                                min_seconds=self.cfg.latency_seconds, kind="peer")
            self.peers.append(peer)
            self._append({**peer.to_dict(), "feasible": None})
        except EvaluationError:
            raise
        except Exception as e:  # a peer that fails is reported, never fatal
            self.failed("peer", "ORT quantize_static", e)
        self._save_pareto()


def _pick(found: list[tuple[Measurement, dict[str, Any]]], objective: str) -> dict[str, Any] | None:
    """The config of the best metric (then the best objective) among the feasible trials."""
    return max(found, key=lambda f: (f[0].metric, -_objective(f[0], objective)))[1] if found else None  # metric first


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _int8(calibrator: str, fallback_db: float | None = None) -> dict[str, Any]:
    """The tuner's INT8 trial as a list of passes (a dict, as the trials record it): static INT8 with
    ``calibrator``, and with ``fallback_db`` the layers that keep the outputs under that SQNR in float."""
    passes: list[dict[str, Any]] = [{"weights": {}}, {"activations": {"calibrator": calibrator}}]
    if fallback_db is not None:
        passes.append({"mixed_precision": {"bits": [8], "target_sqnr_db": fallback_db, "float_fallback": True}})
    return {"passes": passes}


def _calibrator(qcfg: dict[str, Any]) -> str:
    return str(qcfg["passes"][1]["activations"]["calibrator"])


def _fallback_db(qcfg: dict[str, Any]) -> float | None:
    rest = [p["mixed_precision"] for p in qcfg["passes"][2:] if "mixed_precision" in p]
    return float(rest[0]["target_sqnr_db"]) if rest else None
