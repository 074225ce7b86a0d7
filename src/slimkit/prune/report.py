"""Say what structured pruning left whole: every module holding a weight (a parameter of two or more
dimensions) that the plan does not cut, with the reason, and the share of the weights in cut layers.

>>> import torch
>>> from torch import nn
>>> from slimkit.prune.plan import search
>>> from slimkit.prune.config import PruneConfig
>>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
>>> plan, _ = search(enc, PruneConfig(method="structured", sparsity=0.5), torch.randn(2, 3, 16))
>>> plan.skipped["layers.0.self_attn"][:47]
'nn.MultiheadAttention: its heads are kept whole'
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, modes_kept, tensors_of
from slimkit.core.fidelity import coverage

from .dependency import Group

__all__ = ["left_whole", "output_writers", "pruned_coverage"]

_MHA = ("nn.MultiheadAttention: its heads are kept whole (its embed_dim is both the heads' total width and its "
        "input and output width, so a head cannot go without swapping the module for another class)")
_UNFOLLOWED = ("no channel group of it could be cut: its outputs reach the model's outputs or a width kept whole "
               "(a residual stream), or are read through a reshape or split the graph and the probe cannot follow, "
               "or it runs more than once")


def _weight_holders(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            yield name, m


def left_whole(model: nn.Module, keep: dict[str, Any], groups: list[Group], entries: list[dict[str, Any]],
               exclude: tuple[str, ...], writers: set[str]) -> dict[str, str]:
    """Each weight-holding module of ``model`` with no dimension in ``keep`` (the plan's cuts), and
    why: excluded, a member only of groups kept whole (their reasons), a layer whose output is one
    of the model's outputs (``writers``, from ``output_writers``), or in no group at all."""
    reasons: dict[str, list[str]] = {}
    for g, e in zip(groups, entries, strict=True):
        why = e.get("frozen") or ("kept whole at this sparsity" if e["kept"] == e["channels"] else None)
        for mb in g.members:
            if why is not None:
                reasons.setdefault(mb.module, [])
                if why not in reasons[mb.module]:
                    reasons[mb.module].append(why)
    out: dict[str, str] = {}
    mha = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
    for name, m in _weight_holders(model):
        if name in keep or not name:
            continue
        if any(name == x or name.startswith(x + ".") for x in exclude):
            out[name] = "excluded by config"
        elif isinstance(m, nn.MultiheadAttention) or name.startswith(mha):
            out[name] = _MHA
        elif name in reasons:
            out[name] = "its channel groups are kept whole: " + "; ".join(reasons[name][:3])
        elif isinstance(m, (nn.Embedding, nn.LayerNorm, nn.GroupNorm)):
            continue  # widths of the residual stream: reported through the groups that read them
        elif not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            shapes = ", ".join(str(list(p.shape)) for p in m.parameters(recurse=False) if p.dim() >= 2)
            out[name] = (f"{type(m).__name__} holds weights {shapes} itself, outside any Linear or Conv2d layer; "
                         "structured pruning cuts the channels of Linear and Conv2d layers")
        elif name in writers:
            out[name] = ("its outputs are the model's outputs, kept whole, and the channels it reads are in no group "
                         "that could be cut")
        else:
            out[name] = _UNFOLLOWED
    return out


def output_writers(model: nn.Module, batch: Batch) -> set[str]:
    """The weight-holding modules whose output tensor is itself one of ``model``'s outputs on ``batch``."""
    seen: dict[int, str] = {}

    def hook(name: str, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            seen.setdefault(out.data_ptr(), name)

    handles = [m.register_forward_hook(partial(hook, n)) for n, m in _weight_holders(model) if n]
    try:
        with torch.no_grad(), modes_kept(model):
            y = call(model.eval(), batch)
    finally:
        for h in handles:
            h.remove()
    return {seen[t.data_ptr()] for t in tensors_of(y) if t.data_ptr() in seen}


def pruned_coverage(model: nn.Module, keep: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    """``core.fidelity.coverage`` for a structured plan: the layers it cuts count as compressed."""
    cut = [n for n, _ in _weight_holders(model) if n in keep]
    return coverage(model, cut, skipped)
