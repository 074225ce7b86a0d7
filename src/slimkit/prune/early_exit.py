"""Run-time pruning by early exit (BranchyNet, Teerapittayanon, McDanel and Kung 2016): classifier
heads on intermediate layers answer the easy inputs, and the rest of the network is skipped for
them; only the inputs no exit is sure about pay for the whole network.

``EarlyExit(model, exits, example_inputs)`` adds one head per named layer (average pooling to 4x4
and a Linear for [N, C, H, W] features, the token mean and a Linear for [N, L, D], a Linear for
[N, D]). In training mode, or with ``threshold=None``, it returns the tuple of every exit's logits,
the model's own output last (train it with ``distill``'s self mode, where the last output teaches
the exits). In eval mode with a ``threshold``, each input takes the first exit whose top softmax
probability reaches it; the forward pass stops as soon as every input of the batch has exited,
and ``last_exit`` says which exit each input took (``len(exits)`` for the full network).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
>>> ee = EarlyExit(net, ["1"], example_inputs=torch.randn(2, 4))
>>> [tuple(t.shape) for t in ee.train()(torch.randn(5, 4))]
[(5, 3), (5, 3)]
>>> ee = ee.eval(); ee.threshold = 0.0  # every input is "sure" at the first exit
>>> ee(torch.randn(5, 4)).shape, ee.last_exit.tolist()
(torch.Size([5, 3]), [0, 0, 0, 0, 0])
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, modes_kept
from slimkit.core.graph import split_after

__all__ = ["EarlyExit"]


class _Done(Exception):
    """Every input of the batch has exited: stop the forward pass."""


class _TokenMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def _head(feature: Tensor, classes: int, name: str) -> nn.Module:
    if feature.dim() == 4:  # pooled to 4x4, not 1x1: an early layer's features are local, where they are matters
        side = min(4, feature.shape[2], feature.shape[3])
        return nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.Linear(feature.shape[1] * side * side, classes))
    if feature.dim() == 3:
        return nn.Sequential(_TokenMean(), nn.Linear(feature.shape[-1], classes))
    if feature.dim() == 2:
        return nn.Linear(feature.shape[-1], classes)
    raise ValueError(f"exit layer {name!r} outputs shape {tuple(feature.shape)}; an exit needs [N, C, H, W], "
                     "[N, L, D] or [N, D] features")


class _Stage(nn.Module):
    """One stage of an early-exit network: the layers up to an exit and that exit's head. Returns
    the values the next stage needs, then the exit's logits."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        *carry, feature = self.body(*args, **kwargs)
        return (*carry, self.head(feature))


class EarlyExit(nn.Module):
    def __init__(self, model: nn.Module, exits: Sequence[str], example_inputs: Batch,
                 threshold: float | None = None) -> None:
        super().__init__()
        if isinstance(exits, str) or not exits:
            raise ValueError(f"exits must be a non-empty list of layer names, got {exits!r}")
        modules = dict(model.named_modules())
        for name in exits:
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
                raise ValueError(f"the model has no layer named {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if len(set(exits)) != len(exits):
            raise ValueError(f"exits lists a layer twice: {list(exits)}")
        self.model = model
        self.threshold = threshold
        self.last_exit: Tensor | None = None
        seen: dict[str, Tensor] = {}
        handles = [modules[n].register_forward_hook(self._recorder(n, seen)) for n in exits]
        try:
            with modes_kept(model), torch.no_grad():
                final = call(model.eval(), example_inputs)
        finally:
            for h in handles:
                h.remove()
        if not (isinstance(final, Tensor) and final.dim() == 2):
            raise ValueError("early exit needs a classifier: the model must return [N, classes] logits, got "
                             + (str(tuple(final.shape)) if isinstance(final, Tensor) else type(final).__name__))
        missing = [n for n in exits if n not in seen]
        if missing:
            raise ValueError(f"exit layers {missing} never ran on the example inputs")
        self.exits = sorted(exits, key=list(seen).index)  # in the order the forward pass reaches them
        self.heads = nn.ModuleDict({self._key(n): _head(seen[n], final.shape[-1], n) for n in self.exits})

    @property
    def threshold(self) -> float | None:
        """The top softmax probability at which an input exits; None runs every exit (training)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"threshold must be in [0, 1] or None, got {value!r}")
        self._threshold = None if value is None else float(value)

    def stages(self) -> list[nn.Module]:
        """The network cut after each exit layer, for a runtime that runs one stage at a time and
        stops per input (``slimkit.export.export_early_exit``). Stage ``i < len(exits)`` returns the
        tensors the rest of the network needs, then exit ``i``'s logits; the last stage returns the
        model's output. The stages share this model's parameters."""
        bodies = split_after(self.model, self.exits)
        heads = [self.heads[self._key(n)] for n in self.exits]
        return [_Stage(b, h) for b, h in zip(bodies, heads, strict=False)] + [bodies[-1]]

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    @staticmethod
    def _recorder(name: str, seen: dict[str, Tensor]) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                seen.setdefault(name, out)
        return hook

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        modules = dict(self.model.named_modules())
        logits: list[Tensor] = []
        early = not self.training and self.threshold is not None
        if early and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            raise RuntimeError("an early-exit model decides per input where to stop, which one traced graph cannot; "
                               "slimkit.export.export_early_exit writes it as one ONNX file that stops each input "
                               "at its first sure exit, or set threshold=None to export every exit's output")
        state: dict[str, Tensor] = {}

        def at_exit(i: int) -> Any:
            head = self.heads[self._key(self.exits[i])]

            def hook(module: nn.Module, a: Any, out: Tensor) -> None:
                z = head(out)
                logits.append(z)
                if not early:
                    return
                if "out" not in state:
                    state["out"] = torch.zeros_like(z)
                    state["decided"] = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
                    state["which"] = torch.full((z.shape[0],), len(self.exits), dtype=torch.long, device=z.device)
                sure = (z.softmax(-1).amax(-1) >= float(self.threshold or 0.0)) & ~state["decided"]
                state["out"][sure] = z[sure]
                state["which"][sure] = i
                state["decided"] |= sure
                if bool(state["decided"].all()):
                    raise _Done
            return hook

        handles = [modules[n].register_forward_hook(at_exit(i)) for i, n in enumerate(self.exits)]
        try:
            final = self.model(*args, **kwargs)
        except _Done:
            self.last_exit = state["which"]
            return state["out"]
        finally:
            for h in handles:
                h.remove()
        if not early:
            return (*logits, final)
        rest = ~state["decided"]
        out = state["out"]
        out[rest] = final[rest]
        self.last_exit = state["which"]
        return out
