"""Applying a pruning plan: slice every planned layer to its kept channels (and BatchNorm with
it), set attention modules' head counts, drop blocks, or zero the masked weights. Deterministic
and data-free, so ``sk.load`` replays a plan on a fresh base model before loading its weights."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from slimkit.core.layers import canonicalize, restore
from slimkit.core.plans import attach

from .importance import weight_scores
from .layers import rule_for
from .masks import fraction_mask, weight_nm_mask

if TYPE_CHECKING:
    from .plan import PrunePlan

__all__ = ["apply_plan", "dim_size"]


def dim_size(m: nn.Module, role: str) -> int:
    """The size of a prunable layer's output (``role="out"``) or input dimension."""
    rule = rule_for(m)
    if rule is not None:
        return rule.out_channels(m) if role == "out" else rule.in_channels(m)
    if isinstance(m, nn.Conv2d):
        return m.out_channels if role == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if role == "out" else m.in_features
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return m.num_features
    raise ValueError(f"cannot prune a {type(m).__name__}")


def _set(m: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(m, name)
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        setattr(m, name, value.clone())


@torch.no_grad()
def _cut(name: str, m: nn.Module, roles: dict[str, list[int]]) -> None:
    out = torch.tensor(roles["out"], dtype=torch.long) if "out" in roles else None
    inn = torch.tensor(roles["in"], dtype=torch.long) if "in" in roles else None
    rule = rule_for(m)
    if rule is not None:  # a layer type taught with register_prunable
        rule.cut(m, out, inn)
        return
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        assert out is not None
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, attr, None) is not None:
                _set(m, attr, getattr(m, attr)[out])
        m.num_features = len(out)
        return
    if not isinstance(m, (nn.Conv2d, nn.Linear)):
        raise ValueError(f"the plan does not match this model: {name!r} is a {type(m).__name__}")
    w = m.weight
    if isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.groups > 1:  # depthwise
        if inn is not None:
            raise ValueError(f"the plan does not match this model: {name!r} is a depthwise conv")
        if out is not None:
            w = w[out]
            m.groups = m.in_channels = m.out_channels = len(out)
    elif isinstance(m, nn.Conv2d) and m.groups > 1:  # grouped: each group keeps as many inputs and outputs
        w = _cut_grouped(name, m, out, inn)
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    else:
        if out is not None:
            w = w[out]
        if inn is not None:
            w = w[:, inn]
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = w.shape[0], w.shape[1]
        else:
            m.out_features, m.in_features = w.shape[0], w.shape[1]
    _set(m, "weight", w)
    if m.bias is not None and out is not None:
        _set(m, "bias", m.bias[out])


def _cut_grouped(name: str, m: nn.Conv2d, out: Tensor | None, inn: Tensor | None) -> Tensor:
    """A grouped conv's weight ``[out, in / groups, k, k]`` cut to the kept output channels and,
    within each group, the kept input channels (the same number in every group)."""
    g, per_in, per_out = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
    out = torch.arange(m.out_channels) if out is None else out
    inn = torch.arange(m.in_channels) if inn is None else inn
    rows, cols = [out[out // per_out == i] for i in range(g)], [inn[inn // per_in == i] % per_in for i in range(g)]
    if len({len(r) for r in rows}) != 1 or len({len(c) for c in cols}) != 1 or not len(rows[0]) or not len(cols[0]):
        raise ValueError(f"the plan does not match this model: grouped conv {name!r} ({g} groups) must keep the "
                         "same number of input and of output channels in every group")
    return torch.cat([m.weight[r][:, c] for r, c in zip(rows, cols, strict=True)])


def apply_plan(base: nn.Module, plan: PrunePlan, inplace: bool = False, masks: dict[str, Tensor] | None = None,
               structure_only: bool = False) -> nn.Module:
    """Cut ``base`` (a copy unless ``inplace``) to the plan. Structured: slice every planned module.
    Unstructured / N:M: zero the masked weights; without ``masks``, magnitude plans recompute them
    from the recorded sparsities (``structure_only`` skips this: the caller loads the weights)."""
    model = base if inplace else copy.deepcopy(base)
    cfg = plan.config
    if cfg.method == "structured":
        canonicalize(model)  # Hugging Face's Conv1D sliced as the Linear it is
    modules = dict(model.named_modules())
    if cfg.method == "structured":
        for name, roles in plan.keep_.items():
            m = modules.get(name)
            if m is None:
                raise ValueError(f"the plan does not match this model: no layer named {name!r}")
            sizes = plan.sizes_.get(name)
            if sizes is not None and [dim_size(m, "out"), dim_size(m, "in")] != sizes:
                raise ValueError(f"the plan does not match this model: layer {name!r} has (out, in) = "
                                 f"{[dim_size(m, 'out'), dim_size(m, 'in')]}, the plan was made for {sizes}")
            _cut(name, m, roles)
        for name, attrs in plan.attrs_.items():
            m = modules.get(name)
            if m is None or not all(type(getattr(m, a, None)) is int and type(v) is int and v > 0 for a, v in attrs.items()):
                raise ValueError(f"the plan does not match this model: {name!r} is not an attention module with "
                                 f"integer head counts or widths {sorted(attrs)}")
            for a, v in attrs.items():
                setattr(m, a, v)
    elif cfg.method == "depth":
        from .depth import drop_blocks

        drop_blocks(model, plan.dropped_)
    elif not structure_only:
        if masks is None:
            if cfg.importance == "taylor":
                raise ValueError("a taylor plan's masks come from data and are not saved: load the saved model "
                                 "with sk.load, or prune again with data")
            masks = {}
            for name, sparsity in plan.sparsity_.items():
                m = modules.get(name)
                if m is None:
                    raise ValueError(f"the plan does not match this model: no layer named {name!r}")
                s = weight_scores(m.weight, cfg.importance)  # type: ignore[arg-type]
                masks[name] = weight_nm_mask(s, cfg.n, cfg.m) if cfg.method == "nm" else fraction_mask(s, sparsity)
        with torch.no_grad():
            for name, mk in masks.items():
                modules[name].weight.mul_(mk.to(modules[name].weight.dtype))  # type: ignore[operator, union-attr]
    restore(model)
    attach(model, base, plan)
    return model
