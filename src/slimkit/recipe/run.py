"""Running a recipe: each stage's verb, its measurement and its folder written atomically, the run's
state in ``out/run.json`` (resumed after an interruption), then ``results.json`` and the report."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.core.batch import Batch, check_batches, inputs_only
from slimkit.core.files import atomic_dir, write_json
from slimkit.core.progress import progress

from .spec import FORMAT_VERSION, Recipe, Stage, _unknown, import_path, load_recipe

__all__ = ["run_recipe"]

log = logging.getLogger("slimkit.recipe")

@dataclass
class _Data:
    train: list[Any]
    calib: list[Batch]
    example: Batch


def _from_file(recipe: Recipe) -> dict[str, Any]:
    """A data file or folder (``slimkit.data.sources``): (inputs, labels) batches of 32 to train on when
    it has labels, its first 256 samples to calibrate on, its first 8 as the example."""
    from slimkit.data.sources import first_samples, load_data

    d = load_data(str(recipe.base_dir / recipe.data), batch_size=32)
    return {"train": d.pairs() if d.labels is not None else [], "calib": first_samples(d, 256).inputs,
            "example": d.example(8)}


def _load_data(recipe: Recipe) -> _Data:
    got = _from_file(recipe) if ":" not in recipe.data else import_path(recipe.data, "data")()
    if not isinstance(got, Mapping):
        raise ValueError(f"data {recipe.data!r} returned a {type(got).__name__}; it must return a mapping "
                         "with 'train', 'calib' and/or 'example'")
    if msg := _unknown(got, ("train", "calib", "example"), f"what data {recipe.data!r} returned"):
        raise ValueError(msg)
    train = list(got.get("train") or [])
    calib = list(got["calib"]) if got.get("calib") is not None else list(inputs_only(train))
    calib = check_batches(calib, f"the calibration data of {recipe.data!r}")
    example = got["example"] if got.get("example") is not None else calib[0]
    needs_train = [s.kind for s in recipe.stages if s.kind in ("distill", "qat", "sparse_train")]
    if needs_train and not train:
        raise ValueError(f"data {recipe.data!r} gave no 'train' batches, which the {needs_train[0]} stage needs")
    return _Data(train, calib, example)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _state(recipe: Recipe) -> dict[str, Any]:
    """The run folder's state: a new run, or the one to resume (refusing one that is not ours)."""
    out = recipe.out
    state_path = out / "run.json"
    if not state_path.exists():
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise FileExistsError(f"{out} exists and holds files that are not a slimkit run; "
                                  "give another out folder (nothing was overwritten)")
        return {"format": FORMAT_VERSION, "fingerprint": recipe.fingerprint(), "done": []}
    try:
        state = json.loads(state_path.read_text())
        done = state["done"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{state_path} is corrupt ({e}); give another out folder") from e
    if state.get("fingerprint") != recipe.fingerprint():
        raise FileExistsError(f"{out} holds a run of another model, data or evaluation; give another out folder "
                              "(nothing was overwritten)")
    for entry in done[1:]:
        i = entry["index"]
        if i >= len(recipe.stages) or _canonical(recipe.stages[i].raw) != _canonical(entry["config"]) \
                or recipe.stages[i].kind != entry["kind"]:
            raise FileExistsError(f"{out} holds a run whose stage {i + 1} ({entry['kind']}) differs from this recipe's; "
                                  "give another out folder (nothing was overwritten)")
    return state


def _stage_prune(cfg: Any, model: nn.Module, original: nn.Module, data: _Data, ctx: dict[str, Any]) -> nn.Module:
    from slimkit import api

    return api.prune(model, cfg, example_inputs=data.example, data=data.train[:8] or None)


def _stage_sparse_train(cfg: Any, model: nn.Module, original: nn.Module, data: _Data, ctx: dict[str, Any]) -> nn.Module:
    from slimkit.prune.dynamic import sparse_train

    return sparse_train(model, cfg, data.train, teacher=original)  # dynamic sparse training, the original teaching


def _stage_factorize(cfg: Any, model: nn.Module, original: nn.Module, data: _Data, ctx: dict[str, Any]) -> nn.Module:
    from slimkit import api

    return api.factorize(model, cfg, data=data.calib if cfg.allocation == "global" or cfg.whiten else None)


def _stage_distill(cfg: Any, model: nn.Module, original: nn.Module, data: _Data, ctx: dict[str, Any]) -> nn.Module:
    from slimkit import api
    from slimkit.prune.masks import hold_zeros

    with hold_zeros(model) if ctx["sparse"] else contextlib.nullcontext():
        return api.distill(model, original, data.train, cfg, checkpoint=str(ctx["folder"].parent / ".distill.ckpt"))


def _stage_quantize(cfg: Any, model: nn.Module, original: nn.Module, data: _Data, ctx: dict[str, Any]) -> nn.Module:
    from slimkit import api

    return api.quantize(model, cfg, calib_data=data.calib)


def _stage_qat(cfg: Any, model: nn.Module, original: nn.Module, data: _Data, ctx: dict[str, Any]) -> nn.Module:
    from slimkit import api

    return api.qat(model, cfg, data.train, calib_data=data.calib)


# A recipe stage's kind -> what runs it: the same verbs as the Python API and the CLI, with the
# stage's config resolved by ``verbs.resolve_config`` when the recipe was read. ``tune`` is apart:
# it returns its trials as well.
STAGES: dict[str, Callable[[Any, nn.Module, nn.Module, _Data, dict[str, Any]], nn.Module]] = {
    "prune": _stage_prune, "sparse_train": _stage_sparse_train, "factorize": _stage_factorize,
    "distill": _stage_distill, "quantize": _stage_quantize, "qat": _stage_qat,
}


def _run_stage(stage: Stage, model: nn.Module, original: nn.Module, data: _Data, evaluate: Callable[[nn.Module], float],
               sparse: bool, folder: Path) -> tuple[nn.Module, dict[str, Any] | None]:
    if stage.kind in STAGES:
        return STAGES[stage.kind](stage.config, model, original, data, {"sparse": sparse, "folder": folder}), None
    from slimkit.tune import tune

    result = tune(model, stage.config, evaluate, data.example, data.calib, folder / "tuner", train_data=data.train)
    return result.model, result.to_dict()


def run_recipe(recipe: Recipe | str | os.PathLike[str], report: bool = True) -> dict[str, Any]:
    """Run (or resume) ``recipe``; returns what ``out/results.json`` holds."""
    from slimkit.io import load, save
    from slimkit.measure import measure

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    state = _state(recipe)
    out = recipe.out
    evaluate = import_path(recipe.evaluate, "evaluate")
    data = _load_data(recipe)
    original = recipe.build_model()
    out.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = state["done"]
    if not done:  # the baseline: the model as given, measured like every stage
        with atomic_dir(out / "00-baseline") as tmp:
            m = measure(original, "FP32", str(tmp / "model.onnx"), data.example, evaluate)
            metrics = {**m.to_dict(), "path": str(out / "00-baseline" / "model.onnx")}
            write_json(tmp / "metrics.json", metrics)
        done.append({"index": -1, "kind": "baseline", "config": None, "dir": "00-baseline", "metrics": metrics})
        write_json(out / "run.json", state)
    model = original
    if len(done) > 1:
        last = done[-1]
        log.info("resuming %s after stage %d (%s)", out, last["index"] + 1, last["kind"])
        model = load(out / last["dir"] / "model", recipe.build_model())
    sparse = False
    bar = progress(total=len(recipe.stages), initial=len(done) - 1, desc="stages", unit="stage")
    for i, stage in enumerate(recipe.stages):
        sparse = sparse or (stage.kind == "prune" and stage.config.method not in ("structured", "depth")) \
            or stage.kind == "sparse_train"
        if i < len(done) - 1:
            continue
        name = f"{i + 1:02d}-{stage.kind}"
        log.info("stage %d/%d: %s", i + 1, len(recipe.stages), stage.kind)
        t0 = time.perf_counter()
        with atomic_dir(out / name) as tmp:
            model, extra = _run_stage(stage, model, original, data, evaluate, sparse, tmp)
            save(model, tmp / "model")
            m = measure(model, f"{i + 1}. {stage.kind}", str(tmp / "model.onnx"), data.example, evaluate, started=t0)
            metrics = {**m.to_dict(), "path": str(out / name / "model.onnx")}
            write_json(tmp / "metrics.json", metrics)
        with contextlib.suppress(FileNotFoundError):
            os.remove(out / ".distill.ckpt")
        if extra is not None:  # the tuner wrote into the temporary folder; point at the final one
            extra = json.loads(json.dumps(extra, default=str).replace(str(tmp), str(out / name)))
        done.append({"index": i, "kind": stage.kind, "config": stage.raw, "dir": name, "metrics": metrics,
                     "tuner": extra})
        write_json(out / "run.json", state)
        bar.update(1)
        bar.set_postfix_str(f"{stage.kind}: metric {m.metric:.4g}, {m.latency_ms:.3f} ms")
    bar.close()
    results = _results(recipe, done, model, original, data)
    write_json(out / "results.json", results)
    if report:
        from slimkit.report import write_report

        paths = write_report(out)
        log.info("report: %s", paths["html"])
    return results


def _results(recipe: Recipe, done: list[dict[str, Any]], final: nn.Module, original: nn.Module, data: _Data) -> dict[str, Any]:
    from slimkit.report import stage_row
    from slimkit.report.layers import layer_table

    base = done[0]["metrics"]
    rows = [stage_row(e["kind"], e["metrics"], base, e["config"]) for e in done]
    tuner = next((e["tuner"] for e in reversed(done) if e.get("tuner")), None)
    return {"recipe": recipe.source, "model": recipe.model, "data": recipe.data, "evaluate": recipe.evaluate,
            "stages": rows, "tuner": tuner, "layers": layer_table(copy.deepcopy(original), final, data.calib[:4])}
