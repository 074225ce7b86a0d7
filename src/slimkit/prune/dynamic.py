"""Dynamic sparse training: a fixed budget of non-zero weights that moves during training.

Every ``update_every`` steps each layer drops the ``f`` fraction of its active weights with the smallest
magnitude and grows as many new ones where they are not active (SET, Mocanu et al. 2018: at random;
RigL, Evci et al. 2020: where the dense gradient is largest), the new weights starting at zero. ``f``
decays from ``drop_fraction`` to zero by ``end`` (a fraction of the training steps) on a cosine
(``schedule="cosine"``, RigL's) or linearly, so the final mask is stable. Between updates the masked
weights get zero gradients, as ``hold_zeros`` does, and are zeroed again after every step; on the
step before an update RigL lets the dense gradient through, to score the connections it may grow.

The per-layer budgets: ``"uniform"`` (every layer ``sparsity``), ``"erk"`` (Erdős-Rényi-Kernel, RigL's
default: density proportional to ``sum(shape) / prod(shape)``, so small layers stay denser) or
``"global"`` (one magnitude ranking over every layer at the start); the counts then stay fixed.
``dense_first_last`` keeps the first and last layer dense, as the RigL paper does.

>>> import torch
>>> from slimkit.train import fit
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
>>> data = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(8)]
>>> ds = DynamicSparsity(m, 0.75, method="rigl", update_every=4, budget="uniform")
>>> _ = fit(m, data, epochs=3, lr=0.1, after_step=ds)
>>> [round(s, 3) for s in ds.sparsity_per_layer().values()], ds.updates > 0
([0.75, 0.75], True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from slimkit.core.config import Config, check_choice, check_range

__all__ = ["DynamicSparsity", "SparseTrainConfig", "sparse_train", "PRESETS", "METHODS", "BUDGETS", "erk_densities"]

METHODS = ("rigl", "set")
INITS = ("random", "magnitude", "saliency")
SALIENCY_BATCHES = 4  # sparse_train's init="saliency" scores the weights on this many training batches
BUDGETS = ("uniform", "erk", "global")


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős-Rényi-Kernel densities reaching ``density`` over all the weights: ``eps * sum(shape) /
    prod(shape)`` per layer, layers that would exceed 1 kept dense and ``eps`` solved again for the rest.

    >>> d = erk_densities({"a": (64, 64), "b": (10, 64)}, 0.2)
    >>> round(sum(d[k] * n for k, n in (("a", 4096), ("b", 640))) / 4736, 3), d["b"] > d["a"]
    (0.2, True)
    """
    total = sum(math.prod(s) for s in shapes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(math.prod(shapes[n]) for n in dense)
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items() if n not in dense}
        eps = budget / max(sum(raw[n] * math.prod(shapes[n]) for n in raw), 1e-30)
        over = [n for n in raw if eps * raw[n] > 1.0]
        if not over:
            return {n: (1.0 if n in dense else eps * raw[n]) for n in shapes}
        dense.update(over)


class DynamicSparsity:
    """A ``fit(after_step=...)`` callback for dynamic sparse training (see the module doc).

    ``model``'s Linear and Conv2d layers (or ``layers``) become ``sparsity`` sparse at once, the
    initial mask from the weights' magnitudes (``init="magnitude"``: a trained model), from SNIP's
    saliency ``|w x grad|`` on the batches of ``data`` (``init="saliency"``: a trained model whose
    small weights still matter; RigL feature-distilling all-MiniLM-L6-v2 at 90% ends at cosine 0.62
    from it and at 0.42 from the magnitudes, benchmarks/results/pruning.md) or at random
    (``init="random"``: sparse training from scratch, as the papers do). ``sparsity_per_layer()`` and
    ``history`` say what it did; ``plan()`` is the unstructured ``PrunePlan`` of the final masks, which
    ``finish()`` attaches to the model (``sk.save`` / ``sk.load`` keep it)."""

    def __init__(self, model: nn.Module, sparsity: float, method: str = "rigl", update_every: int = 100,
                 drop_fraction: float = 0.3, schedule: str = "cosine", end: float = 0.75, budget: str = "erk",
                 dense_first_last: bool = False, layers: tuple[str, ...] = (), init: str = "random",
                 seed: int = 0, data: Any = None) -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every is a number of optimizer steps, at least 1, got {update_every!r}")
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1): dropping every active weight of a layer would "
                             f"leave it empty; got {drop_fraction!r}")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant'; got {schedule!r}")
        if not 0.0 < end <= 1.0:
            raise ValueError(f"end is the fraction of the training after which the mask stays fixed, in (0, 1]; got {end!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}; got {budget!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}; got {init!r}")
        if (init == "saliency") != (data is not None):
            raise ValueError("init='saliency' scores the weights on data: give both, or neither" if data is None else
                             f"data is only read by init='saliency' (init is {init!r})")
        modules = dict(model.named_modules())
        for n in layers:
            if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d)):
                raise ValueError(f"layer {n!r} is not a Linear or Conv2d of {type(model).__name__}")
        found = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d)) and (not layers or n in layers)]
        if dense_first_last and not layers:
            found = found[1:-1]
        if not found:
            raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to train sparse"
                             + (" besides its first and last (dense_first_last)" if dense_first_last else ""))
        self.model, self.method, self.update_every, self.drop_fraction = model, method, update_every, drop_fraction
        self.schedule, self.end, self.budget, self.target = schedule, end, budget, float(sparsity)
        self.layers: dict[str, nn.Linear | nn.Conv2d] = {n: cast(nn.Linear | nn.Conv2d, modules[n]) for n in found}
        # A stream of its own: torch.Generator().manual_seed(0) repeats the global seed-0 stream that
        # initialized the weights, and a "random" mask would then keep exactly the positive weights.
        self.generator = torch.Generator().manual_seed(_stream_seed(seed))
        self.history: list[dict[str, Any]] = []
        self.updates = 0
        self._dense = False
        self._handles: list[Any] = []
        self.masks = self._initial_masks(init, data)
        for n, m in self.layers.items():
            w = m.weight
            self._handles.append(w.register_hook(lambda g, name=n: g if self._dense else g * self.masks[name].to(g.dtype)))
        self._apply()

    # -- the masks ------------------------------------------------------------------------------------
    def _initial_masks(self, init: str, data: Any) -> dict[str, Tensor]:
        weights = {n: m.weight.detach() for n, m in self.layers.items()}
        scores = {n: w.abs() for n, w in weights.items()}
        if init == "saliency":  # SNIP's |w x grad|, summed over the batches of data
            from .importance import taylor_importance

            taylor = taylor_importance(self.model, data)
            scores = {n: taylor[f"{n}.weight"] if f"{n}.weight" in taylor else torch.zeros_like(w) for n, w in weights.items()}
        if self.budget == "global" and init != "random":
            from .masks import global_masks

            return dict(zip(weights, global_masks(list(scores.values()), self.target), strict=True))
        if self.budget == "erk":
            dens = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, 1.0 - self.target)
        else:  # uniform; a random global ranking is uniform in expectation
            dens = {n: 1.0 - self.target for n in weights}
        out = {}
        for n, w in weights.items():
            k = int(round(dens[n] * w.numel()))
            if k < 1:
                raise ValueError(f"sparsity {self.target} leaves layer {n!r} ({w.numel()} weights) empty; lower it, "
                                 "or use budget='erk', which keeps small layers denser")
            score = scores[n] if init != "random" else torch.rand(w.shape, generator=self.generator)
            out[n] = _top(score, k)
        return out

    @torch.no_grad()
    def _apply(self) -> None:
        for n, m in self.layers.items():
            m.weight.mul_(self.masks[n].to(m.weight.dtype))

    def fraction(self, step: int, total: int) -> float:
        """The drop fraction at ``step`` of ``total``: ``drop_fraction`` decaying to 0 at ``end``."""
        t = step / max(self.end * total, 1.0)
        if t >= 1.0:
            return 0.0
        if self.schedule == "cosine":
            return self.drop_fraction / 2 * (1 + math.cos(math.pi * t))
        return self.drop_fraction * (1 - t) if self.schedule == "linear" else self.drop_fraction

    def _is_update(self, step: int, total: int) -> bool:
        return step > 0 and step % self.update_every == 0 and step < self.end * total

    @torch.no_grad()
    def __call__(self, step: int, total: int) -> None:
        if self._is_update(step, total):
            self._update(self.fraction(step, total), step)
        self._dense = self.method == "rigl" and self._is_update(step + 1, total)
        self._apply()

    def _update(self, f: float, step: int) -> None:
        moved = 0
        for n, m in self.layers.items():
            mask, w = self.masks[n], m.weight
            active = int(mask.sum())
            k = min(int(f * active), active - 1, mask.numel() - active)
            if k <= 0:
                continue
            drop_score = torch.where(mask, w.abs(), torch.full_like(w, float("inf")))
            dropped = _bottom(drop_score, k)
            after = mask & ~dropped
            if self.method == "rigl":
                g = w.grad
                grow_score = g.abs() if g is not None else torch.rand(w.shape, generator=self.generator)
            else:
                grow_score = torch.rand(w.shape, generator=self.generator)
            grow_score = torch.where(after, torch.full_like(grow_score, -float("inf")), grow_score.to(w.dtype))
            grown = _top(grow_score, k)
            new = after | grown
            w.masked_fill_(grown, 0.0)  # new connections start at zero
            moved += int((grown & ~mask).sum())
            self.masks[n] = new
        self.updates += 1
        self.history.append({"step": step, "drop_fraction": f, "moved": moved})

    def sparsity_per_layer(self) -> dict[str, float]:
        """The fraction of each layer's weights outside its mask: the budget held. (A weight inside
        can be zero too: a new connection whose gradient stayed zero.)"""
        return {n: 1.0 - float(self.masks[n].float().mean()) for n in self.layers}

    def plan(self) -> Any:
        """The final masks as an unstructured ``PrunePlan`` (``sparsity_`` per layer, the run in ``passes``)."""
        from .config import PruneConfig
        from .plan import PrunePlan

        plan = PrunePlan(config=PruneConfig(method="unstructured", sparsity=self.target, scope="layer"))
        plan.sparsity_ = {n: 1.0 - float(self.masks[n].float().mean()) for n in self.layers}
        weights = {n: m.weight.numel() for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        plan.skipped = {n: "kept dense (dense_first_last, or not in layers)" for n in weights if n not in self.layers}
        plan.coverage_ = {"fraction": sum(weights[n] for n in self.layers) / max(sum(weights.values()), 1),
                          "left_alone": dict(plan.skipped),
                          "dynamic_sparsity": {"method": self.method, "budget": self.budget, "updates": self.updates,
                                               "moved": sum(h["moved"] for h in self.history)}}
        return plan

    def finish(self) -> nn.Module:
        """Attach ``plan()`` to the model (after the plans it already carries) and return it."""
        from slimkit.core.plans import attach

        self._apply()
        for h in self._handles:  # training is over: the model's gradients are its own again
            h.remove()
        self._handles.clear()
        attach(self.model, self.model, self.plan())
        return self.model


def _stream_seed(seed: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"slimkit.prune.dynamic:{seed}".encode()).digest()[:7], "little")


def _top(score: Tensor, k: int) -> Tensor:
    flat = score.flatten()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat.double(), k).indices] = True
    return keep.reshape(score.shape)


def _bottom(score: Tensor, k: int) -> Tensor:
    flat = score.flatten()
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[torch.topk(flat.double(), k, largest=False).indices] = True
    return out.reshape(score.shape)


@dataclass(frozen=True, kw_only=True)
class SparseTrainConfig(Config):
    """Dynamic sparse training (``slimkit.prune.sparse_train``, the recipe stage ``sparse_train``,
    ``slimkit sparse-train``).

    - ``sparsity``: the fraction of zero weights, held from the first step to the last.
    - ``method``: ``"rigl"`` (grow where the dense gradient is largest) or ``"set"`` (grow at random).
    - ``update_every``: optimizer steps between mask updates; ``drop_fraction``: the fraction of a
      layer's active weights moved at the first update, decaying to zero at ``end`` (a fraction of
      the training) on a ``schedule`` (``"cosine"``, ``"linear"`` or ``"constant"``).
    - ``budget``: ``"erk"``, ``"uniform"`` or ``"global"`` per-layer sparsities; ``dense_first_last``
      keeps the first and last layer dense; ``init``: the initial mask at ``"random"``, by
      ``"magnitude"`` or by SNIP's ``"saliency"`` on the first ``SALIENCY_BATCHES`` training batches
      (both for a trained model).
    - ``epochs``, ``lr``, ``optimizer``, ``weight_decay``, ``seed``: the training (``slimkit.train.fit``),
      on ``(inputs, labels)``; with a teacher (the recipe's original model) by distillation.
    """

    sparsity: float = 0.9
    method: str = "rigl"
    update_every: int = 100
    drop_fraction: float = 0.3
    schedule: str = "cosine"
    end: float = 0.75
    budget: str = "erk"
    dense_first_last: bool = False
    init: str = "magnitude"
    epochs: int = 5
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    seed: int = 0

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        check_choice("method", self.method, METHODS)
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"update_every is a number of optimizer steps, at least 1, got {self.update_every!r}")
        check_range("drop_fraction", self.drop_fraction, 0.0, 1.0, hi_open=True)
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        check_range("end", self.end, 0.0, 1.0, lo_open=True)
        check_choice("budget", self.budget, BUDGETS)
        check_choice("init", self.init, INITS)
        check_range("epochs", self.epochs, 1, 10**6)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))


PRESETS: dict[str, SparseTrainConfig] = {
    "rigl-90": SparseTrainConfig(sparsity=0.9, method="rigl"),
    "rigl-80": SparseTrainConfig(sparsity=0.8, method="rigl"),
    "set-90": SparseTrainConfig(sparsity=0.9, method="set"),
}


def sparse_train(model: nn.Module, config: SparseTrainConfig | dict[str, Any] | str, train_data: Any,
                 teacher: nn.Module | None = None, inplace: bool = False,
                 loss: Callable[[Any, Any], Tensor] | None = None) -> nn.Module:
    """Train a copy of ``model`` (``inplace``: the model itself) with ``DynamicSparsity``; returns it
    with its plan (``result.slimkit_plan``). ``train_data``: ``(inputs, labels)`` batches (or input
    batches with a custom ``loss(student_out, teacher_out)``); a ``teacher`` teaches by ``KDLoss``."""
    import copy

    from slimkit.core.config import resolve
    from slimkit.train import fit

    cfg = resolve(config, SparseTrainConfig, PRESETS)
    net = model if inplace else copy.deepcopy(model)
    net.train()
    data = list(train_data)
    if not data:
        raise ValueError("train_data is empty: dynamic sparse training needs batches to train on")
    ds = DynamicSparsity(net, cfg.sparsity, method=cfg.method, update_every=cfg.update_every,
                         drop_fraction=cfg.drop_fraction, schedule=cfg.schedule, end=cfg.end, budget=cfg.budget,
                         dense_first_last=cfg.dense_first_last, init=cfg.init, seed=cfg.seed,
                         data=data[:SALIENCY_BATCHES] if cfg.init == "saliency" else None)
    fit(net, data, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, seed=cfg.seed,
        teacher=teacher, loss=loss, after_step=ds)
    ds.finish()  # the hooks off, the masks applied
    from slimkit.core.plans import attach

    attach(net, model, ds.plan())  # after the plans the caller's model carries
    return net.eval()
