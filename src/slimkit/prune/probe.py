"""Channel groups found by probing the model, for models torch.fx cannot trace (Hugging Face decoders,
vision transformers, models with data-dependent control flow).

Where ``dependency.py`` reads the coupling off the graph, this module measures it: push a large
value into a few output channels ``S`` of one layer (a Linear, or a Conv2d with ``groups=1``) and
watch every layer's input on the example batch. A dense layer whose input changes in exactly the
channels ``S`` (or ``S`` shifted by one offset: a concatenation) reads those channels one to one,
through element-wise operations only (activations, a gated MLP's product, dropout, casts); a
BatchNorm or depthwise conv that does is carried along. Producers that reach a common consumer are
one group (a gated MLP's gate and up projections, the branches of a residual add). Each group is
then cut by one channel on a copy of the model, which must still run, with the same output shapes
and the numbers the model gives with that channel's readers zeroed: where the channels are
reshaped (attention heads) or added to a stream another layer also writes, the cut fails and the
group is kept whole, with the reason. Attention heads are cut a head at a time, with the head
counts an attention module keeps as attributes (OPT's ``num_heads``) where it reshapes by them. This is the coupling of DepGraph (Fang
et al. 2023, sec. 3) established by measurement rather than by rules per operation.

>>> import torch
>>> from torch import nn
>>> class GatedMLP(nn.Module):  # y = down(silu(gate(x)) * up(x)); fx would trace it, but so does this
...     def __init__(self):
...         super().__init__()
...         self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
...     def forward(self, x):
...         return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
>>> groups = probed_groups(GatedMLP(), torch.randn(4, 3, 8))
>>> [(g.size, sorted((m.module, m.role) for m in g.members), g.frozen) for g in groups]
[(16, [('down', 'in'), ('gate', 'out'), ('up', 'out')], None)]
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, tensors_of

from .dependency import Group, Member

__all__ = ["probed_groups"]

log = logging.getLogger(__name__)

_PASS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _dense(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _axis(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


def _changed(before: Tensor, after: Tensor, axis: int) -> set[int] | None:
    """The channels along ``axis`` where ``after`` differs from ``before``; None if the shapes differ."""
    if before.shape != after.shape or not before.is_floating_point():
        return None
    d = (after - before).abs().movedim(axis, 0).reshape(before.shape[axis], -1).amax(1)
    scale = before.abs().max().clamp_min(1e-12)
    return {int(i) for i in torch.nonzero(d > 1e-5 * scale).flatten()}


class _Watch:
    """The first input (and output) of every watched module on one forward pass."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model, self.names = model, names
        self.modules = dict(model.named_modules())

    def run(self, batch: Batch, poke: tuple[str, list[int], float] | None = None) -> tuple[dict[str, Tensor], dict[str, int]]:
        seen: dict[str, Tensor] = {}
        calls: dict[str, int] = {}

        def pre(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1 and args and isinstance(args[0], Tensor):
                seen[name] = args[0].detach().clone()

        def push(channels: list[int], value: float, module: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, Tensor):
                return out
            out = out.clone()
            idx = torch.tensor(channels, device=out.device)
            out.index_add_(_axis(module) % out.dim(), idx, torch.full_like(out.index_select(_axis(module) % out.dim(),
                                                                                       idx), value))
            return out

        handles = [self.modules[n].register_forward_pre_hook(partial(pre, n)) for n in self.names]
        if poke is not None:
            handles.append(self.modules[poke[0]].register_forward_hook(partial(push, poke[1], poke[2])))
        try:
            with torch.no_grad():
                call(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        return seen, calls


def _roles(modules: dict[str, nn.Module], producer: str, channels: list[int], base: dict[str, Tensor],
           up: dict[str, Tensor], down: dict[str, Tensor]) -> list[Member] | None:
    """The members that read ``producer``'s channels one to one (pushed up, then down); None if none does."""
    target = set(channels)
    found: list[Member] = []
    for name, x in up.items():
        if name == producer or name not in base or name not in down:
            continue
        m = modules[name]
        if not (_dense(m) or _depthwise(m) or isinstance(m, _PASS)):
            continue
        a, b = _changed(base[name], x, _axis(m)), _changed(base[name], down[name], _axis(m))
        if a is None or b is None or not (a | b):
            continue
        changed = a | b
        offsets = {c - s for c, s in zip(sorted(changed), sorted(target), strict=False)}
        if len(changed) != len(target) or len(offsets) != 1:
            continue
        off = offsets.pop()
        if {c - off for c in changed} != target:
            continue
        role = "in" if _dense(m) else "dw" if _depthwise(m) else "bn"
        if role != "in" and off != 0:
            continue
        found.append(Member(name, role, off))
    return found or None


def _spread(modules: dict[str, nn.Module], producer: str, channels: list[int], base: dict[str, Tensor],
            poked: dict[str, Tensor]) -> str | None:
    """A Linear layer whose input changes in exactly ``g`` times as many features as were pushed,
    ``g`` its width over the producer's (each pushed channel copied ``g`` times), if there is one."""
    p = modules[producer]
    for name, x in poked.items():
        m = modules[name]
        if name == producer or name not in base or not isinstance(m, nn.Linear) or not isinstance(p, nn.Linear):
            continue
        g, rest = divmod(m.in_features, p.out_features)
        changed = _changed(base[name], x, -1)
        if g > 1 and not rest and changed and len(changed) == g * len(channels):
            return name
    return None


def _cuts(model: nn.Module, members: list[Member], size: int, batch: Batch, shapes: list[tuple[int, ...]],
          attrs: dict[str, dict[str, int]] | None = None) -> str | None:
    """Why removing the group's first unit (one channel, or ``repeat`` features: a head) breaks
    ``model`` (on a copy, with ``attrs`` set to ``size - 1`` units), or None if the cut model
    computes what the model computes with that unit's readers zeroed: the same output shapes, the
    same numbers."""
    from .cut import _cut, dim_size

    work, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    modules, zmods = dict(work.named_modules()), dict(zeroed.named_modules())
    drops: dict[tuple[str, str], set[int]] = {}  # one layer may hold several segments (fused q, k, v)
    for mb in members:
        drops.setdefault((mb.module, "in" if mb.role == "in" else "out"), set()).update(
            range(mb.offset, mb.offset + mb.repeat))
    try:
        for (name, role), drop in drops.items():
            m = modules[name]
            _cut(name, m, {role: [i for i in range(dim_size(m, role)) if i not in drop]})
            if role == "in":
                with torch.no_grad():
                    zmods[name].weight[:, sorted(drop)] = 0  # type: ignore[index]
        for name, at in (attrs or {}).items():
            for a, unit in at.items():
                setattr(modules[name], a, (size - 1) * unit)
        with torch.no_grad():
            out, ref = call(work, batch), call(zeroed, batch)
    except Exception as e:  # any failure means the channels are tied to something not cut with them
        return f"cutting its channels breaks the model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    got, want = tensors_of(out), tensors_of(ref)
    if [tuple(t.shape) for t in got] != shapes:
        return "cutting its channels changes the model's output shapes"
    for cut_t, ref_t in zip(got, want, strict=True):
        if cut_t.is_floating_point() and not torch.allclose(cut_t, ref_t, rtol=1e-3,
                                                            atol=1e-4 * (1.0 + float(ref_t.abs().max()))):
            return "cutting its channels changes what the model computes (not only the cut channels' share)"
    return None


def _head_attrs(modules: dict[str, nn.Module], value: str, heads: int, q_heads: int) -> dict[str, dict[str, int]]:
    """The head counts an attention module keeps as attributes (``num_heads = 4``): integer
    attributes of ``value``'s parent equal to the number of key/value or of query heads."""
    parent = value.rpartition(".")[0]
    found: dict[str, int] = {}
    for a, v in vars(modules[parent]).items():
        if a.startswith("_") or type(v) is not int or "dim" in a.lower() or "size" in a.lower():
            continue  # head_dim, attention_head_size: sizes, not counts
        if v == q_heads and ("head" in a.lower()):
            found[a] = q_heads // heads
        elif v == heads and ("head" in a.lower()):
            found[a] = 1
    return {parent: found} if found else {}


def _heads(model: nn.Module, modules: dict[str, nn.Module], base: dict[str, Tensor], value: str, out: str,
           batch: Batch, shapes: list[tuple[int, ...]]) -> Group | None:
    """Attention heads, for a ``value -> out`` coupling that single channels cannot cut: the layers
    reading ``value``'s input (query and key) are cut with it, a head of ``d`` features at a time,
    query heads ``g`` at a time per key/value head (grouped-query attention); ``d`` is the
    smallest width whose cut runs. None if no width does."""
    v, o = modules[value], modules[out]
    if not (isinstance(v, nn.Linear) and isinstance(o, nn.Linear)) or value not in base:
        return None
    parent = value.rpartition(".")[0]
    siblings = [n for n, m in modules.items() if n != value and n.rpartition(".")[0] == parent and n in base
                and isinstance(m, nn.Linear) and base[n].shape == base[value].shape and torch.equal(base[n], base[value])]
    kv = [n for n in siblings if modules[n].out_features == v.out_features]  # type: ignore[union-attr]
    q = [n for n in siblings if modules[n].out_features == o.in_features and n not in kv]  # type: ignore[union-attr]
    if o.in_features % v.out_features or not kv and not q:
        return None
    g = o.in_features // v.out_features
    if g > 1 and len(q) != 1:
        return None
    for d in [d for d in range(2, v.out_features // 2 + 1) if v.out_features % d == 0]:
        members = [Member(n, "out", 0, d) for n in [value, *kv]] + [Member(n, "out", 0, d * g) for n in q] + \
                  [Member(out, "in", 0, d * g)]
        heads = v.out_features // d
        if _cuts(model, members, heads, batch, shapes) is None:
            return Group(heads, members)
        attrs = _head_attrs(modules, value, heads, heads * g)  # an attention module that counts its heads
        if attrs and _cuts(model, members, heads, batch, shapes, attrs) is None:
            return Group(heads, members, attrs=attrs)
    return None


def _fused_heads(model: nn.Module, modules: dict[str, nn.Module], base: dict[str, Tensor], fused: str,
                 batch: Batch, shapes: list[tuple[int, ...]]) -> Group | None:
    """Attention heads behind one fused query/key/value projection (``3 * width`` outputs) read by an
    output projection of ``width`` inputs in the same module: a head's rows are ``d`` rows in each
    third (``split`` into q, k, v, then heads: GPT-2) or ``3 * d`` adjacent rows (heads, then q, k, v:
    GPT-NeoX). Each layout and head width the attention module's integer attributes suggest is cut
    by one head and must compute what zeroing that head's output columns computes; the module's
    integer attributes equal to the head count or to ``width`` follow the cut. None if none does."""
    f = modules[fused]
    parent = fused.rpartition(".")[0]
    if not isinstance(f, nn.Linear) or f.out_features % 3 or not parent:
        return None
    width = f.out_features // 3
    outs = [n for n, m in modules.items() if n.rpartition(".")[0] == parent and n != fused and n in base
            and isinstance(m, nn.Linear) and m.in_features == width]
    if len(outs) != 1:
        return None
    ints = {a: v for a, v in vars(modules[parent]).items() if not a.startswith("_") and type(v) is int and v > 1}
    # head widths the attributes suggest (num_heads = 4: width // 4; head_dim = 8: 8), "head" names first
    named = [v for a, v in ints.items() if "head" in a.lower()] + [v for a, v in ints.items() if "head" not in a.lower()]
    widths = list(dict.fromkeys(d for v in named if v < width and width % v == 0 for d in (width // v, v)))
    for d in [d for d in widths if 1 < d < width]:
        heads = width // d
        counts = {a: 1 for a, v in ints.items() if v == heads and "head" in a.lower()
                  and "dim" not in a.lower() and "size" not in a.lower()}  # num_heads, not head_dim
        spans = {a: d for a, v in ints.items() if v == width}  # GPT-2's split_size: the q, k, v width
        tries: list[dict[str, int]] = [{}]
        for t in (counts, *({**counts, a: d} for a in spans), {**counts, **spans}):  # the fewest attributes first
            if t and t not in tries:
                tries.append(t)
        for rows in ([Member(fused, "out", s * width, d) for s in range(3)], [Member(fused, "out", 0, 3 * d)]):
            members = [*rows, Member(outs[0], "in", 0, d)]
            for at in tries:
                attrs = {parent: at} if at else {}
                if _cuts(model, members, heads, batch, shapes, attrs) is None:
                    return Group(heads, members, attrs=attrs)
    return None


def probed_groups(model: nn.Module, example_inputs: Batch, exclude: tuple[str, ...] = ()) -> list[Group]:
    """The coupled channel groups of ``model``, found by probing (see the module doc). Layers that
    run more than once per forward pass (shared weights) and excluded layers stay out of groups."""
    was = model.training
    model.eval()
    try:
        return _probe(model, example_inputs, exclude)
    finally:
        model.train(was)


def _probe(model: nn.Module, batch: Batch, exclude: tuple[str, ...]) -> list[Group]:
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if n and (_dense(m) or _depthwise(m) or isinstance(m, _PASS))]
    watch = _Watch(model, names)
    base, calls = watch.run(batch)
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in tensors_of(call(model, batch))]
    order = [n for n in base]  # the order the forward pass first calls them
    producers = [n for n in order if _dense(modules[n]) and calls.get(n) == 1
                 and not any(n == e or n.startswith(e + ".") for e in exclude)]
    gen = torch.Generator().manual_seed(0)
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a

    reads: dict[str, list[Member]] = {}
    spread_heads: list[tuple[str, str]] = []
    fused_groups: list[Group] = []
    for p in producers:
        m = modules[p]
        size = m.out_features if isinstance(m, nn.Linear) else m.out_channels  # type: ignore[union-attr]
        if size < 4:
            continue
        channels = sorted(torch.randperm(size, generator=gen)[:3].tolist())
        scale = float(base[p].abs().max()) if p in base else 1.0
        value = 10.0 * max(scale, 1.0) + 10.0
        # pushed both ways: a ReLU (or a negative BatchNorm scale) can hide one direction
        up, down = (watch.run(batch, (p, channels, v))[0] for v in (value, -value))
        members = _roles(modules, p, channels, base, up, down)
        if members is None and p not in exclude:
            fused = _fused_heads(model, modules, base, p, batch, shapes)
            if fused is not None:
                fused_groups.append(fused)
                continue
        if members is None:
            spread = _spread(modules, p, channels, base, up)
            if spread is not None:  # grouped-query attention: a key/value channel read by g query heads
                spread_heads.append((p, spread))
            continue
        if any(calls.get(mb.module, 0) != 1 for mb in members):
            continue  # a shared layer reads them: its channels cannot follow one producer
        reads[p] = members
        for mb in members:  # producers reaching a common member are one group
            parent[find(p)] = find(f"#{mb.module}:{mb.role}:{mb.offset}")
    by_root: dict[str, list[str]] = {}
    for p in reads:
        by_root.setdefault(find(p), []).append(p)
    groups: list[Group] = list(fused_groups)
    for ps in by_root.values():
        m0 = modules[ps[0]]
        size = m0.out_features if isinstance(m0, nn.Linear) else m0.out_channels  # type: ignore[union-attr]
        members = [Member(p, "out") for p in ps] + list({mb: None for p in ps for mb in reads[p]})
        if any((modules[p].out_features if isinstance(modules[p], nn.Linear) else modules[p].out_channels) != size
               for p in ps):  # type: ignore[union-attr]
            groups.append(Group(size, members, "its producers have different widths"))
            continue
        if any(any(mb.module == e or mb.module.startswith(e + ".") for e in exclude) for mb in members):
            groups.append(Group(size, members, "coupled to an excluded module"))
            continue
        why = _cuts(model, members, size, batch, shapes)
        dense_in = [mb.module for mb in members if mb.role == "in"]
        if why is not None and len(ps) == 1 and len(dense_in) == 1 and len(members) == 2:
            heads = _fused_heads(model, modules, base, ps[0], batch, shapes) or \
                _heads(model, modules, base, ps[0], dense_in[0], batch, shapes)  # attention: value -> output
            if heads is not None:
                groups.append(heads)
                continue
        groups.append(Group(size, members, why))
    for producer, reader in spread_heads:
        found = _heads(model, modules, base, producer, reader, batch, shapes)
        if found is not None:
            groups.append(found)
    log.debug("probed %d producers: %d groups, %d prunable", len(producers), len(groups),
              sum(g.frozen is None for g in groups))
    return groups
