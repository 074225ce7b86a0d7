"""The layer-by-layer calibration driver: each layer's calibration inputs, computed with every
earlier layer already quantized, without running the whole model once per layer.

GPTQ (Frantar et al. 2022, "the full algorithm") and AWQ quantize a model one layer at a time, each
layer seeing the outputs of the layers before it as they will be after quantization. Run naively,
that is one forward pass of the whole model per layer. ``sequential_inputs`` finds the model's stack
of repeated blocks (the transformer layers, the residual blocks of a ResNet), catches the inputs
of the first block (a forward pass that stops as soon as it is called), and then runs only block
``i`` on them for each of its layers. Block ``i + 1`` then takes block ``i``'s output, computed
with block ``i`` already quantized, in place of its first argument (the hidden states), and the
same other arguments (the attention mask). That the model chains its blocks this way is checked
once, on the second block, against its inputs caught from the model; where it does not (something
runs between blocks, or a block gets arguments of its own), each block's inputs are caught from
the model. Layers outside the stack (an embedding projection, an output head) get their inputs
from the whole model.

A torch.fx ``GraphModule`` (a model whose BatchNorms were folded by tracing it) has no blocks left
to run one by one; where its graph calls each layer once, it is walked node by node over all
batches at once, pausing before each layer: one forward pass in all (``_graph_walk``).

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
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, fx, nn

from slimkit.core.batch import Batch, as_args, call

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


def _graph_walk(model: nn.Module, names: list[str], batches: list[Batch]) -> Iterator[tuple[str, list[Tensor]]] | None:
    """``sequential_inputs`` for a GraphModule whose graph calls each of ``names`` once, in that
    order, on positional batches; None otherwise (the general path then runs)."""
    if not isinstance(model, fx.GraphModule) or not all(isinstance(b, (Tensor, tuple, list)) for b in batches):
        return None
    nodes = list(model.graph.nodes)
    calls: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    if any(len(calls.get(name, [])) != 1 or not calls[name][0].args or not isinstance(calls[name][0].args[0], fx.Node)
           for name in names):
        return None
    placeholders = sum(n.op == "placeholder" for n in nodes)
    if any(len(as_args(b)) != placeholders for b in batches):
        return None
    at = {calls[name][0]: name for name in names}
    position = {n: i for i, n in enumerate(nodes)}
    if [at[n] for n in sorted(at, key=position.__getitem__)] != list(names):
        return None
    return _walk(model, nodes, at, batches)


@torch.no_grad()
def _walk(model: fx.GraphModule, nodes: list[fx.Node], at: dict[fx.Node, str], batches: list[Batch]
          ) -> Iterator[tuple[str, list[Tensor]]]:
    runs = [fx.Interpreter(model) for _ in batches]  # one environment per batch; values freed after last use
    for run, b in zip(runs, batches, strict=True):
        run.env, run.args_iter = {}, iter(as_args(b))
    left = len(at)
    for node in nodes:
        if node in at:
            src = node.args[0]
            yield at[node], [r.env[src].detach().clone() for r in runs]  # type: ignore[index]
            left -= 1
            if not left:
                return  # the rest of the pass is not needed
        for r in runs:
            r.env[node] = r.run_node(node)  # a replaced or changed layer is looked up as it is now
            for dead in r.user_to_last_uses.get(node, []):
                del r.env[dead]


@torch.no_grad()
def _record(layers: list[nn.Module], run: Callable[..., Any], inputs: list[tuple[Any, Any]]
            ) -> tuple[list[list[Tensor]], list[Any]]:
    """Each of ``layers``' inputs while ``run`` (a block, or the whole model) runs on each
    ``(args, kwargs)``, and what ``run`` returned for each."""
    seen: list[list[Tensor]] = [[] for _ in layers]
    handles = [layer.register_forward_pre_hook(partial(lambda got, m, args: got.append(args[0].detach().clone()), got))
               for layer, got in zip(layers, seen, strict=True)]
    try:
        outputs = [run(*args, **kwargs) for args, kwargs in inputs]
    finally:
        for h in handles:
            h.remove()
    return seen, outputs


def _chained(inputs: list[tuple[Any, Any]], outputs: list[Any]) -> list[tuple[Any, Any]] | None:
    """The next block's ``(args, kwargs)`` if it takes this block's output (a tensor, or the first
    element of a tuple) as its hidden states and the same other arguments; None when the output
    or the arguments have another form."""
    chained = []
    for (args, kwargs), out in zip(inputs, outputs, strict=True):
        h = out if isinstance(out, Tensor) else out[0] if isinstance(out, (tuple, list)) and out else None
        if not isinstance(h, Tensor):
            return None
        if args:
            chained.append(((h, *args[1:]), kwargs))
        elif "hidden_states" in kwargs:
            chained.append(((), {**kwargs, "hidden_states": h}))
        else:
            return None
    return chained


def _run_to(model: nn.Module, stack: list[str], start: int, inputs: list[tuple[Any, Any]], outputs: list[Any] | None,
            end: int) -> tuple[list[tuple[Any, Any]] | None, int]:
    """Block ``end``'s inputs from block ``start``'s: blocks ``start .. end - 1`` run in turn (their
    layers as they are now; ``outputs``, when given, are block ``start``'s already), each output
    chained into the next block's arguments. None where they do not chain; also the blocks run."""
    ran = 0
    for k in range(start, end):
        if k != start or outputs is None:
            outputs = _record([], model.get_submodule(stack[k]), inputs)[1]
            ran += 1
        chained = _chained(inputs, outputs)
        if chained is None:
            return None, ran
        inputs = chained
    return inputs, ran


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                                                  if a.is_floating_point() else torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (isinstance(a, (bool, int, float, str)) and type(a) is type(b) and a == b)


def sequential_inputs(model: nn.Module, names: list[str], batches: list[Batch], frozen: bool = False
                      ) -> Iterator[tuple[str, list[Tensor]]]:
    """For each layer of ``names`` (in forward order), its inputs on ``batches`` (one tensor per
    call), computed when the caller asks for them: after it has dealt with the layers before.

    ``frozen``: the caller leaves the model as it is until the end (it only collects statistics),
    so one run of a block records all of that block's layers in ``names`` and gives the next
    block's inputs; memory then holds one block's inputs instead of one layer's."""
    walk = _graph_walk(model, names, batches)
    if walk is not None:
        yield from walk
        return
    stack = repeated_blocks(model)
    held: tuple[int, list[tuple[Any, Any]] | None] | None = None  # a block of the stack, its inputs
    outputs: list[Any] | None = None  # the held block's outputs, from a frozen run
    chains: bool | None = None  # whether block i + 1 takes block i's output; checked once
    runs = {"block": 0, "model": 0}
    ready: dict[str, list[Tensor]] = {}
    for i, name in enumerate(names):
        if name in ready:
            yield name, ready.pop(name)
            continue
        b = next((k for k, blk in enumerate(stack) if name.startswith(blk + ".")), None)
        if b is not None and (held is None or held[0] != b):
            nxt = None
            if held is not None and held[1] is not None and held[0] < b and chains is not False:
                nxt, ran = _run_to(model, stack, held[0], held[1], outputs, b)
                runs["block"] += ran
            if nxt is None or chains is None:
                caught = _catch(model, model.get_submodule(stack[b]), batches)
                runs["model"] += 1
                if chains is None and held is not None:
                    chains = nxt is not None and caught is not None and _same(nxt, caught)
                    log.debug("sequential calibration: %s", "each block takes the one before's output" if chains else
                              "the blocks do not chain; each block's inputs are caught from the model")
                nxt = caught
            held, outputs = (b, nxt), None
        if b is not None and held is not None and held[1] is not None:
            together = [n for n in names[i:] if n.startswith(stack[b] + ".")] if frozen else [name]
            recorded, outs = _record([model.get_submodule(n) for n in together], model.get_submodule(stack[b]), held[1])
            ready.update(zip(together, recorded, strict=True))
            outputs = outs if frozen else None
            runs["block"] += 1
        else:
            ready[name] = _record([model.get_submodule(name)], partial(call, model), [((x,), {}) for x in batches])[0][0]
            runs["model"] += 1
        yield name, ready.pop(name)
    log.debug("sequential calibration: %d passes of one block, %d (partial) passes of the model",
              runs["block"], runs["model"])


def token_rows(xs: list[Tensor], batches: list[Batch]) -> Tensor:
    """A layer's calibration inputs as rows ``[n, features]``. For tokenizer batches, the rows of
    padding positions (``attention_mask == 0``) are left out: they are not text, and padded to a
    fixed length they would outnumber the real tokens in GPTQ's Hessian and AWQ's statistics."""
    if len(xs) != len(batches) and batches and len(xs) % len(batches) == 0:
        # a layer shared by several blocks (ALBERT) runs k times per batch: each call reads that batch
        k = len(xs) // len(batches)
        batches = [b for b in batches for _ in range(k)]
    if len(xs) != len(batches):
        raise ValueError(f"a layer ran {len(xs)} times on {len(batches)} calibration batches, not the same number "
                         "of times on each; list it in `exclude`")
    rows = []
    for x, b in zip(xs, batches, strict=True):
        mask = b.get("attention_mask") if isinstance(b, Mapping) else None
        if isinstance(mask, Tensor) and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
            rows.append(x[mask.bool()])
        else:
            rows.append(x.reshape(-1, x.shape[-1]))
    return torch.cat(rows)
