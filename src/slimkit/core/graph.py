"""Graph capture with torch.fx, BatchNorm folding, and which nodes produce float tensors.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
>>> gm = trace(m)
>>> fold_batchnorm(gm)
['_1']
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'output']
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, fx, nn

from slimkit.core.batch import Batch

__all__ = ["TraceError", "trace", "fold_batchnorm", "batchnorm_pairs", "fuse_conv_bn_weights", "float_tensor_nodes",
           "split_after"]

log = logging.getLogger(__name__)


class TraceError(RuntimeError):
    """torch.fx could not follow the model; the message names the cause."""


class _Tracer(fx.Tracer):
    """fx's tracer, with chosen submodules kept opaque (leaves) and a record of the innermost
    submodule that was being traced when tracing failed. Modules whose class sets ``fx_leaf`` (the
    quantized layers, whose forward is an integer kernel with its own ONNX form) are always leaves:
    traced into, they would be exported as the float arithmetic that simulates them."""

    def __init__(self, leaves: tuple[str, ...]) -> None:
        super().__init__()
        self.leaves = set(leaves)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or getattr(m, "fx_leaf", False) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module raises first
                self.failed_in = self.path_of_module(m)
            raise


def trace(model: nn.Module, leaves: tuple[str, ...] = ()) -> fx.GraphModule:
    """``model`` as an fx graph; the modules named in ``leaves`` stay single opaque calls.
    On failure the ``TraceError`` names the innermost submodule that could not be traced."""
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for dynamic control flow
        where = f" in module {tracer.failed_in!r}" if tracer.failed_in else " in its own forward"
        hint = (f"; leave that module out (e.g. exclude={[tracer.failed_in]!r}) and it is treated as an opaque call"
                if tracer.failed_in else "")
        raise TraceError(f"torch.fx could not trace {type(model).__name__}{where}: {e}{hint}") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def fuse_conv_bn_weights(
    weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[Tensor, Tensor]:
    """Fold ``bn(conv(x))`` into one conv/linear: ``w' = w * g / sqrt(v + eps)``,
    ``b' = (b - mu) * g / sqrt(v + eps) + beta`` (Jacob et al. 2018, sec. 3.2)."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean, var = bn.running_mean, bn.running_var
    gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
    inv = gamma / torch.sqrt(var + bn.eps)
    b = bias if bias is not None else torch.zeros_like(mean)
    shape = [-1] + [1] * (weight.dim() - 1)
    return weight * inv.reshape(shape), (b - mean) * inv + beta


def fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold every BatchNorm that directly follows a conv/linear used only by it. In place on ``gm``;
    returns the folded BatchNorm node names. Training-mode BatchNorms are left alone."""
    folded = []
    for node, src, layer, bn in batchnorm_pairs(gm):
        if bn.training:
            continue
        with torch.no_grad():
            w, b = fuse_conv_bn_weights(layer.weight, layer.bias, bn)
            layer.weight.copy_(w)
            layer.bias = nn.Parameter(b)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(node.name)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return folded


def batchnorm_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, Any, nn.modules.batchnorm._BatchNorm]]:
    """``(bn_node, layer_node, layer, bn)`` for every BatchNorm with running statistics that directly
    follows a conv/linear used only by it, with as many channels: the pairs that can be folded."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or bn.running_mean is None:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = modules.get(str(src.target))
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and layer.weight.shape[0] == bn.num_features:
            pairs.append((node, src, layer, bn))
    return pairs


def float_tensor_nodes(gm: fx.GraphModule, batch: Batch) -> set[str]:
    """Names of the nodes whose value is a floating-point tensor when ``gm`` runs on ``batch``."""
    found: set[str] = set()

    class _Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, Tensor) and out.is_floating_point():
                found.add(n.name)
            return out

    interp = _Record(gm)
    with torch.no_grad():
        if isinstance(batch, Tensor):
            interp.run(batch)
        elif isinstance(batch, dict):
            names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
            interp.run(*[batch.get(str(k)) for k in names])
        else:
            interp.run(*batch)
    return found


def split_after(model: nn.Module, names: list[str]) -> list[fx.GraphModule]:
    """``model`` cut into ``len(names) + 1`` consecutive graphs, one cut right after the call of each
    named module (in the order the forward pass reaches them). Stage 0 takes the model's inputs;
    stage ``i > 0`` takes, in order, the values that cross cut ``i - 1`` (computed before it and used
    after it). Stage ``i < len(names)`` returns those crossing cut ``i`` followed by the named module's
    output; the last stage returns the model's output. Parameters and buffers are not passed along:
    a stage that reads one reads it itself. Chained, the stages compute what ``model`` computes.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> first, last = split_after(net, ["1"])
    >>> x = torch.randn(2, 4)
    >>> *carry, feature = first(x)
    >>> bool(torch.equal(last(*carry), net(x)))
    True
    """
    gm = trace(model, leaves=tuple(names))
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    cuts = []
    for name in names:
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            raise ValueError(f"layer {name!r} is called {len(calls)} times in the traced forward pass; "
                             "a cut needs a layer called exactly once")
        cuts.append(calls[0])
    if [pos[c] for c in cuts] != sorted(pos[c] for c in cuts):
        raise ValueError(f"layers {names} are not in the order the forward pass calls them")

    def crossing(p: int) -> list[fx.Node]:
        return [n for n in nodes[:p + 1] if n.op != "get_attr" and any(pos[u] > p for u in n.users)]

    bounds = [-1] + [pos[c] for c in cuts] + [len(nodes) - 1]
    stages = []
    for k in range(len(bounds) - 1):
        inputs = crossing(bounds[k]) if k > 0 else []
        outputs = crossing(bounds[k + 1]) + [cuts[k]] if k < len(cuts) else None
        g = _subgraph(nodes[bounds[k] + 1:bounds[k + 1] + 1], inputs, outputs)
        stage = fx.GraphModule(gm, g, f"{type(model).__name__}Stage{k}")
        stage.delete_all_unused_submodules()
        stages.append(stage)
    return stages


def _subgraph(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node] | None) -> fx.Graph:
    """A graph of ``nodes`` taking ``inputs`` (computed elsewhere) as placeholders and returning
    ``outputs`` as a tuple (None: the original graph's own output, which is then among ``nodes``)."""
    g = fx.Graph()
    env = {n: g.placeholder(n.name) for n in inputs}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env and a.op == "get_attr":  # a parameter read again where it is needed
            env[a] = g.node_copy(a)
        return env[a]

    for n in nodes:
        if n.op == "output":
            g.output(fx.map_arg(n.args[0], arg))
        else:
            env[n] = g.node_copy(n, arg)
    if outputs is not None:
        g.output(tuple(env[n] for n in outputs))
    g.lint()
    return g
