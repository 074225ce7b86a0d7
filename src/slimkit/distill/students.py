"""Students made from their teacher by dropping whole blocks (DistilBERT, Sanh et al. 2019: a
6-layer student initialised from every other layer of the 12-layer teacher), so distillation starts
from the teacher's own weights instead of from scratch.

``drop_layers(model, keep)`` copies the model keeping the blocks at ``keep`` of its repeated-block
list (``encoder.layer`` in a BERT); ``choose_layers(model, data, n)`` is the data-driven plan: the
``n`` blocks whose shallower network stays closest to the whole on ``data`` (every subset when
there are at most 200 of them, else greedy removal of the least missed block).

>>> import torch
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
...     def forward(self, x):
...         for b in self.blocks:
...             x = x + b(x)
...         return x
>>> student = drop_layers(Net(), keep=None)  # every other block, the last one kept
>>> len(student.blocks)
3
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from slimkit.core.batch import Batch, call, check_batches, model_inputs, output_error, tensors_of
from slimkit.core.dropin import replace_module

__all__ = ["block_list", "drop_layers", "choose_layers"]

log = logging.getLogger(__name__)


def block_list(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """The name and the ``ModuleList`` of the model's repeated blocks: ``blocks`` when given, else the
    ``ModuleList`` of at least two same-typed modules holding the most parameters."""
    modules = dict(model.named_modules())
    if blocks is not None:
        if blocks not in modules or not isinstance(modules[blocks], nn.ModuleList):
            raise ValueError(f"blocks={blocks!r} is not a ModuleList of the model; ModuleLists: "
                             f"{[n for n, m in modules.items() if isinstance(m, nn.ModuleList)]}")
        return blocks, modules[blocks]  # type: ignore[return-value]
    found = [(sum(p.numel() for p in m.parameters()), n, m) for n, m in modules.items()
             if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1]
    if not found:
        raise ValueError("the model has no ModuleList of repeated blocks (as a transformer's encoder.layer); "
                         "name the list with blocks=")
    _, name, mlist = max(found, key=lambda f: f[0])
    return name, mlist  # type: ignore[return-value]


def drop_layers(model: nn.Module, keep: Sequence[int] | None = None, blocks: str | None = None) -> nn.Module:
    """A copy of ``model`` with only the blocks at ``keep`` (indices into the block list, in order);
    ``keep=None`` keeps every other block, ending with the last. A ``config.num_hidden_layers``
    (Hugging Face) is updated to match."""
    name, mlist = block_list(model, blocks)
    n = len(mlist)
    keep = list(range(n - 1, -1, -2))[::-1] if keep is None else list(keep)
    if not keep or any(not isinstance(i, int) or not 0 <= i < n for i in keep) or sorted(set(keep)) != keep:
        raise ValueError(f"keep must be increasing distinct block indices in [0, {n}), got {keep}")
    student = copy.deepcopy(model)
    old = cast(nn.ModuleList, student.get_submodule(name))
    replace_module(student, name, nn.ModuleList([old[i] for i in keep]))
    for m in student.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers") and cfg.num_hidden_layers == n:
            cfg.num_hidden_layers = len(keep)
    log.debug("student: blocks %s of %s (%d of %d)", keep, name, len(keep), n)
    return student


@torch.no_grad()
def choose_layers(model: nn.Module, data: Sequence[Batch], n: int, blocks: str | None = None) -> tuple[int, ...]:
    """The ``n`` blocks to keep whose shallower model's outputs have the smallest relative squared
    error against the whole model's on ``data`` (model inputs, or ``(inputs, labels)`` pairs)."""
    batches = [model_inputs(b) for b in check_batches(data, "data")]
    name, mlist = block_list(model, blocks)
    total = len(mlist)
    if not (isinstance(n, int) and 1 <= n <= total):
        raise ValueError(f"n must be an integer in [1, {total}] (blocks in {name}), got {n!r}")
    was = model.training
    model.eval()
    try:
        ref = [[t.clone() for t in tensors_of(call(model, b))] for b in batches]

        def error(keep: Sequence[int]) -> float:
            return output_error(drop_layers(model, keep, name).eval(), batches, ref)

        if math.comb(total, n) <= 200:
            scored = [(error(k), k) for k in itertools.combinations(range(total), n)]
            best = min(scored)
        else:  # greedy: drop, one at a time, the block whose absence hurts least
            current = list(range(total))
            while len(current) > n:
                best = min((error([i for i in current if i != j]), tuple(i for i in current if i != j)) for j in current)
                current = list(best[1])
    finally:
        model.train(was)
    log.info("choose_layers: keep %s of %d (output error %.4f)", best[1], total, best[0])
    return tuple(best[1])
