"""Search, then apply: the pruning plan (channels kept per layer, or weights kept per layer).

``search`` scores channels or weights and decides what stays; ``apply_plan`` (``cut.py``) cuts a
base model to the plan deterministically and without data, which is how ``sk.load`` replays a
structured plan before loading the pruned weights.

Structured: each coupled group of channels (``dependency.dependency_groups``) keeps the same
``1 - sparsity`` fraction, rounded up to a multiple of ``round_to`` and never below one channel;
a channel's score is its group norm (Fang et al. 2023): the sum, over every layer of the group, of
the channel's weight scores there (the producer's output row, each reader's input column, the
BatchNorm scale; the square root of the sum for l2; depthwise filters, nine weights a channel, left
out as Torch-Pruning leaves them out). Frozen
groups (model inputs and outputs, excluded modules, ops the tracer does not follow) are kept
whole, and the plan says why.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import (
    Batch,
    call,
    call_checked,
    check_batches,
    model_inputs,
    modes_kept,
    tensors_of,
)
from slimkit.core.bn import recalibrate_batchnorm
from slimkit.core.config import register
from slimkit.core.graph import TraceError
from slimkit.core.layers import canonicalize, is_linear_like, tied_weights
from slimkit.core.plans import attach, register_plan

from .allocate import global_counts, keep_count, kept_channels
from .config import PruneConfig
from .cut import apply_plan, dim_size
from .dependency import Group, Member, dependency_groups
from .importance import taylor_importance, weight_scores
from .layers import rule_for
from .masks import fraction_mask, global_masks, nm_view, weight_nm_mask
from .probe import probed_groups
from .report import left_whole, output_writers, pruned_coverage
from .transformer import transformer_blocks, transformer_groups

__all__ = ["PrunePlan", "search", "apply_plan", "prune_model"]

log = logging.getLogger(__name__)


@dataclass
class PrunePlan:
    """``keep_``: for structured pruning, per module the kept indices of its output (``out``) and
    input (``in``) dimensions, with the original sizes in ``sizes_``. ``groups_``: one line per
    coupled group (channels before and after, members, or why it was kept whole). ``sparsity_``:
    for unstructured and N:M pruning, the fraction of zeros per layer."""

    config: PruneConfig
    keep_: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    sizes_: dict[str, list[int]] = field(default_factory=dict)
    groups_: list[dict[str, Any]] = field(default_factory=list)
    sparsity_: dict[str, float] = field(default_factory=dict)
    attrs_: dict[str, dict[str, int]] = field(default_factory=dict)  # attention heads left per module
    dropped_: list[str] = field(default_factory=list)  # depth pruning: blocks replaced by the identity
    scores_: dict[str, float] = field(default_factory=dict)  # depth pruning: output change without each block
    skipped: dict[str, str] = field(default_factory=dict)  # layers left alone, with the reason
    coverage_: dict[str, Any] = field(default_factory=dict)  # structured: share of the weights in cut layers
    kind = "prune"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict(), "keep": self.keep_, "sizes": self.sizes_,
                "groups": self.groups_, "sparsity": self.sparsity_, "attrs": self.attrs_, "dropped": self.dropped_,
                "scores": self.scores_, "skipped": self.skipped, "coverage": self.coverage_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        return cls(config=PruneConfig.from_dict(d["config"]),
                   keep_={str(k): {str(r): [int(i) for i in v] for r, v in roles.items()} for k, roles in d["keep"].items()},
                   sizes_={str(k): [int(x) for x in v] for k, v in d.get("sizes", {}).items()},
                   groups_=list(d.get("groups", [])), sparsity_={str(k): float(v) for k, v in d.get("sparsity", {}).items()},
                   attrs_={str(k): {str(a): int(v) for a, v in attrs.items()} for k, attrs in d.get("attrs", {}).items()},
                   dropped_=[str(n) for n in d.get("dropped", [])],
                   scores_={str(k): float(v) for k, v in d.get("scores", {}).items()},
                   skipped={str(k): str(v) for k, v in d.get("skipped", {}).items()},
                   coverage_=dict(d.get("coverage", {})))

    def summary(self) -> str:
        if self.config.method == "depth":
            rows = ["| block | output change without it | removed |", "|---|---|---|"]
            return "\n".join(rows + [f"| {n} | {s:.3g} | {'yes' if n in self.dropped_ else ''} |"
                                     for n, s in self.scores_.items()])
        if self.config.method != "structured":
            rows = ["| layer | zeros |", "|---|---|"]
            return "\n".join(rows + [f"| {n} | {s:.1%} |" for n, s in self.sparsity_.items()]
                             + [f"| {n} | left alone: {why} |" for n, why in self.skipped.items()])
        rows = ["| group | channels | members | note |", "|---|---|---|---|"]
        for i, g in enumerate(self.groups_):
            rows.append(f"| {i} | {g['channels']} -> {g['kept']} | {', '.join(g['members'][:4])}"
                        f"{' ...' if len(g['members']) > 4 else ''} | {g.get('frozen') or ''} |")
        rows += [f"| - | - | {n} | left alone: {why} |" for n, why in self.skipped.items()]
        return "\n".join(rows)


def _prunable(model: nn.Module, cfg: PruneConfig) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for name in cfg.layers + cfg.exclude:
        if name not in modules:
            raise ValueError(f"no module named {name!r} in {type(model).__name__}")
    out: dict[str, nn.Module] = {}
    for name, m in modules.items():
        # linear-like layers (HF's Conv1D, weight [in, out]) for unstructured pruning: zeros are elementwise
        if not isinstance(m, (nn.Linear, nn.Conv2d)) and not (cfg.method == "unstructured" and is_linear_like(m)):
            continue
        if cfg.layers and name not in cfg.layers:
            continue
        if any(name == e or name.startswith(e + ".") for e in cfg.exclude):
            continue
        if not torch.isfinite(m.weight).all():
            raise ValueError(f"layer {name!r} has NaN or infinite weights")
        out[name] = m
    for name in cfg.layers:
        if name not in out:
            raise ValueError(f"layer {name!r} is a {type(modules[name]).__name__}; pruning takes Linear and Conv2d")
    if not out:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    return out


def _scores(m: nn.Module, name: str, cfg: PruneConfig, grads: dict[str, Tensor] | None) -> Tensor | None:
    """Per-weight scores of a layer: |w| or w^2, or the accumulated |w * grad| (None: no gradient)."""
    if cfg.importance == "taylor":
        assert grads is not None
        return grads.get(f"{name}.weight")
    rule = rule_for(m)
    if rule is not None:  # a layer type taught with register_prunable scores by its rule's weight
        w = rule.weight(m)
        return None if w is None else weight_scores(w.detach(), cfg.importance)
    return weight_scores(m.weight, cfg.importance)  # type: ignore[arg-type]


def _member_scores(modules: dict[str, nn.Module], mb: Member, size: int, cfg: PruneConfig,
                   grads: dict[str, Tensor] | None) -> Tensor | None:
    """One layer's share of each channel's group score, unnormalized: the sum of the channel's
    weight scores in that layer (its output row, its input column or its BatchNorm scale)."""
    m = modules[mb.module]
    if mb.role == "dw":
        return None  # as in Torch-Pruning's group norm (benchmarks/results/pruning_peer.md: the same channels)
    if mb.role == "bn":
        if getattr(m, "weight", None) is None:
            return None  # a BatchNorm without affine scale has no say
        s = _scores(m, mb.module, cfg, grads)
        return None if s is None else s.double()[mb.offset:mb.offset + size]
    s = _scores(m, mb.module, cfg, grads)
    if s is None:
        return None
    if mb.role == "out":
        rows = s.reshape(s.shape[0], -1).double().sum(1)
    elif isinstance(m, nn.Conv2d) and m.groups > 1:  # grouped: input c is column c % (in / groups) of its group's rows
        rows = s.reshape(m.groups, s.shape[0] // m.groups, s.shape[1], -1).double().sum((1, 3)).flatten()
    else:  # "in": input features offset + c * repeat ... + repeat
        rows = s.transpose(0, 1).reshape(s.shape[1], -1).double().sum(1)
    return rows[mb.offset:mb.offset + size * mb.repeat].reshape(size, mb.repeat).sum(1)


def _search_structured(model: nn.Module, cfg: PruneConfig, example: Batch, grads: dict[str, Tensor] | None) -> PrunePlan:
    check_batches([example], "example_inputs")  # NaN or inf: named, before any tracing or probing
    with torch.no_grad(), modes_kept(model):  # a batch the model cannot take: the layer it does not fit
        call_checked(model.eval(), example, "example_inputs")
    plan = PrunePlan(config=cfg)
    modules = dict(model.named_modules())
    chosen = _prunable(model, cfg)
    blocks = transformer_blocks(model)
    groups = transformer_groups(model, cfg.exclude) if blocks else _channel_groups(model, example, cfg.exclude)
    masks: dict[tuple[str, str], Tensor] = {}
    candidates: list[tuple[Any, dict[str, Any], Tensor, int]] = []  # group, its entry, scores, rounding
    for g in groups:
        names = sorted({mb.module for mb in g.members})
        entry: dict[str, Any] = {"channels": g.size, "kept": g.size, "members": names,
                                 "producers": sorted({mb.module for mb in g.members if mb.role == "out"})}
        frozen = g.frozen
        if frozen is None and not any(mb.role == "out" for mb in g.members):
            frozen = "no layer produces these channels"
        if frozen is None and cfg.layers and not any(mb.module in chosen for mb in g.members if mb.role == "out"):
            frozen = "not in layers"
        if frozen is None and g.size < 2:
            frozen = "a single channel"
        if frozen is not None:
            entry["frozen"] = frozen
            plan.groups_.append(entry)
            continue
        scores = [s for mb in g.members if (s := _member_scores(modules, mb, g.size, cfg, grads)) is not None]
        if not scores:
            entry["frozen"] = "no scores (no gradient reached these layers)"
            plan.groups_.append(entry)
            continue
        total = torch.stack(scores).sum(0)  # the group norm (DepGraph): summed over every layer it cuts
        if cfg.importance == "l2":
            total = total.sqrt()
        whole_units = any(mb.repeat > 1 and mb.role == "out" for mb in g.members)  # heads: round_to is in features
        candidates.append((g, entry, total / total.mean().clamp_min(1e-12), 1 if whole_units else cfg.round_to))
        plan.groups_.append(entry)
    counts = global_counts(candidates, cfg.sparsity) if cfg.scope == "global" else \
        [keep_count(g.size, cfg.sparsity, r) for g, _, _, r in candidates]
    for (g, entry, total, _), k in zip(candidates, counts, strict=True):
        kept = kept_channels(total, k, g.chunks) if k < g.size else torch.arange(g.size)
        entry["kept"] = int(kept.numel())
        if entry["kept"] == g.size:
            continue
        for name, at in g.attrs.items():  # an attention module's head counts
            plan.attrs_.setdefault(name, {}).update({a: entry["kept"] * unit for a, unit in at.items()})
        keep = torch.zeros(g.size, dtype=torch.bool)
        keep[kept] = True
        for mb in g.members:
            m = modules[mb.module]
            role = "in" if mb.role == "in" else "out"
            dim = dim_size(m, role)
            mask = masks.setdefault((mb.module, role), torch.ones(dim, dtype=torch.bool))
            seg = keep.repeat_interleave(mb.repeat)
            mask[mb.offset:mb.offset + seg.numel()] &= seg
    for (name, role), mask in sorted(masks.items()):
        m = modules[name]
        plan.keep_.setdefault(name, {})[role] = mask.nonzero().flatten().tolist()
        plan.sizes_[name] = [dim_size(m, "out"), dim_size(m, "in")]
    for b in blocks:
        pre = f"{b}." if b else ""
        q = f"{pre}attention.self.query"
        if q in plan.keep_ and "out" in plan.keep_[q]:
            d = int(modules[f"{pre}attention.self"].attention_head_size)  # type: ignore[arg-type]
            n = len(plan.keep_[q]["out"]) // d
            plan.attrs_[f"{pre}attention.self"] = {"num_attention_heads": n, "all_head_size": n * d}
    plan.skipped = left_whole(model, plan.keep_, groups, plan.groups_, cfg.exclude, output_writers(model, example))
    plan.coverage_ = pruned_coverage(model, plan.keep_, plan.skipped)
    if not plan.keep_:
        reasons = sorted({g.get("frozen", "") for g in plan.groups_} - {""})
        if not plan.groups_:
            raise ValueError(f"nothing to prune in {type(model).__name__}: no layer's output channels are read one "
                             "to one by another layer (layers that run more than once, such as shared blocks, and "
                             "weights held outside Linear/Conv2d layers, such as expert banks, are not followed)")
        raise ValueError(f"nothing to prune in {type(model).__name__} at sparsity {cfg.sparsity}: every channel "
                         f"group is kept whole ({'; '.join(reasons[:4]) or 'too small'}); a layer type of your own "
                         "is taught with slimkit.prune.register_prunable")
    return plan


def _channel_groups(model: nn.Module, example: Batch, exclude: tuple[str, ...]) -> list[Group]:
    """The coupled channel groups: read off the torch.fx graph where the model traces, else found
    by probing it (``probe.py``: Hugging Face decoders, vision transformers, data-dependent code)."""
    if not isinstance(example, Mapping):
        try:
            groups = dependency_groups(model, example, exclude)
            if any(g.frozen is None for g in groups):
                return groups
            log.info("the graph gives no prunable channel group (Linear layers on [batch, tokens, features]?); "
                     "probing the model instead")
            probed = probed_groups(model, example, exclude)
            return probed if any(g.frozen is None for g in probed) else groups
        except TraceError as e:
            log.info("%s; finding the channel groups by probing the model instead", e)
    return probed_groups(model, example, exclude)


def _search_sparse(model: nn.Module, cfg: PruneConfig, grads: dict[str, Tensor] | None) -> tuple[PrunePlan, dict[str, Tensor]]:
    plan = PrunePlan(config=cfg)
    chosen = _prunable(model, cfg)
    tied = tied_weights(model)
    for n in [n for n in chosen if n in tied and n not in cfg.layers]:
        # a language model's head tied to its embedding table: zeros there would blank token embeddings
        plan.skipped[n] = f"its weight is tied to {tied[n][0]!r}; zeros in it would change that layer too"
        del chosen[n]
    if not chosen:
        raise ValueError(f"every prunable layer of {type(model).__name__} is left alone: {plan.skipped}")
    scores: dict[str, Tensor] = {}
    for n, m in chosen.items():
        sc = _scores(m, n, cfg, grads)
        if sc is None:
            raise ValueError(f"layer {n!r} got no gradient from the data; exclude it or use l1/l2 importance")
        scores[n] = sc
    masks: dict[str, Tensor] = {}
    if cfg.method == "nm":
        for n, s in scores.items():
            if nm_view(s).shape[-1] % cfg.m:
                if cfg.layers:
                    raise ValueError(f"layer {n!r}: {nm_view(s).shape[-1]} input channels are not a multiple of m={cfg.m}")
                log.info("n:m: skipping %s (%d input channels)", n, nm_view(s).shape[-1])
                continue
            masks[n] = weight_nm_mask(s, cfg.n, cfg.m)
        if not masks:
            raise ValueError(f"no layer has a multiple of m={cfg.m} input channels for {cfg.n}:{cfg.m} sparsity")
    elif cfg.scope == "layer":
        masks = {n: fraction_mask(s, cfg.sparsity) for n, s in scores.items()}
    else:
        masks = dict(zip(scores, global_masks(list(scores.values()), cfg.sparsity), strict=True))
        for n, mk in masks.items():
            if not mk.any():  # never leave a layer with nothing: keep its strongest weight
                mk.view(-1)[int(scores[n].argmax())] = True
    for n, mk in masks.items():
        plan.sparsity_[n] = 1.0 - float(mk.float().mean())
    return plan, masks


def search(model: nn.Module, cfg: PruneConfig, example_inputs: Batch | None = None,
           data: Iterable[Batch] | None = None) -> tuple[PrunePlan, dict[str, Tensor]]:
    """Decide what stays. Returns the plan and, for unstructured / N:M pruning, the weight masks."""
    grads = None
    if cfg.importance == "taylor":
        if data is None:
            raise ValueError("importance 'taylor' needs data: batches of inputs, or (inputs, labels), for the gradients")
        grads = taylor_importance(model, data)
    if cfg.method == "structured":
        if example_inputs is None:
            raise ValueError("structured pruning needs example_inputs (a batch the model is called with) to trace it")
        return _search_structured(model, cfg, example_inputs, grads), {}
    if cfg.method == "depth":
        if example_inputs is None:
            raise ValueError("depth pruning needs example_inputs (a batch the model is called with) to find the blocks")
        return _search_depth(model, cfg, example_inputs, data), {}
    return _search_sparse(model, cfg, grads)


def _search_depth(model: nn.Module, cfg: PruneConfig, example: Batch, data: Iterable[Batch] | None) -> PrunePlan:
    from .depth import block_scores, candidates

    for name in cfg.layers + cfg.exclude:
        if name not in dict(model.named_modules()):
            raise ValueError(f"no module named {name!r} in {type(model).__name__}")
    found = [n for n, _ in candidates(model, example, cfg.exclude)]
    if cfg.layers:
        found = [n for n in found if n in cfg.layers]
    if not found:
        raise ValueError(f"{type(model).__name__} has no block that depth pruning can remove (a block in a Sequential "
                         "or ModuleList whose output has its input's shape)")
    batches = [model_inputs(b) for b in data] if data is not None else [example]
    scores = block_scores(model, found, batches)
    k = int(round(cfg.sparsity * len(found)))
    dropped = sorted(found, key=lambda n: scores[n])[:k]
    log.info("depth pruning: removing %d of %d removable blocks: %s", k, len(found), ", ".join(dropped) or "none")
    return PrunePlan(cfg, dropped_=[n for n in found if n in dropped], scores_=scores)


@register(PruneConfig)
def prune_model(model: nn.Module, cfg: PruneConfig, example_inputs: Batch | None = None,
                data: Iterable[Batch] | None = None, inplace: bool = False) -> nn.Module:
    listed = check_batches(data, "data") if data is not None else None
    if example_inputs is None and listed and cfg.method in ("structured", "depth"):
        example_inputs = model_inputs(listed[0])
    if cfg.method == "structured" and any(is_linear_like(m) for m in model.modules()):
        work = model if inplace else copy.deepcopy(model)  # Hugging Face's Conv1D, as the Linear it is
        canonicalize(work)
        plan, masks = search(work, cfg, example_inputs, listed)
        out = apply_plan(work, plan, inplace=True, masks=masks)
        attach(out, model, plan)
    else:
        plan, masks = search(model, cfg, example_inputs, listed)
        out = apply_plan(model, plan, inplace=inplace, masks=masks)
    if listed and cfg.recalibrate_bn:
        n = recalibrate_batchnorm(out, listed)
        if n:
            log.info("re-estimated the statistics of %d BatchNorm layers on %d batches", n, len(listed))
    if cfg.method in ("structured", "depth"):
        assert example_inputs is not None
        before = sum(p.numel() for p in model.parameters()) if not inplace else None
        with torch.no_grad():
            was = out.training
            y = call(out.eval(), example_inputs)
            out.train(was)
        if not all(torch.isfinite(t).all() for t in tensors_of(y)):
            raise RuntimeError("the pruned model gives non-finite outputs on the example inputs")
        after = sum(p.numel() for p in out.parameters())
        log.info("%s pruning: %s parameters -> %d; %d groups cut", cfg.method, before, after,
                 sum(1 for g in plan.groups_ if g["kept"] < g["channels"]))
        fraction = plan.coverage_.get("fraction", 1.0)
        if fraction < 0.5:
            alone = sorted(plan.skipped.items())
            log.warning("structured pruning cut layers holding only %.0f%% of the weights of %s; left whole: %s%s",
                        100 * fraction, type(model).__name__, "; ".join(f"{n} ({why})" for n, why in alone[:3]),
                        " ..." if len(alone) > 3 else "")
    return out


register_plan("prune", "pruning", PrunePlan.from_dict,
              lambda base, plan: apply_plan(base, plan, inplace=True, structure_only=True))  # the weights follow
