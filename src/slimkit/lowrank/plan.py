"""Search, then apply: the factorization plan (ranks per layer) and the global rank allocation.

``search`` decides the ranks: per layer from the config (uniform), or, with ``allocation="global"``,
by measuring each layer's sensitivity at a grid of ranks and spending a parameter budget greedily
where it buys the most (largest error reduction per parameter, the classic greedy for a
separable knapsack). ``apply_plan`` rebuilds the factorized model from a base and a plan,
deterministically and without data, which is how ``sk.load`` replays it.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, check_batches, output_error, tensors_of
from slimkit.core.config import register
from slimkit.core.dropin import replace_module
from slimkit.core.layers import canonicalize, is_linear_like, restore, tied_weights
from slimkit.core.plans import attach, register_plan
from slimkit.core.progress import progress

from .config import FactorizeConfig
from .layers import (
    approx_weight,
    factorized,
    param_count,
    ranks_for_energy,
    ranks_for_rank,
    ranks_for_ratio,
    weight_count,
    why_not,
)
from .whitened_svd import covariance_update, whitening_factor

__all__ = ["FactorPlan", "search", "apply_plan", "factorize_model", "input_covariances", "GRID"]

log = logging.getLogger(__name__)

GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # parameter fractions tried


@dataclass
class FactorPlan:
    """Ranks per layer (``ranks_``), layers left alone and why (``skipped``), weights before and
    after (``params_``), and the measured sensitivity curves of a global allocation."""

    config: FactorizeConfig
    ranks_: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    params_: dict[str, list[int]] = field(default_factory=dict)
    sensitivity_: dict[str, list[list[float]]] = field(default_factory=dict)
    # data-whitened SVD: each layer's input whitening factor (float32; in memory, not in to_dict:
    # sk.save keeps the factorized weights themselves, so a reload needs only the ranks)
    whitening_: dict[str, Tensor] = field(default_factory=dict, repr=False)
    kind = "lowrank"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict(), "ranks": self.ranks_,
                "skipped": self.skipped, "params": self.params_, "sensitivity": self.sensitivity_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FactorPlan:
        return cls(config=FactorizeConfig.from_dict(d["config"]),
                   ranks_={str(k): [int(r) for r in v] for k, v in d["ranks"].items()},
                   skipped=dict(d.get("skipped", {})), params_=dict(d.get("params", {})),
                   sensitivity_=dict(d.get("sensitivity", {})))

    def summary(self) -> str:
        """A markdown table: layer, ranks, weights before and after."""
        rows = ["| layer | ranks | weights | kept |", "|---|---|---|---|"]
        for name, ranks in self.ranks_.items():
            before, after = self.params_[name]
            rows.append(f"| {name} | {'x'.join(map(str, ranks))} | {before} -> {after} | {after / before:.0%} |")
        rows += [f"| {name} | skipped: {why} | | |" for name, why in self.skipped.items()]
        return "\n".join(rows)


def _candidates(model: nn.Module, cfg: FactorizeConfig) -> tuple[list[str], dict[str, str]]:
    modules = dict(model.named_modules())
    skipped: dict[str, str] = {}
    if cfg.layers:
        for name in cfg.layers:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"layers: no module named {name!r} in {type(model).__name__}{hint}")
            reason = why_not(cfg.method, modules[name])
            if reason is not None:
                raise ValueError(f"layer {name!r} cannot take {cfg.method}: {reason}")
        return list(cfg.layers), skipped
    names = []
    kinds = (nn.Linear, nn.Conv2d) if cfg.method == "svd" else (nn.Conv2d,)
    tied = tied_weights(model)
    for name, m in modules.items():
        if isinstance(m, kinds):
            reason = why_not(cfg.method, m)
            if reason is None and name in tied:  # a language model's head tied to its embedding table
                reason = (f"its weight is tied to {tied[name][0]!r}; factorized, the two would be apart and "
                          "the model would grow")
            if reason is None:
                names.append(name)
            else:
                skipped[name] = reason
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer that {cfg.method} can factorize"
                         + (f" (skipped: {skipped})" if skipped else ""))
    return names, skipped


@torch.no_grad()
def input_covariances(model: nn.Module, names: list[str], data: list[Batch]) -> dict[str, Tensor]:
    """``sum x^T x`` of the inputs each named Linear / 1x1 conv sees on ``data`` (float64; for a
    conv, the pixels it reads after padding and stride). The model runs in eval mode; the
    caller's train/eval flags are restored."""
    modules = dict(model.named_modules())
    covs: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            if isinstance(mod, nn.Conv2d):
                ph, pw = int(mod.padding[0]), int(mod.padding[1])
                x = F.pad(x, (pw, pw, ph, ph))[..., :: mod.stride[0], :: mod.stride[1]].movedim(1, -1)
            covs[name] = covariance_update(covs.get(name), x)
        return record

    flags = {m: m.training for m in model.modules()}
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        model.eval()
        for b in progress(data, desc="input statistics"):
            call(model, b)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
    never = [n for n in names if n not in covs]
    if never:
        raise ValueError(f"layer {never[0]!r} never ran on the data, so it has no input statistics"
                         + (f" (and {len(never) - 1} more)" if len(never) > 1 else ""))
    return covs


def _whitening(model: nn.Module, names: list[str], data: list[Batch]) -> dict[str, Tensor]:
    out = {}
    for name, cov in input_covariances(model, names, data).items():
        try:
            out[name] = whitening_factor(cov).float()
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from e
    return out


def _uniform_ranks(cfg: FactorizeConfig, name: str, m: nn.Module, factor: Tensor | None = None) -> list[int]:
    try:
        if cfg.rank is not None:
            return ranks_for_rank(cfg.method, m, cfg.rank)
        if cfg.energy is not None:
            return ranks_for_energy(cfg.method, m, cfg.energy, None if factor is None else factor.double())
        assert cfg.ratio is not None
        return ranks_for_ratio(cfg.method, m, cfg.ratio)
    except ValueError as e:
        raise ValueError(f"layer {name!r}: {e}") from e


class _Sensitivity:
    """Error of the model (or the layer) when one layer alone is factorized at given ranks."""

    def __init__(self, model: nn.Module, cfg: FactorizeConfig, data: list[Batch] | None,
                 metric: Callable[[nn.Module], float] | None, factors: dict[str, Tensor] | None = None) -> None:
        self.cfg, self.data, self.metric, self.factors = cfg, data, metric, factors or {}
        self.work = copy.deepcopy(model).eval()
        self.modules = dict(self.work.named_modules())
        with torch.no_grad():
            self.ref = [tensors_of(call(self.work, b)) for b in data] if data else None
        self.base = metric(self.work) if metric is not None else None

    @torch.no_grad()
    def __call__(self, name: str, ranks: list[int]) -> float:
        m = self.modules[name]
        factor = self.factors[name].double() if name in self.factors else None
        if self.metric is None and self.ref is None:
            w = m.weight.detach().double()  # type: ignore[union-attr, operator]
            err = approx_weight(self.cfg.method, m, ranks, self.cfg.iterations, factor).double() - w
            return float(err.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        replace_module(self.work, name, factorized(self.cfg.method, m, ranks, self.cfg.iterations, factor))
        try:
            if self.metric is not None:
                assert self.base is not None
                return float(self.base - self.metric(self.work))
            assert self.data is not None and self.ref is not None
            return output_error(self.work, self.data, self.ref)
        finally:
            replace_module(self.work, name, m)


def _allocate(options: dict[str, list[tuple[int, float, list[int] | None]]], budget: float) -> dict[str, int]:
    """Greedy knapsack: from the cheapest option of every layer, repeatedly take the upgrade with
    the largest error reduction per parameter that still fits the budget."""
    choice = dict.fromkeys(options, 0)
    spent = sum(opts[0][0] for opts in options.values())
    if spent > budget:
        raise ValueError(f"the budget ({budget:.0f} weights) is below what the smallest ranks need ({spent}); raise ratio")
    while True:
        best: tuple[float, str, int] | None = None
        for name, opts in options.items():
            cost, err, _ = opts[choice[name]]
            for j in range(choice[name] + 1, len(opts)):
                dc, de = opts[j][0] - cost, err - opts[j][1]
                if dc > 0 and de > 0 and spent + dc <= budget and (best is None or de / dc > best[0]):
                    best = (de / dc, name, j)
        if best is None:
            return choice
        _, name, j = best
        spent += options[name][j][0] - options[name][choice[name]][0]
        choice[name] = j


def search(model: nn.Module, cfg: FactorizeConfig, data: Iterable[Batch] | None = None,
           metric: Callable[[nn.Module], float] | None = None, sensitivity_batches: int = 2) -> FactorPlan:
    """Choose the ranks for every layer ``cfg`` selects. Data or a metric are only used by the
    global allocation (data: relative output error; metric: higher is better, its drop is the error)."""
    names, skipped = _candidates(model, cfg)
    plan = FactorPlan(config=cfg, skipped=skipped)
    modules = dict(model.named_modules())
    for name in names:
        if not torch.isfinite(modules[name].weight).all():  # type: ignore[arg-type]
            raise ValueError(f"layer {name!r} has NaN or infinite weights; nothing can be factorized from them")
    listed = check_batches(data, "data") if data is not None else None  # once: data may be an iterator
    if cfg.whiten:
        if listed is None:
            raise ValueError("whiten=True needs data: the whitening comes from each layer's inputs on it")
        plan.whitening_ = _whitening(model, names, listed)
    chosen: dict[str, list[int]] = {}
    if cfg.allocation == "uniform":
        for name in names:
            try:
                chosen[name] = _uniform_ranks(cfg, name, modules[name], plan.whitening_.get(name))
            except ValueError as e:
                if cfg.layers:  # the user named this layer: say why it cannot be done
                    raise
                plan.skipped[name] = str(e).split(": ", 1)[1]
    else:
        assert cfg.ratio is not None
        batches = listed[:sensitivity_batches] if listed is not None else None
        sens = _Sensitivity(model, cfg, batches, metric, plan.whitening_)
        options: dict[str, list[tuple[int, float, list[int] | None]]] = {}
        for name in progress(names, desc="rank sensitivity"):
            m, full = modules[name], weight_count(modules[name])
            seen: set[tuple[int, ...]] = set()
            opts: list[tuple[int, float, list[int] | None]] = []
            for frac in GRID:
                ranks = ranks_for_ratio(cfg.method, m, frac)
                cost = param_count(cfg.method, m, ranks)
                if tuple(ranks) in seen or cost >= full:
                    continue
                seen.add(tuple(ranks))
                opts.append((cost, sens(name, ranks), ranks))
            opts.append((full, 0.0, None))  # keep the layer whole
            options[name] = opts
            plan.sensitivity_[name] = [[c / full, e] for c, e, _ in opts]
        budget = cfg.ratio * sum(weight_count(modules[n]) for n in names)
        for name, j in _allocate(options, budget).items():
            picked = options[name][j][2]
            if picked is None:
                plan.skipped[name] = "kept whole by the global allocation"
            else:
                chosen[name] = picked
    for name, ranks in chosen.items():
        m = modules[name]
        before, after = weight_count(m), param_count(cfg.method, m, ranks)
        if after >= before:
            plan.skipped[name] = f"ranks {ranks} would not save weights ({after} >= {before})"
            continue
        plan.ranks_[name] = ranks
        plan.params_[name] = [before, after]
    if not plan.ranks_:
        shown = dict(list(plan.skipped.items())[-5:])
        more = f" and {len(plan.skipped) - len(shown)} more" if len(plan.skipped) > len(shown) else ""
        raise ValueError(f"no layer would get smaller with {cfg.to_dict()}: {shown}{more}")
    return plan


def apply_plan(base: nn.Module, plan: FactorPlan, inplace: bool = False, structure_only: bool = False) -> nn.Module:
    """Replace every planned layer of ``base`` (a copy unless ``inplace``) by its factorization.

    A whitened plan needs its whitening factors (held by the plan that ``search`` made, not saved
    in its dict); ``structure_only`` builds the right shapes without them, for a caller that loads
    the factorized weights next, as ``sk.load`` does."""
    if plan.config.whiten and not structure_only:
        lost = [n for n in plan.ranks_ if n not in plan.whitening_]
        if lost:
            raise ValueError(f"this whitened plan has no whitening factor for layer {lost[0]!r} (factors are not "
                             "saved, only ranks): load the saved model with sk.load, or factorize again with data")
    model = base if inplace else copy.deepcopy(base)
    canonicalize(model)
    modules = dict(model.named_modules())
    for name, ranks in progress(plan.ranks_.items(), desc=f"factorizing ({plan.config.method})"):
        m = modules.get(name)
        if m is None:
            raise ValueError(f"the plan does not match this model: no layer named {name!r}")
        reason = why_not(plan.config.method, m)
        if reason is not None:
            raise ValueError(f"the plan does not match this model: layer {name!r}: {reason}")
        expected = plan.params_.get(name)
        if expected is not None and weight_count(m) != expected[0]:
            raise ValueError(f"the plan does not match this model: layer {name!r} has {weight_count(m)} "
                             f"weights, the plan was made for {expected[0]}")
        factor = plan.whitening_.get(name)
        replace_module(model, name, factorized(plan.config.method, m, ranks, plan.config.iterations,
                                            None if factor is None else factor.double()))
    restore(model)
    attach(model, base, plan)
    return model


@register(FactorizeConfig)
def factorize_model(model: nn.Module, cfg: FactorizeConfig, data: Iterable[Batch] | None = None,
                    metric: Callable[[nn.Module], float] | None = None, inplace: bool = False) -> nn.Module:
    if any(is_linear_like(m) for m in model.modules()):  # Hugging Face's Conv1D, as the Linear it is
        work = model if inplace else copy.deepcopy(model)
        canonicalize(work)
        plan = search(work, cfg, data, metric)
        out = apply_plan(work, plan, inplace=True)
        attach(out, model, plan)
    else:
        plan = search(model, cfg, data, metric)
        out = apply_plan(model, plan, inplace=inplace)
    before = sum(v[0] for v in plan.params_.values())
    after = sum(v[1] for v in plan.params_.values())
    log.info("%s: factorized %d layers, their weights %d -> %d (%.0f%%); skipped %d",
             cfg.method, len(plan.ranks_), before, after, 100 * after / before, len(plan.skipped))
    return out


register_plan("lowrank", "factorization", FactorPlan.from_dict,
              lambda base, plan: apply_plan(base, plan, inplace=True, structure_only=True))  # the weights follow
