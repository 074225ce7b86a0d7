"""The channel dependency graph: which channels of which layers must be removed together.

Removing output channel ``c`` of a conv also removes channel ``c`` of the BatchNorm after it, of
every depthwise conv on the way, and input channel ``c`` of every layer that reads it. A residual
add ties the channels of all its branches into one group (they must keep the same channels); a
concatenation puts several groups side by side at offsets; a flatten before a Linear turns each
channel into ``H * W`` consecutive input features. This module traces the model with torch.fx,
propagates a *channel layout* (which group each channel of a tensor belongs to) through the graph
and returns the coupled groups (the dependency graph of Fang et al. 2023, "DepGraph", computed by
layout propagation).

Anything it does not understand freezes the channels that reach it, with the reason: pruning is
then conservative, never wrong. The model's inputs and outputs are frozen too.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> g = [g for g in dependency_groups(m, torch.randn(1, 3, 8, 8)) if g.frozen is None]
>>> [(x.size, [(mb.module, mb.role) for mb in x.members]) for x in g]
[(8, [('0', 'out'), ('1', 'bn'), ('3', 'in')])]
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from slimkit.core.batch import Batch, as_args, modes_kept
from slimkit.core.graph import trace

from .layers import rule_for

__all__ = ["Member", "Group", "dependency_groups"]

# (group id, channels, features per channel)
Segment = tuple[int, int, int]


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: ``role`` is ``out`` (a conv/linear's output channels),
    ``in`` (its input channels, from ``offset``; ``repeat`` features each), ``bn`` (a BatchNorm's
    features) or ``dw`` (a depthwise conv, whose input and output channels are the same)."""

    module: str
    role: str
    offset: int = 0
    repeat: int = 1


@dataclass
class Group:
    size: int
    members: list[Member] = field(default_factory=list)
    frozen: str | None = None  # why these channels cannot be pruned
    chunks: int = 1  # a grouped conv reads or makes them: each of these equal parts keeps as many
    attrs: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> attribute -> its value per unit kept


_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                 nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d,
                 nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardtanh, F.leaky_relu, F.elu, torch.relu,
                   torch.sigmoid, torch.tanh, F.sigmoid, F.dropout, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "detach"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}  # gating (squeeze-excite): channel c times channel c
_MEAN = {torch.mean, "mean", torch.amax, "amax"}


class _Builder:
    def __init__(self, model: nn.Module, exclude: tuple[str, ...]) -> None:
        self.modules = dict(model.named_modules())
        self.exclude = exclude
        self.parent: list[int] = []
        self.groups: list[Group] = []

    # union-find over group ids
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def new(self, size: int, frozen: str | None = None) -> int:
        self.parent.append(len(self.groups))
        self.groups.append(Group(size, frozen=frozen))
        return len(self.groups) - 1

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        ga, gb = self.groups[ra], self.groups[rb]
        ga.members += gb.members
        ga.frozen = ga.frozen or gb.frozen
        self.chunk(ra, gb.chunks)

    def chunk(self, g: int, parts: int) -> None:
        """The group's channels fall into ``parts`` equal parts that keep the same count each."""
        grp = self.groups[self.find(g)]
        both = math.lcm(grp.chunks, parts)
        if grp.size % both:
            grp.frozen = grp.frozen or f"grouped convs split these {grp.size} channels into {grp.chunks} and {parts} parts"
        else:
            grp.chunks = both

    def add(self, g: int, member: Member) -> None:
        self.groups[self.find(g)].members.append(member)

    def freeze(self, layout: list[Segment] | None, reason: str) -> None:
        for gid, _, _ in layout or []:
            grp = self.groups[self.find(gid)]
            grp.frozen = grp.frozen or reason


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def dependency_groups(model: nn.Module, example_inputs: Batch, exclude: tuple[str, ...] = ()) -> list[Group]:
    """The coupled channel groups of ``model`` (traced with torch.fx, shapes from ``example_inputs``).
    Groups that cannot be pruned carry the reason in ``frozen``."""
    registered = tuple(n for n, m in model.named_modules() if n and rule_for(m) is not None)
    gm = trace(model, leaves=exclude + registered)  # excluded and registered layers stay opaque calls
    with modes_kept(gm), torch.no_grad():
        ShapeProp(gm.eval()).propagate(*as_args(example_inputs))
    b = _Builder(model, exclude)
    layouts: dict[fx.Node, list[Segment] | None] = {}

    def fresh(node: fx.Node, reason: str) -> list[Segment] | None:
        s = _shape(node)
        return [(b.new(s[1], reason), s[1], 1)] if s is not None and len(s) in (2, 4) else None

    def inputs_of(node: fx.Node) -> list[fx.Node]:
        return list(node.all_input_nodes)

    def unknown(node: fx.Node, what: str) -> None:
        for a in inputs_of(node):
            b.freeze(layouts.get(a), f"reaches {what} (node {node.name!r}), which the pruner does not follow")
        layouts[node] = fresh(node, f"made by {what} (node {node.name!r})")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            layouts[node] = fresh(node, "model input")
        elif node.op == "get_attr":
            layouts[node] = None
        elif node.op == "output":
            for a in inputs_of(node):
                b.freeze(layouts.get(a), "model output")
        elif node.op == "call_module":
            _module(b, node, layouts, fresh, unknown)
        elif node.op in ("call_function", "call_method"):
            _function(b, node, layouts, fresh, unknown)
        else:
            unknown(node, node.op)
    roots = sorted({b.find(g) for g in range(len(b.groups))})
    return [b.groups[r] for r in roots]


def _module(b: _Builder, node: fx.Node, layouts: dict, fresh: Any, unknown: Any) -> None:
    name = str(node.target)
    m = b.modules[name]
    src = node.args[0] if node.args else None
    inp = layouts.get(src) if isinstance(src, fx.Node) else None
    excluded = name in b.exclude or any(name.startswith(e + ".") for e in b.exclude)
    if excluded:
        b.freeze(inp, f"coupled to excluded module {name!r}")
    in_shape = _shape(src)
    rule = rule_for(m)
    if rule is not None:  # a layer type taught with register_prunable
        out_shape = _shape(node)
        if len(node.args) != 1 or node.kwargs or inp is None or in_shape is None or out_shape is None \
                or len(in_shape) not in (2, 4) or len(out_shape) not in (2, 4) \
                or in_shape[1] != rule.in_channels(m) or out_shape[1] != rule.out_channels(m):
            return unknown(node, f"registered layer {name!r} ({type(m).__name__}) on an input of shape {in_shape}")
        if rule.per_channel:
            if not _per_channel(b, inp, name, "bn"):
                return unknown(node, f"per-channel layer {name!r} on flattened features")
            layouts[node] = inp
        else:
            _consume(b, inp, name)
            layouts[node] = _produce(b, name, rule.out_channels(m), excluded)
        return None
    if isinstance(m, nn.Conv2d) and m.groups == 1 and len(node.args) == 1:
        if in_shape is None or len(in_shape) != 4:
            return unknown(node, f"conv {name!r} on an untracked input")
        _consume(b, inp, name)
        layouts[node] = _produce(b, name, m.out_channels, excluded)
    elif isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels and len(node.args) == 1 and inp is not None:
        if len(inp) != 1 or inp[0][2] != 1:
            return unknown(node, f"grouped conv {name!r} on concatenated or flattened channels")
        _consume(b, inp, name)
        b.chunk(inp[0][0], m.groups)
        layouts[node] = _produce(b, name, m.out_channels, excluded)
        b.chunk(layouts[node][0][0], m.groups)
    elif isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and inp is not None:
        if not _per_channel(b, inp, name, "dw"):
            return unknown(node, f"depthwise conv {name!r} on flattened features")
        layouts[node] = inp
    elif isinstance(m, nn.Linear) and len(node.args) == 1:
        if in_shape is None or len(in_shape) != 2 or inp is None:
            b.freeze(inp, f"Linear {name!r} on a tensor of shape {in_shape} (only [batch, features] is followed)")
            layouts[node] = fresh(node, f"Linear {name!r} on a tensor of shape {in_shape}")
            return None
        _consume(b, inp, name)
        layouts[node] = _produce(b, name, m.out_features, excluded)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and inp is not None:
        if not _per_channel(b, inp, name, "bn"):
            return unknown(node, f"BatchNorm {name!r} on flattened features")
        layouts[node] = inp
    elif isinstance(m, _PASS_MODULES) and inp is not None and _same_channels(src, node):
        layouts[node] = inp
    elif isinstance(m, nn.Flatten) and inp is not None:
        layouts[node] = _flatten(src, node, inp)
        if layouts[node] is None:
            unknown(node, f"Flatten {name!r}")
    else:
        unknown(node, f"module {name!r} ({type(m).__name__})")
    return None


def _consume(b: _Builder, inp: list[Segment] | None, name: str) -> None:
    """``name`` reads these channels as its input features (each ``repeat`` features wide)."""
    off = 0
    for gid, size, rep in inp or []:
        b.add(gid, Member(name, "in", off, rep))
        off += size * rep


def _produce(b: _Builder, name: str, channels: int, excluded: bool) -> list[Segment]:
    """A new group: the output channels of ``name``."""
    gid = b.new(channels, f"excluded module {name!r}" if excluded else None)
    b.add(gid, Member(name, "out"))
    return [(gid, channels, 1)]


def _per_channel(b: _Builder, inp: list[Segment], name: str, role: str) -> bool:
    """``name`` acts channel by channel (BatchNorm, depthwise conv); False on flattened features."""
    if any(rep != 1 for _, _, rep in inp):
        return False
    off = 0
    for gid, size, _ in inp:
        b.add(gid, Member(name, role, off))
        off += size
    return True


def _same_channels(a: Any, b: fx.Node) -> bool:
    sa, sb = _shape(a), _shape(b)
    return sa is not None and sb is not None and len(sa) == len(sb) and len(sa) >= 2 and sa[1] == sb[1]


def _flatten(src: Any, node: fx.Node, inp: list[Segment]) -> list[Segment] | None:
    si, so = _shape(src), _shape(node)
    if si is None or so is None:
        return None
    if si == so:
        return inp
    if len(si) == 4 and len(so) == 2 and so[1] == si[1] * si[2] * si[3] and all(r == 1 for _, _, r in inp):
        hw = si[2] * si[3]
        return [(gid, size, hw) for gid, size, _ in inp]
    return None


def _function(b: _Builder, node: fx.Node, layouts: dict, fresh: Any, unknown: Any) -> None:
    fn = node.target
    args = [a for a in node.args if isinstance(a, fx.Node)]
    first = node.args[0] if node.args else None
    if node.op == "call_method" and fn in ("size", "dim", "numel") or _shape(node) is None and node.op == "call_function" \
            and fn in (getattr, operator.getitem) and not any(layouts.get(a) for a in args):
        layouts[node] = None
        return
    if fn in _ADD and len(node.args) == 2:
        if len(args) == 1:  # tensor + number
            layouts[node] = layouts.get(args[0])
            return
        la, lb = layouts.get(args[0]), layouts.get(args[1])
        if la is None or lb is None or [(s, r) for _, s, r in la] != [(s, r) for _, s, r in lb] \
                or _shape(args[0]) != _shape(args[1]):
            return unknown(node, "an add of differently laid-out tensors")
        for (ga, _, _), (gb, _, _) in zip(la, lb, strict=True):
            b.union(ga, gb)
        layouts[node] = la
        return
    if fn in _MUL and len(node.args) == 2 and len(args) == 2 and all(layouts.get(a) is not None for a in args):
        la, lb = layouts[args[0]], layouts[args[1]]
        sa, sb, so = _shape(args[0]), _shape(args[1]), _shape(node)
        if sa is None or sb is None or so is None or len(sa) != len(sb) or sa[1] != sb[1] \
                or [(s, r) for _, s, r in la] != [(s, r) for _, s, r in lb]:
            return unknown(node, "a product of differently laid-out tensors")
        for (ga, _, _), (gb, _, _) in zip(la, lb, strict=True):
            b.union(ga, gb)
        layouts[node] = la if sa == so else lb
        return
    if fn in _MUL and len(node.args) == 2 and len(args) == 1 and layouts.get(args[0]) is not None \
            and _same_channels(args[0], node):  # tensor * number
        layouts[node] = layouts[args[0]]
        return
    if fn in _MEAN and isinstance(first, fx.Node) and layouts.get(first) is not None:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        si, so = _shape(first), _shape(node)
        dims = (dims,) if isinstance(dims, int) else dims
        if si is not None and so is not None and len(si) == 4 and isinstance(dims, (tuple, list)) \
                and {d % 4 for d in dims} == {2, 3} and len(so) >= 2 and so[1] == si[1]:
            layouts[node] = layouts[first]  # pooled over space: the channels stay
            return
    if (fn in _PASS_FUNCTIONS or fn in _PASS_METHODS) and isinstance(first, fx.Node) and layouts.get(first) is not None \
            and _same_channels(first, node):
        layouts[node] = layouts[first]
        return
    if (fn is torch.flatten or fn in ("flatten", "view", "reshape")) and isinstance(first, fx.Node) \
            and layouts.get(first) is not None:
        out = _flatten(first, node, layouts[first])
        if out is not None:
            layouts[node] = out
            return
    if fn is torch.cat and isinstance(first, (list, tuple)):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = [layouts.get(a) if isinstance(a, fx.Node) else None for a in first]
        shape = _shape(node)
        if shape is not None and dim in (1, 1 - len(shape)) and all(p is not None for p in parts) \
                and all(r == 1 for p in parts for _, _, r in p):  # type: ignore[union-attr]
            layouts[node] = [seg for p in parts for seg in p]  # type: ignore[union-attr]
            return
    return unknown(node, f"{getattr(fn, '__name__', fn)}")
