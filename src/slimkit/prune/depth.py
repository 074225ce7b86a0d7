"""Depth pruning: remove whole blocks whose output has the shape of their input (the identity-shortcut
residual blocks of a ResNet or MobileNetV2), replacing each with ``nn.Identity``. On small inputs the
time of a network is mostly its number of layers, which channel pruning does not change.

A candidate block is an element of an ``nn.Sequential`` or ``nn.ModuleList`` that holds at least one
Conv2d or Linear, takes one tensor and returns one tensor of the same shape (found by running the
example inputs), is residual (its input reaches its output through an addition without passing a
layer with weights, found by tracing the block with torch.fx), and lies inside no other candidate. Each candidate's score is the output change
(relative squared error against the unpruned model, on the given batches) when it alone is removed;
the ``k`` lowest-scoring go.

>>> import torch
>>> from torch import nn
>>> class Res(nn.Module):
...     def __init__(self, c, scale):
...         super().__init__(); self.conv = nn.Conv2d(c, c, 3, padding=1); self.scale = scale
...     def forward(self, x): return x + self.scale * self.conv(x)
>>> torch.manual_seed(0) and None
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Res(4, 1.0), Res(4, 0.01), nn.Conv2d(4, 8, 1, stride=2))
>>> x = torch.randn(2, 1, 8, 8)
>>> [n for n, _ in candidates(m, x)]
['1', '2']
>>> scores = block_scores(m, ['1', '2'], [x])
>>> min(scores, key=scores.get)
'2'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimkit.core.batch import Batch, call, output_error, tensors_of
from slimkit.core.dropin import replace_module

__all__ = ["candidates", "block_scores", "drop_blocks", "residual"]


def _holds_weights(m: nn.Module) -> bool:
    return any(isinstance(s, (nn.Conv2d, nn.Linear)) for s in m.modules())


def residual(block: nn.Module) -> bool:
    """Whether the block's input reaches its output through an addition and parameter-free ops only
    (``relu(f(x) + x)``, ``x + f(x)``); False for a block torch.fx cannot trace."""
    import operator

    import torch.fx

    try:
        g = torch.fx.symbolic_trace(block).graph
    except Exception:
        return False
    modules = dict(block.named_modules())
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    free = {inputs[0]}  # nodes the input reaches without a weighted layer
    added = False
    for n in g.nodes:
        if n.op == "placeholder" or not any(a in free for a in n.all_input_nodes):
            continue
        if n.op == "call_module" and any(True for _ in modules[str(n.target)].parameters()):
            continue
        if n.op == "output":
            return added and any(a in free for a in n.all_input_nodes)
        if n.target in (operator.add, operator.iadd, torch.add) or n.target == "add":
            added = True
        free.add(n)
    return False


@torch.no_grad()
def candidates(model: nn.Module, example: Batch, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """The removable blocks, outermost first in model order (see the module doc)."""
    parents = [m for m in model.modules() if isinstance(m, (nn.Sequential, nn.ModuleList))]
    names = {id(m): n for n, m in model.named_modules()}
    inside = [(names[id(c)], c) for p in parents for c in p.children()
              if _holds_weights(c) and not isinstance(c, (nn.Conv2d, nn.Linear))]
    shapes: dict[str, bool] = {}
    hooks = []
    for name, block in inside:
        def hook(mod: nn.Module, args: tuple, out: object, name: str = name) -> None:
            shapes[name] = (len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                            and out.shape == args[0].shape and out.dtype == args[0].dtype)
        hooks.append(block.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        call(model, example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    ok = [(n, b) for n, b in inside if shapes.get(n) and residual(b)
          and not any(n == e or n.startswith(e + ".") for e in exclude)]
    return [(n, b) for n, b in ok if not any(n.startswith(o + ".") for o, _ in ok)]


@torch.no_grad()
def block_scores(model: nn.Module, names: Sequence[str], batches: list[Batch]) -> dict[str, float]:
    """Each block's output change when it alone is replaced by the identity (the model is restored)."""
    was = model.training
    model.eval()
    try:
        reference = [[t.clone() for t in tensors_of(call(model, b))] for b in batches]
        if not all(torch.isfinite(t).all() for ts in reference for t in ts):
            raise ValueError("depth pruning: the model gives NaN or infinite outputs on the data, so no block "
                             "can be scored; check the weights and the data")
        scores = {}
        for name in names:
            old = replace_module(model, name, nn.Identity())
            try:
                scores[name] = output_error(model, batches, reference)
            finally:
                replace_module(model, name, old)
    finally:
        model.train(was)
    return scores


def drop_blocks(model: nn.Module, names: Sequence[str]) -> None:
    """Replace the blocks ``names`` of ``model`` (in place) with ``nn.Identity``."""
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"the plan does not match this model: no block named {name!r}") from e
        replace_module(model, name, nn.Identity())
