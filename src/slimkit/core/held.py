"""A rewritten fx graph run by the user's own model, so a result keeps its class.

Static quantization traces the model, folds its BatchNorms and puts quantizers between nodes of
the graph. A ``torch.fx.GraphModule`` holding that graph is a foreign class: ``isinstance`` checks,
the model's own methods (``features``, ``predict``) and its containers (``model.layer1`` as the
``Sequential`` it was) are gone. ``hold_graph`` keeps the user's model instead: every module the
graph calls is put at its own path in the model (a quantized layer where the float one was, each
activation quantizer as an attribute of the model), each folded BatchNorm becomes an ``Identity``
(its scale and shift live in the layer before it), and the model's ``forward`` becomes the graph's
generated code, run with the model itself as ``self``. Calling a submodule directly still works;
it runs the quantized layers without the quantizers that sit between them in the graph.

>>> import torch
>>> from torch import nn
>>> from slimkit.core.graph import fold_batchnorm, trace
>>> class Net(nn.Sequential):
...     def features(self, x):
...         return self[0](x)
>>> net = Net(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
>>> x = torch.randn(1, 1, 5, 5)
>>> ref = net(x)
>>> gm = trace(net)
>>> _ = fold_batchnorm(gm)
>>> held = hold_graph(net, gm)
>>> isinstance(held, Net), type(held[1]).__name__, torch.allclose(held(x), ref, atol=1e-6)
(True, 'Identity', True)
>>> graph_of(held) is gm.graph
True
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from slimkit.core.dropin import replace_module

__all__ = ["hold_graph", "graph_of"]


def _place(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:  # a path only the graph has: made from the top
        owner = model
        child = path.replace(".", "_")
    if owner._modules.get(child) is not module:
        if child in owner._modules:
            replace_module(owner, child, module)
        else:
            owner.add_module(child, module)


def hold_graph(model: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """``model`` (which the caller owns: it is changed in place), running ``gm``'s graph (traced
    from ``model`` or from a graph of it: the module paths are the model's): every module the graph
    calls put at its path, every BatchNorm the graph no longer calls (folded into the layer before
    it) replaced by ``Identity``, its class a subclass of its own whose ``forward`` is the graph's
    code. Returns ``model``."""
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    for path in called:
        _place(model, path, gm.get_submodule(path))
    folded = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in called]
    for path in folded:
        replace_module(model, path, nn.Identity())
    cls = type(model)
    user = cls.__dict__.get("slimkit_user_class", cls)
    code = type(gm).forward  # fx's generated function; it reads modules through ``self``
    body: dict[str, Any] = {"forward": code, "__module__": user.__module__, "__qualname__": f"Slim{user.__qualname__}",
                            "slimkit_user_class": user, "__doc__": user.__doc__}
    model.__class__ = type(f"Slim{user.__name__}", (user,), body)
    model.__dict__["_slimkit_graph"] = gm.graph
    return model


def graph_of(model: nn.Module) -> fx.Graph | None:
    """The graph ``model`` runs (``hold_graph``, or a GraphModule's own), or None."""
    if isinstance(model, fx.GraphModule):
        return model.graph
    graph = model.__dict__.get("_slimkit_graph")
    return graph if isinstance(graph, fx.Graph) else None
