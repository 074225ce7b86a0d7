"""The layer-by-layer calibration driver: each layer's calibration inputs, computed with every
earlier layer already quantized, without running the whole model once per layer.

GPTQ (Frantar et al. 2022, "the full algorithm") and AWQ quantize a model one layer at a time, each
layer seeing the outputs of the layers before it as they will be after quantization. Run naively,
that is one forward pass of the whole model per layer. ``sequential_inputs`` finds the model's stack
of repeated blocks (the transformer layers, the residual blocks of a ResNet), catches the inputs
of block ``i`` once (a forward pass that stops as soon as block ``i`` is called), and then runs only
block ``i`` on them for each of its layers. Layers outside the stack (an embedding projection, an
output head) get their inputs from the whole model, as before.

It is a generator: the caller takes ``(name, inputs)``, quantizes or replaces that layer in the
model, and the next layer's inputs are computed from the model as it is then.

>>> import torch
>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self): super().__init__(); self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
...     def forward(self, x): return x + self.b(torch.relu(self.a(x)))
>>> m = nn.Sequential(nn.Linear(3, 4), Block(), Block(), nn.Linear(4, 2))
>>> repeated_blocks(m)
['1', '2']
>>> [(n, tuple(xs[0].shape)) for n, xs in sequential_inputs(m, ["0", "1.a", "1.b", "2.a", "2.b", "3"], [torch.randn(5, 3)])]
[('0', (5, 3)), ('1.a', (5, 4)), ('1.b', (5, 4)), ('2.a', (5, 4)), ('2.b', (5, 4)), ('3', (5, 4))]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, call

from .modules import WEIGHTED_LAYERS as _WEIGHTED

__all__ = ["repeated_blocks", "sequential_inputs"]

log = logging.getLogger(__name__)


class _Stop(Exception):
    """The block's inputs are caught: the rest of the forward pass is not needed."""


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the longest run of consecutive children of one ``nn.ModuleList`` / ``nn.Sequential``
    that are of one class, at least two, and each hold a weighted layer without being one: the
    model's stack of blocks. Empty when there is none."""
    best: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        run: list[tuple[str, nn.Module]] = []
        for k, c in [*m.named_children(), ("", None)]:  # a sentinel ends the last run
            block = c is not None and not isinstance(c, _WEIGHTED) and any(isinstance(x, _WEIGHTED) for x in c.modules())
            if block and run and type(c) is type(run[-1][1]):
                run.append((k, c))  # type: ignore[arg-type]
                continue
            if len(run) >= 2 and len(run) > len(best):
                best = [f"{name}.{r}" if name else r for r, _ in run]
            run = [(k, c)] if block else []  # type: ignore[list-item]
    return best


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_clone(o) for o in obj)
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


@torch.no_grad()
def _catch(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[tuple[Any, Any]] | None:
    """``(args, kwargs)`` of ``block``'s first call on each batch; None if a batch never calls it."""
    caught: list[tuple[Any, Any]] = []

    def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        caught.append((_clone(args), _clone(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                call(model, b)
            except _Stop:
                continue
            return None
    finally:
        handle.remove()
    return caught


@torch.no_grad()
def _record(layer: nn.Module, run: Callable[..., Any], inputs: list[tuple[Any, Any]]) -> list[Tensor]:
    """``layer``'s inputs while ``run`` (a block, or the whole model) runs on each ``(args, kwargs)``."""
    seen: list[Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        for args, kwargs in inputs:
            run(*args, **kwargs)
    finally:
        handle.remove()
    return seen


def sequential_inputs(model: nn.Module, names: list[str], batches: list[Batch]) -> Iterator[tuple[str, list[Tensor]]]:
    """For each layer of ``names`` (in forward order), its inputs on ``batches`` (one tensor per
    call), computed when the caller asks for them: after it has dealt with the layers before."""
    stack = repeated_blocks(model)
    caught: tuple[str, list[tuple[Any, Any]] | None] | None = None
    runs = {"block": 0, "model": 0}
    for name in names:
        block = next((b for b in stack if name.startswith(b + ".")), None)
        if block is not None and (caught is None or caught[0] != block):
            caught = (block, _catch(model, model.get_submodule(block), batches))
            runs["model"] += 1
        layer = model.get_submodule(name)
        if block is not None and caught is not None and caught[1] is not None:
            yield name, _record(layer, model.get_submodule(block), caught[1])
            runs["block"] += 1
        else:
            yield name, _record(layer, partial(call, model), [((b,), {}) for b in batches])
            runs["model"] += 1
    log.debug("sequential calibration: %d passes of one block, %d (partial) passes of the model",
              runs["block"], runs["model"])
