"""Cross-layer equalization (Nagel, van Baalen, Blankevoort and Welling 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", sec. 4.1).

For two layers with only a positively homogeneous function between them (ReLU, or nothing),
``f(W2 relu(W1 x + b1))`` is unchanged when output channel ``i`` of the first layer is divided by
``s_i > 0`` and input channel ``i`` of the second multiplied by it. With ``r1_i`` and ``r2_i`` the
channel's weight ranges in each layer, ``s_i = sqrt(r1_i / r2_i)`` makes both ``sqrt(r1_i r2_i)``,
which maximises the per-tensor precision of the pair (eq. 9). Depthwise convolutions, whose
per-channel ranges differ by orders of magnitude, gain the most.

>>> import torch
>>> w1, b1, w2 = torch.tensor([[4.0], [0.25]]), torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 1.0]])
>>> w1e, b1e, w2e, s = equalize_pair(w1, b1, w2)
>>> w1e.abs().amax(1).tolist(), w2e.abs().amax(0).tolist()
([2.0, 0.5], [2.0, 0.5])
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["equalize_pair", "equalization_pairs", "equalize", "relu6_to_relu"]

log = logging.getLogger(__name__)

_RELU_FUNCTIONS = (F.relu, torch.relu)


def _in_ranges(w2: Tensor, groups: int) -> Tensor:
    """Range of each input channel's weights in a layer (1 group, or depthwise)."""
    if groups == 1:
        return w2.transpose(0, 1).reshape(w2.shape[1], -1).abs().amax(1)
    return w2.reshape(w2.shape[0], -1).abs().amax(1)  # depthwise: input channel i feeds filter i only


def equalize_pair(w1: Tensor, b1: Tensor | None, w2: Tensor, groups2: int = 1) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Equalized ``(w1, b1, w2)`` and the scales ``s``; ``w1`` is [C, ...] (output channels first),
    ``w2`` is [D, C, ...] (one group) or [C, 1, ...] (depthwise, ``groups2 == C``)."""
    c = w1.shape[0]
    r1 = w1.reshape(c, -1).abs().amax(1)
    r2 = _in_ranges(w2, groups2)
    if r2.shape[0] != c:
        raise ValueError(f"the first layer has {c} output channels, the second {r2.shape[0]} input channels")
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-30)), torch.ones_like(r1))
    shape1 = [-1] + [1] * (w1.dim() - 1)
    w1e = w1 / s.reshape(shape1)
    b1e = None if b1 is None else b1 / s
    if groups2 == 1:
        w2e = w2 * s.reshape([1, -1] + [1] * (w2.dim() - 2))
    else:
        w2e = w2 * s.reshape([-1] + [1] * (w2.dim() - 1))
    return w1e, b1e, w2e, s


def _weighted(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Conv1d)) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def equalization_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(first, second)`` module names joined by ReLUs or nothing, where the first layer's output
    goes nowhere else and the second has one group or is depthwise."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _weighted(modules.get(str(node.target))):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            target = modules.get(str(nxt.target)) if nxt.op == "call_module" else None
            if _weighted(target) and nxt.args and nxt.args[0] is cur:
                first = modules[str(node.target)]
                assert target is not None
                groups = getattr(target, "groups", 1)
                if (groups == 1 or _depthwise(target)) and first.weight.shape[0] == (
                        target.weight.shape[1] if groups == 1 else target.weight.shape[0]):
                    pairs.append((str(node.target), str(nxt.target)))
                break
            relu = (nxt.op == "call_module" and isinstance(target, nn.ReLU)) or \
                   (nxt.op == "call_function" and nxt.target in _RELU_FUNCTIONS) or \
                   (nxt.op == "call_method" and nxt.target in ("relu", "relu_"))
            if not relu:
                break
            cur = nxt
    return pairs


@torch.no_grad()
def equalize(gm: fx.GraphModule, iterations: int = 20, tol: float = 1e-4) -> list[tuple[str, str]]:
    """Equalize every pair of ``gm`` in place (BatchNorm already folded), repeating over chains of
    pairs until the scales settle; returns the pairs."""
    modules = dict(gm.named_modules())
    pairs = equalization_pairs(gm)
    for _ in range(iterations):
        worst = 0.0
        for a, b in pairs:
            m1, m2 = modules[a], modules[b]
            w1, b1, w2, s = equalize_pair(m1.weight, m1.bias, m2.weight, m2.groups if _depthwise(m2) else 1)
            m1.weight.copy_(w1)
            if m1.bias is not None and b1 is not None:
                m1.bias.copy_(b1)
            m2.weight.copy_(w2)
            worst = max(worst, float((s - 1).abs().max()))
        if worst < tol:
            break
    log.info("cross-layer equalization: %d layer pairs", len(pairs))
    return pairs


def relu6_to_relu(model: nn.Module) -> list[str]:
    """Replace ``nn.ReLU6`` modules by ``nn.ReLU`` in place (ReLU6 is not positively homogeneous, so
    it blocks equalization; the paper does the same for MobileNetV2). Returns the names replaced."""
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, child_name, nn.ReLU(inplace=child.inplace))
                done.append(f"{name}.{child_name}" if name else child_name)
    return done
