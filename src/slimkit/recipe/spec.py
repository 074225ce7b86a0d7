"""A recipe as data: the YAML file parsed and validated (every key, stage config and import checked
before any work, errors as ``file:line: where: what``). See ``slimkit.recipe``."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

__all__ = ["Recipe", "RecipeError", "Stage", "load_recipe", "STAGE_KINDS", "import_path", "FORMAT_VERSION"]

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
    from slimkit.verbs import PRESET_TABLES, VERBS, resolve_config

    spec = {} if spec is None else spec
    from slimkit.prune.dynamic import PRESETS as SPARSE_PRESETS
    from slimkit.prune.dynamic import SparseTrainConfig

    extra: dict[str, tuple[type, Mapping[str, Any]]] = {"tune": (TuneConfig, {}),
                                                         "sparse_train": (SparseTrainConfig, SPARSE_PRESETS)}
    cls, named = VERBS[kind] if kind in VERBS else extra[kind]
    if kind == "quantize" and isinstance(spec, list):  # a list of passes
        return resolve_config(kind, spec)
    if not (isinstance(spec, Mapping) or isinstance(spec, str) and named):
        raise ValueError(f"a {kind} stage takes a mapping of {cls.__name__} keys"
                         + (f" or a preset name ({', '.join(named)})" if named else "") + f", got {spec!r}")
    cfg = resolve_config(kind, spec) if kind in PRESET_TABLES else resolve(spec, cls, named)
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


