"""Save and load compressed models without pickle: weights as safetensors, the plan as JSON.

``save(model, dir)`` writes ``dir/model.safetensors`` and ``dir/plan.json``; ``load(dir, base)``
applies the plan to a freshly built ``base`` model and loads the weights (strictly: a plan or
weights that do not match the base model are an error, never a silent partial load). For a model
too large to build in float, ``base`` can be ``skeleton(folder)``: the model of a Hugging Face
folder with its parameters on ``meta``, which takes the saved tensors as they are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.core.files import temp_dir, user_mode
from slimkit.core.plans import plans_of, replay

__all__ = ["save", "load", "skeleton", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_PLAN, _WEIGHTS = "plan.json", "model.safetensors"


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` (compressed by slimkit, or plain) to ``directory``, atomically."""
    directory = Path(directory)
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "plans": [p.to_dict() for p in plans_of(model)]}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(directory.parent, prefix=f".{directory.name}.")
    try:
        save_file(state, str(tmp / _WEIGHTS))
        user_mode(tmp / _WEIGHTS)
        (tmp / _PLAN).write_text(json.dumps(meta, indent=1))
        if directory.exists():
            if not (directory / _PLAN).exists():
                raise FileExistsError(f"{directory} exists and is not a slimkit save folder; refusing to overwrite it")
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def skeleton(folder: str | os.PathLike[str], model_class: Any = None) -> nn.Module:
    """The model a Hugging Face folder (``config.json``) holds, built without weights: every
    parameter on ``meta``, taking no memory. ``sk.load(saved, sk.skeleton(folder))`` rebuilds a
    model quantized from that folder without its float weights ever in memory. ``model_class``: a
    transformers class, when the config's ``architectures`` names none."""
    from slimkit.core.checkpoint import Checkpoint

    return Checkpoint(folder).skeleton(model_class)


def load(directory: str | os.PathLike[str], base_model: nn.Module) -> nn.Module:
    """Rebuild a saved model on ``base_model`` (a freshly built model of the same architecture).
    ``base_model`` itself is not modified."""
    directory = Path(directory)
    plan_path, weights_path = directory / _PLAN, directory / _WEIGHTS
    for p in (plan_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: {directory} is not a complete slimkit save folder")
    try:
        meta = json.loads(plan_path.read_text())
        version = meta["format"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{plan_path} is corrupt: {e}") from e
    if version != FORMAT_VERSION:
        raise ValueError(f"{plan_path} has format {version}; this slimkit reads format {FORMAT_VERSION}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is corrupt: {e}") from e
    import copy

    plans = meta.get("plans")
    if plans is None:  # written before plans were chained: one plan or none
        plans = [meta["plan"]] if meta.get("plan") else []
    if not isinstance(plans, list):
        raise ValueError(f"{plan_path} is corrupt: 'plans' is not a list")
    model = copy.deepcopy(base_model)
    for i, plan in enumerate(plans):
        if not isinstance(plan, dict):
            raise ValueError(f"{plan_path} is corrupt: plan {i + 1} is not an object")
        try:
            model = replay(plan, model)
        except ValueError as e:
            raise ValueError(f"{plan_path}, plan {i + 1} of {len(plans)} ({plan.get('kind')!r}): {e}") from e
    # a skeleton base (parameters on ``meta``: sk.skeleton) takes the saved tensors themselves
    lazy = any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=lazy)
    if missing or unexpected:
        raise ValueError(
            f"the weights in {weights_path} do not match the base model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if lazy:
        empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if empty:
            raise ValueError(f"the weights in {weights_path} leave {empty[:5]} of the skeleton base without values")
    return model.eval()
