"""Say what a verb did: the share of the model's weights it compressed, each weight it left alone
with the reason, and how far the result's output departs from the original's on a batch, naming the
first layer that departs when that is far beyond the compression's own noise.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> c = coverage(m, ["0"], {"2": "excluded by config"})
>>> round(c["fraction"], 3), c["left_alone"]
(0.8, {'2': 'excluded by config'})
>>> relative_error(torch.ones(4), -torch.ones(4))
2.0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, first_tensor

__all__ = ["coverage", "relative_error", "output_fidelity", "first_departing_layer", "FidelityError",
           "KNOWN_LAYERS"]

log = logging.getLogger(__name__)

KNOWN_LAYERS = "Linear, Conv1d/Conv2d, Embedding and Hugging Face's Conv1D"


class FidelityError(ValueError):
    """A compressed model's output departs from the original's far beyond the compression's noise."""


def _owner_reason(model: nn.Module, owner: str, param: Tensor) -> str:
    m = model.get_submodule(owner) if owner else model
    if param.dim() >= 3 and not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (f"a {param.dim()}-D weight bank held by {type(m).__name__} itself (mixture-of-experts experts?), "
                f"not by a layer type slimkit compresses ({KNOWN_LAYERS})")
    return f"{type(m).__name__} holds it directly; slimkit compresses {KNOWN_LAYERS} layers"


def coverage(model: nn.Module, compressed: list[str], skipped: Mapping[str, str]) -> dict[str, Any]:
    """What share of ``model``'s weights (parameters of two or more dimensions, each counted once)
    lives in the ``compressed`` layers, and why each other weight-holding module was left alone."""
    total, done = 0, 0
    left: dict[str, str] = {}
    prefixes = tuple(f"{n}." for n in compressed)
    for name, p in model.named_parameters():  # tied parameters once
        if p.dim() < 2:
            continue
        total += p.numel()
        owner = name.rpartition(".")[0]
        if owner in compressed or name in compressed or name.startswith(prefixes):
            done += p.numel()
        elif owner in skipped:
            left.setdefault(owner, skipped[owner])
        elif name in skipped:
            left.setdefault(name, skipped[name])
        else:
            left.setdefault(owner if p is getattr(model.get_submodule(owner) if owner else model, "weight", None)
                            else name, _owner_reason(model, owner, p))
    for name, why in skipped.items():
        left.setdefault(name, why)
    return {"fraction": done / total if total else 0.0, "compressed_params": done, "total_params": total,
            "left_alone": left}


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` over every element (float64)."""
    a, b = out.detach().double().flatten(), ref.detach().double().flatten()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cosine(out: Tensor, ref: Tensor) -> float:
    a, b = out.detach().double().flatten(), ref.detach().double().flatten()
    if a.shape != b.shape:
        return float("nan")
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@torch.no_grad()
def output_fidelity(original: nn.Module, result: nn.Module, batch: Batch) -> dict[str, float]:
    """Relative L2 error and cosine of ``result``'s main output against ``original``'s on ``batch``."""
    ref, out = first_tensor(call(original, batch)), first_tensor(call(result, batch))
    return {"relative_l2": relative_error(out, ref), "cosine": _cosine(out, ref)}


@torch.no_grad()
def first_departing_layer(original: nn.Module, result: nn.Module, batch: Batch, limit: float) -> str | None:
    """The first module (in the order the forward pass runs them), present under the same name in
    both models, whose output departs from the original's by more than ``limit`` (relative L2).
    A layer the result folded a BatchNorm into is compared with that BatchNorm's output."""
    kept = dict(result.named_modules())
    names = {n for n, _ in original.named_modules() if n} & {n for n in kept if n}
    # a BatchNorm folded away: no module of that name left, or an Identity in its place
    gone = {n for n, m in original.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(kept.get(n), nn.modules.batchnorm._BatchNorm)}
    names -= gone
    outputs: dict[int, dict[str, Tensor]] = {0: {}, 1: {}}
    order: list[str] = []
    made_by: dict[int, tuple[str, Any]] = {}  # the original's layer outputs, by identity (kept alive)
    folded: dict[str, str] = {}  # layer -> the BatchNorm folded into it

    def hook(side: int, name: str, module: nn.Module, args: Any, out: Any) -> None:
        if side == 0 and isinstance(out, Tensor):
            made_by[id(out)] = (name, out)
        if side == 0 and name in gone and args and isinstance(args[0], Tensor) and id(args[0]) in made_by:
            folded.setdefault(made_by[id(args[0])][0], name)
        try:
            outputs[side].setdefault(name, first_tensor(out).detach())
        except (TypeError, ValueError):
            return
        if side == 0 and name not in order and name in names:
            order.append(name)

    for side, model in enumerate((original, result)):
        watched = names | gone if side == 0 else names
        handles = [model.get_submodule(n).register_forward_hook(partial(hook, side, n)) for n in watched]
        try:
            call(model, batch)
        finally:
            for h in handles:
                h.remove()
    for name in order:  # a module finishes after its children, so the innermost departing one comes first
        a, b = outputs[0].get(folded.get(name, name)), outputs[1].get(name)
        if a is not None and b is not None and a.is_floating_point() and relative_error(b, a) > limit:
            return name
    return None


def check_fidelity(original: nn.Module, result: nn.Module, batch: Batch, limit: float, what: str) -> dict[str, float]:
    """``output_fidelity``, raising ``FidelityError`` naming the first departing layer when the
    relative error passes ``limit``."""
    fid = output_fidelity(original, result, batch)
    if not fid["relative_l2"] <= limit:  # NaN fails too
        layer = first_departing_layer(original, result, batch, limit)
        where = f"; the first layer that departs is {layer!r}" if layer else ""
        raise FidelityError(
            f"{what} changed the model's output far beyond its own noise on the given batch (relative L2 "
            f"{fid['relative_l2']:.3g}, cosine {fid['cosine']:.3f}; at most {limit:g} expected){where}. "
            "Leave that layer out (exclude=[...]) or report this as a bug")
    return fid
