"""Recipes: one YAML file, a list of stages run on one model, validated before any work starts,
resumable after an interruption.

.. code-block:: yaml

    model:
      factory: slimkit.zoo:trained      # package.module:function returning the nn.Module
      args: [resnet18]                   # (or kwargs: {...}); checkpoint: weights.safetensors
      # hf: path/to/folder               # a Hugging Face folder instead (hf_class: AutoModel)
    data: slimkit.data:task              # -> {"train": (inputs, labels) batches, "calib": input batches, "example": a batch}
    # data: train.npz                    # or a data file or folder, as the command line takes (inputs and labels)
    evaluate: slimkit.data:digits_accuracy # model -> float, higher is better (run on the ONNX file)
    out: out/recipe
    stages:
      - prune: {sparsity: 0.5, round_to: 8}
      - distill: {epochs: 3, lr: 0.01}    # the original model teaches
      - quantize: int8                     # a preset name or a QuantConfig dict
    # other stages: factorize (FactorizeConfig), qat (a QAT preset or QATConfig), tune (TuneConfig),
    # sparse_train (dynamic sparse training, SparseTrainConfig: RigL or SET)

Relative paths (``checkpoint``, ``hf``, ``out``) are relative to the recipe file. Every stage
writes ``out/NN-kind/``: ``model/`` (an ``sk.save`` folder), ``model.onnx`` and ``metrics.json``
(the evaluation on the ONNX file in ONNX Runtime, size, batch-1 latency, parity), atomically; and
``out/run.json`` records the stages done. Running the recipe again resumes after the last finished
stage; an ``out`` that holds another run (another model, data, or a changed stage) is refused, never
overwritten. At the end ``out/results.json`` and the report (``report.md``, ``report.html``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from slimkit.core.batch import Batch, check_batches, inputs_only
from slimkit.core.files import atomic_dir, write_json
from slimkit.core.progress import progress

__all__ = ["Recipe", "RecipeError", "load_recipe", "run_recipe", "STAGE_KINDS", "import_path"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOP_KEYS = ("model", "data", "evaluate", "out", "stages")
MODEL_KEYS = ("factory", "args", "kwargs", "checkpoint", "hf", "hf_class")
STAGE_KINDS = ("prune", "sparse_train", "factorize", "distill", "quantize", "qat", "tune")
TERMINAL = ("quantize", "qat", "tune")  # they end in an integer (or chosen) model: nothing may follow


class RecipeError(ValueError):
    """A recipe that cannot run; the message starts with ``file:line``."""


def import_path(spec: str, what: str) -> Any:
    """The object named by ``package.module:attribute`` (or ``file.py:attribute``; the current folder
    is importable, as on the command line)."""
    from slimkit.data.sources import import_object

    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} must be given as package.module:name, got {spec!r}")
    try:
        obj = import_object(spec, what)
    except ValueError as e:
        raise ValueError(str(e).replace("cannot import", f"{what}", 1).replace(": No module", " does not import: No module")
                         if "No module" in str(e) else str(e)) from e
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable")
    return obj


@dataclass(frozen=True)
class Stage:
    kind: str
    config: Any  # the family's config object
    raw: Any  # as written (for the run's fingerprint)
    line: int


@dataclass(frozen=True)
class Recipe:
    model: dict[str, Any]
    data: str
    evaluate: str
    out: Path
    stages: tuple[Stage, ...]
    source: str = "<recipe>"
    base_dir: Path = field(default_factory=Path.cwd)

    def fingerprint(self) -> str:
        """What a resumed run must share with the first: the model, the data and the evaluation."""
        blob = json.dumps({"model": self.model, "data": self.data, "evaluate": self.evaluate}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def build_model(self) -> nn.Module:
        """A fresh model as the recipe describes it (eval mode)."""
        spec = self.model
        if spec.get("hf"):
            import transformers

            cls = getattr(transformers, spec.get("hf_class") or "AutoModel")
            model = cls.from_pretrained(str(self.base_dir / spec["hf"]), local_files_only=True)
        else:
            factory = import_path(spec["factory"], "model.factory")
            model = factory(*spec.get("args", []), **spec.get("kwargs", {}))
            if not isinstance(model, nn.Module):
                raise ValueError(f"model.factory {spec['factory']!r} returned a {type(model).__name__}, not an nn.Module")
            if spec.get("checkpoint"):
                from safetensors.torch import load_file

                path = self.base_dir / spec["checkpoint"]
                try:
                    model.load_state_dict(load_file(str(path)))
                except Exception as e:
                    raise ValueError(f"model.checkpoint {path}: {e}") from e
        return model.eval()


# -- loading and validation -------------------------------------------------------------------------

def _lines(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Every key and item of the YAML document, with the (1-based) line where it starts."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[(*path, k.value)] = k.start_mark.line + 1
            out.update({p: ln for p, ln in _lines(v, (*path, k.value)).items() if p != (*path, k.value)})
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_lines(v, (*path, i)))
    return out


class _Where:
    def __init__(self, source: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.source, self.lines = source, lines

    def error(self, path: tuple[Any, ...], message: str) -> RecipeError:
        p = path
        while p not in self.lines and p:
            p = p[:-1]
        line = self.lines.get(p, 1)
        where = "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))
        return RecipeError(f"{self.source}:{line}: {where + ': ' if where else ''}{message}")


def _unknown(keys: Any, allowed: tuple[str, ...], what: str) -> str | None:
    bad = [k for k in keys if k not in allowed]
    if not bad:
        return None
    close = difflib.get_close_matches(str(bad[0]), allowed, n=1)
    return (f"unknown key {bad[0]!r} in {what}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; allowed: {', '.join(allowed)}")


def _stage_config(kind: str, spec: Any) -> Any:
    from slimkit.core.config import resolve
    from slimkit.tune import TuneConfig
    from slimkit.verbs import VERBS

    spec = {} if spec is None else spec
    from slimkit.prune.dynamic import PRESETS as SPARSE_PRESETS
    from slimkit.prune.dynamic import SparseTrainConfig

    extra: dict[str, tuple[type, Mapping[str, Any]]] = {"tune": (TuneConfig, {}),
                                                         "sparse_train": (SparseTrainConfig, SPARSE_PRESETS)}
    cls, named = VERBS[kind] if kind in VERBS else extra[kind]
    if not (isinstance(spec, Mapping) or isinstance(spec, str) and named):
        raise ValueError(f"a {kind} stage takes a mapping of {cls.__name__} keys"
                         + (f" or a preset name ({', '.join(named)})" if named else "") + f", got {spec!r}")
    cfg = resolve(spec, cls, named)
    if kind == "distill" and cfg.mode != "offline":
        raise ValueError(f"a distill stage fine-tunes the model with the original as teacher (mode 'offline'), "
                         f"got mode {cfg.mode!r}")
    return cfg


def load_recipe(path: str | os.PathLike[str] | None = None, text: str | None = None, out: str | None = None) -> Recipe:
    """Parse and validate a recipe (from ``path``, or ``text``): every key, every stage's config and
    every import are checked before any work; errors read ``file:line: where: what``."""
    if (path is None) == (text is None):
        raise ValueError("load_recipe takes a path or a text")
    source = str(path) if path is not None else "<recipe>"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise RecipeError(f"{source}: cannot read the recipe: {e}") from e
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    assert text is not None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        detail = str(e).replace('"<unicode string>"', source)
        raise RecipeError(f"{source}:{mark.line + 1 if mark else 1}: not valid YAML: {detail}") from e
    where = _Where(source, _lines(node) if node is not None else {})
    if not isinstance(doc, dict):
        raise where.error((), "a recipe is a mapping with keys " + ", ".join(TOP_KEYS))
    if msg := _unknown(doc, TOP_KEYS, "the recipe"):
        bad = next(k for k in doc if k not in TOP_KEYS)
        raise where.error((bad,), msg)
    for key in ("model", "data", "evaluate", "stages"):
        if key not in doc:
            raise where.error((), f"the recipe has no {key!r}")
    model = doc["model"]
    if not isinstance(model, dict):
        raise where.error(("model",), "model is a mapping: factory (package.module:function) with args/kwargs/checkpoint, or hf")
    if msg := _unknown(model, MODEL_KEYS, "model"):
        raise where.error(("model", next(k for k in model if k not in MODEL_KEYS)), msg)
    if bool(model.get("factory")) == bool(model.get("hf")):
        raise where.error(("model",), "model needs exactly one of 'factory' and 'hf'")
    checks: list[tuple[str, Callable[[], None]]] = []
    if model.get("factory"):
        checks.append(("factory", lambda: import_path(model["factory"], "model.factory") and None))
    for key, typ in (("args", list), ("kwargs", dict)):
        if key in model and not isinstance(model[key], typ):
            raise where.error(("model", key), f"model.{key} must be a {'list' if typ is list else 'mapping'}")
    for key in ("checkpoint", "hf"):
        if model.get(key) and not (base_dir / model[key]).exists():
            raise where.error(("model", key), f"{model[key]!r} does not exist (relative paths start at {base_dir})")
    for key, check in checks:
        try:
            check()
        except ValueError as e:
            raise where.error(("model", key), str(e)) from e
    for key in ("data", "evaluate"):
        if key == "data" and isinstance(doc[key], str) and ":" not in doc[key]:
            if not (base_dir / doc[key]).exists():  # a data file or folder, as the command line takes
                raise where.error((key,), f"{doc[key]!r} does not exist (relative paths start at {base_dir})")
            continue
        try:
            import_path(doc[key], key)
        except ValueError as e:
            raise where.error((key,), str(e)) from e
    stages_doc = doc["stages"]
    if not isinstance(stages_doc, list) or not stages_doc:
        raise where.error(("stages",), "stages is a non-empty list, each item one of " + ", ".join(STAGE_KINDS))
    stages: list[Stage] = []
    for i, item in enumerate(stages_doc):
        if not isinstance(item, dict) or len(item) != 1:
            raise where.error(("stages", i), "each stage is a mapping with one key, the stage kind: "
                              + ", ".join(STAGE_KINDS))
        kind, spec = next(iter(item.items()))
        if kind not in STAGE_KINDS:
            close = difflib.get_close_matches(str(kind), STAGE_KINDS, n=1)
            raise where.error(("stages", i, kind), f"unknown stage {kind!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; stages: {', '.join(STAGE_KINDS)}")
        if stages and stages[-1].kind in TERMINAL:
            raise where.error(("stages", i, kind), f"a {kind} stage cannot follow a {stages[-1].kind} stage: "
                              f"{', '.join(TERMINAL)} must come last")
        try:
            cfg = _stage_config(kind, spec)
        except (ValueError, TypeError) as e:
            key_path: tuple[Any, ...] = ("stages", i, kind)
            if isinstance(spec, dict):  # point at the key the message names
                named = [k for k in spec if f"'{k}'" in str(e) or str(e).startswith(f"{k} ")]
                if named:
                    key_path = (*key_path, named[0])
            raise where.error(key_path, str(e)) from e
        stages.append(Stage(kind, cfg, spec, where.lines.get(("stages", i), 1)))
    out_path = out if out is not None else doc.get("out")
    if not out_path:
        raise where.error((), "the recipe has no 'out' (or give one on the command line)")
    return Recipe(model, doc["data"], doc["evaluate"], (base_dir / out_path) if out is None else Path(out),
                  tuple(stages), source, base_dir)


# -- running ----------------------------------------------------------------------------------------

@dataclass
class _Data:
    train: list[Any]
    calib: list[Batch]
    example: Batch


def _from_file(recipe: Recipe) -> dict[str, Any]:
    """A data file or folder (``slimkit.data.sources``): (inputs, labels) batches of 32 to train on when
    it has labels, its first 256 samples to calibrate on, its first 8 as the example."""
    from slimkit.data.sources import _limit, load_data

    d = load_data(str(recipe.base_dir / recipe.data), batch_size=32)
    return {"train": d.pairs() if d.labels is not None else [], "calib": _limit(d, 256).inputs,
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


def _run_stage(stage: Stage, model: nn.Module, original: nn.Module, data: _Data, evaluate: Callable[[nn.Module], float],
               sparse: bool, folder: Path) -> tuple[nn.Module, dict[str, Any] | None]:
    import slimkit as sk
    from slimkit import api as sk_api
    from slimkit.prune.masks import hold_zeros

    cfg = stage.config
    if stage.kind == "prune":
        return sk_api.prune(model, cfg, example_inputs=data.example, data=data.train[:8] or None), None
    if stage.kind == "sparse_train":  # dynamic sparse training, the original teaching
        from slimkit.prune.dynamic import sparse_train

        return sparse_train(model, cfg, data.train, teacher=original), None
    if stage.kind == "factorize":
        return sk.factorize(model, cfg, data=data.calib if cfg.allocation == "global" or cfg.whiten else None), None
    if stage.kind == "distill":
        with hold_zeros(model) if sparse else contextlib.nullcontext():
            return sk_api.distill(model, original, data.train, cfg, checkpoint=str(folder.parent / ".distill.ckpt")), None
    if stage.kind == "quantize":
        return sk.quantize(model, cfg, calib_data=data.calib), None
    if stage.kind == "qat":
        return sk.qat(model, cfg, data.train, calib_data=data.calib), None
    from slimkit.tune import tune

    result = tune(model, cfg, evaluate, data.example, data.calib, folder / "tuner", train_data=data.train)
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
