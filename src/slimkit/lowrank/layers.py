"""Per-layer surgery: which layers a method takes, their ranks, and the replacement modules.

Each method maps a layer and its ranks to a ``Factorized`` sequence of standard ``nn.Linear`` /
``nn.Conv2d`` modules, so the result exports to ONNX and quantizes like any other layer. The
sequence keeps the replaced layer's attributes (``in_features``, ``stride``...) and reads
``weight`` / ``bias`` as the dense layer it approximates, for model code that reads them
(``nn.MultiheadAttention`` reads ``out_proj.weight``).

>>> import torch
>>> from torch import nn
>>> lin = nn.Linear(64, 32)
>>> ranks_for_ratio("svd", lin, 0.5)
[10]
>>> f = factorized("svd", lin, [10])
>>> [tuple(m.weight.shape) for m in f], param_count("svd", lin, [10])
([(10, 64), (32, 10)], 960)
>>> f.in_features, tuple(f.weight.shape), bool(torch.allclose(f(torch.eye(64)), torch.eye(64) @ f.weight.t() + f.bias))
(64, (32, 64), True)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slimkit.core.dropin import adopt
from slimkit.core.layers import in_own_layout

from .cp import cp_als
from .spatial_svd import spatial_matrix, spatial_svd
from .svd import rank_for_energy, singular_values, truncated_svd
from .tucker import tucker2, unfold
from .whitened_svd import whitened_singular_values, whitened_svd

__all__ = ["Factorized", "why_not", "rank_limit", "ranks_for_rank", "ranks_for_ratio", "ranks_for_energy",
           "param_count", "factorized", "weight_count", "approx_weight"]


def why_not(method: str, m: nn.Module) -> str | None:
    """``None`` when ``method`` can factorize ``m``, else the reason it cannot."""
    if method == "svd":
        if isinstance(m, nn.Linear):
            return None
        if not (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)):
            return f"{type(m).__name__} is not nn.Linear or a 1x1 conv (svd takes matrix-shaped layers)"
    if not isinstance(m, nn.Conv2d):
        return f"{type(m).__name__} is not nn.Conv2d ({method} takes 2-D convolutions)"
    if m.groups != 1:
        kind = "depthwise" if m.groups == m.in_channels else "grouped"
        return f"{kind} conv (groups={m.groups}): {method} needs a dense conv"
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return f"padding {m.padding!r}/{m.padding_mode!r}: only numeric zero padding is supported"
    kh, kw = m.kernel_size
    if method == "svd":
        return None
    if kh * kw == 1:
        return "1x1 conv: nothing spatial to decompose (use method svd)"
    if method == "spatial-svd" and (kh == 1 or kw == 1):
        return f"kernel {kh}x{kw} is already separable"
    return None


def weight_count(m: nn.Module) -> int:
    return int(m.weight.numel())  # type: ignore[union-attr, operator]


def _dims(m: nn.Module) -> tuple[int, int, int, int]:
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features, 1, 1
    assert isinstance(m, nn.Conv2d)
    return m.out_channels, m.in_channels, m.kernel_size[0], m.kernel_size[1]


def param_count(method: str, m: nn.Module, ranks: list[int]) -> int:
    """Weights of the factorized layer (biases are unchanged and not counted)."""
    o, i, kh, kw = _dims(m)
    if method == "svd":
        return ranks[0] * (o + i)
    if method == "spatial-svd":
        return ranks[0] * (i * kh + o * kw)
    if method == "tucker":
        r_out, r_in = ranks
        return i * r_in + r_in * r_out * kh * kw + r_out * o
    return ranks[0] * (o + i + kh + kw)  # cp


def rank_limit(method: str, m: nn.Module) -> list[int]:
    o, i, kh, kw = _dims(m)
    if method == "svd":
        return [min(o, i)]
    if method == "spatial-svd":
        return [min(i * kh, o * kw)]
    if method == "tucker":
        return [o, i]
    return [o * i * kh * kw]  # cp: no useful hard limit; parameter saving decides


def ranks_for_rank(method: str, m: nn.Module, rank: int) -> list[int]:
    """An explicit rank; for Tucker capped at each mode's size. Above the limit is an error."""
    limit = rank_limit(method, m)
    if method == "tucker":
        return [min(rank, limit[0]), min(rank, limit[1])]
    if rank > limit[0]:
        raise ValueError(f"rank {rank} is above this layer's limit of {limit[0]}")
    return [rank]


def ranks_for_ratio(method: str, m: nn.Module, ratio: float) -> list[int]:
    """The largest ranks whose factorized weights are at most ``ratio`` of the layer's (at least 1)."""
    o, i, kh, kw = _dims(m)
    budget = ratio * o * i * kh * kw
    if method == "tucker":
        # r_in = a*I, r_out = a*O: a*I*I + a^2*I*O*kh*kw + a*O*O = budget, solved for a
        qa, qb = i * o * kh * kw, i * i + o * o
        a = (-qb + math.sqrt(qb * qb + 4 * qa * budget)) / (2 * qa)
        r = [max(1, min(o, int(a * o))), max(1, min(i, int(a * i)))]
        while param_count(method, m, r) > budget and max(r) > 1:
            k = 0 if r[0] * i >= r[1] * o else 1  # shrink the relatively larger mode
            if r[k] == 1:
                k = 1 - k
            r[k] -= 1
        return r
    per_rank = param_count(method, m, [1])
    rank = max(1, int(budget // per_rank))
    return [min(rank, rank_limit(method, m)[0])]


def ranks_for_energy(method: str, m: nn.Module, energy: float, factor: Tensor | None = None) -> list[int]:
    w = m.weight.detach()  # type: ignore[union-attr, operator]
    if method == "svd":
        w2 = w.reshape(w.shape[0], -1)
        s = singular_values(w2) if factor is None else whitened_singular_values(w2, factor)
        return [rank_for_energy(s, energy)]
    if method == "spatial-svd":
        return [rank_for_energy(singular_values(spatial_matrix(w)), energy)]
    if method == "tucker":
        return [rank_for_energy(singular_values(unfold(w, 0)), energy),
                rank_for_energy(singular_values(unfold(w, 1)), energy)]
    raise ValueError("energy is not defined for CP")


class Factorized(nn.Sequential):
    """The layers a factorized layer became, applied in turn, carrying the replaced layer's
    attributes; ``weight`` and ``bias`` read the dense layer the factors apply (read-only)."""

    def __init__(self, method: str, layer: nn.Module, *factors: nn.Module) -> None:
        super().__init__(*factors)
        self.method = method
        adopt(self, layer, skip=("weight", "bias"))

    @property
    def weight(self) -> Tensor:
        f: list[Tensor] = [m.weight for m in self.children()]  # type: ignore[misc]
        if self.method == "svd":
            w = f[1].reshape(f[1].shape[0], -1) @ f[0].reshape(f[0].shape[0], -1)
            if f[0].dim() == 2:
                return in_own_layout(self, w)  # HF's Conv1D reads [in, out]
            return w.reshape(w.shape[0], -1, *f[0].shape[2:])
        if self.method == "spatial-svd":  # V [r, i, kh, 1], H [o, r, 1, kw]
            return torch.einsum("rih,orw->oihw", f[0][..., 0], f[1][:, :, 0])
        if self.method == "tucker":  # U_in [r_in, i], core [r_out, r_in, kh, kw], U_out [o, r_out]
            return torch.einsum("bi,abhw,oa->oihw", f[0][:, :, 0, 0], f[1], f[2][:, :, 0, 0])
        # cp: A_i [r, i], A_h [r, kh] and A_w [r, kw] depthwise, A_o [o, r]
        return torch.einsum("ri,rh,rw,or->oihw", f[0][:, :, 0, 0], f[1][:, 0, :, 0], f[2][:, 0, 0, :],
                            f[3][:, :, 0, 0])

    @property
    def bias(self) -> Tensor | None:
        last = list(self.children())[-1]
        return last.bias if isinstance(last.bias, Tensor) else None


def _conv(cin: int, cout: int, kernel: tuple[int, int], weight: Tensor, bias: Tensor | None = None,
          stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
          dilation: tuple[int, int] = (1, 1), groups: int = 1) -> nn.Conv2d:
    c = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  bias=bias is not None)
    with torch.no_grad():
        c.weight.copy_(weight.reshape(c.weight.shape))
        if bias is not None:
            assert c.bias is not None
            c.bias.copy_(bias)
    return c


def _svd(w: Tensor, rank: int, factor: Tensor | None) -> tuple[Tensor, Tensor]:
    w2 = w.reshape(w.shape[0], -1)
    return truncated_svd(w2, rank) if factor is None else whitened_svd(w2, factor, rank)


@torch.no_grad()
def factorized(method: str, m: nn.Module, ranks: list[int], iterations: int = 25,
               factor: Tensor | None = None) -> Factorized:
    """The replacement for ``m``: a sequence of standard layers applying the factorized weights.
    ``factor`` (svd only): the input whitening factor of a data-whitened SVD."""
    w = m.weight.detach()  # type: ignore[union-attr, operator]
    bias = m.bias.detach() if m.bias is not None else None  # type: ignore[union-attr, operator]
    dev, dt = w.device, w.dtype
    if method == "svd" and isinstance(m, nn.Conv2d):  # a 1x1 conv is a matrix applied at every pixel
        b, a = _svd(w, ranks[0], factor)
        return Factorized(
            method, m, _conv(m.in_channels, ranks[0], (1, 1), a, None, m.stride, m.padding, m.dilation),  # type: ignore[arg-type]
            _conv(ranks[0], m.out_channels, (1, 1), b, bias),
        ).to(dev, dt)
    if method == "svd":
        assert isinstance(m, nn.Linear)
        b, a = _svd(w, ranks[0], factor)
        first, second = nn.Linear(m.in_features, ranks[0], bias=False), nn.Linear(ranks[0], m.out_features,
                                                                                 bias=bias is not None)
        first.weight.copy_(a)
        second.weight.copy_(b)
        if bias is not None:
            assert second.bias is not None
            second.bias.copy_(bias)
        return Factorized(method, m, first, second).to(dev, dt)
    assert isinstance(m, nn.Conv2d)
    o, i, kh, kw = _dims(m)
    (sh, sw), (dh, dw) = m.stride, m.dilation
    ph, pw = int(m.padding[0]), int(m.padding[1])  # numeric: why_not refuses string padding
    if method == "spatial-svd":
        r = ranks[0]
        v, h = spatial_svd(w, r)
        return Factorized(
            method, m, _conv(i, r, (kh, 1), v, None, (sh, 1), (ph, 0), (dh, 1)),
            _conv(r, o, (1, kw), h, bias, (1, sw), (0, pw), (1, dw)),
        ).to(dev, dt)
    if method == "tucker":
        r_out, r_in = ranks
        core, u_out, u_in = tucker2(w, (r_out, r_in), iterations)
        return Factorized(
            method, m, _conv(i, r_in, (1, 1), u_in.t()),
            _conv(r_in, r_out, (kh, kw), core, None, m.stride, m.padding, m.dilation),  # type: ignore[arg-type]
            _conv(r_out, o, (1, 1), u_out, bias),
        ).to(dev, dt)
    r = ranks[0]
    a_o, a_i, a_h, a_w = cp_als(w, r, iterations)
    return Factorized(
        method, m, _conv(i, r, (1, 1), a_i.t()),
        _conv(r, r, (kh, 1), a_h.t(), None, (sh, 1), (ph, 0), (dh, 1), groups=r),
        _conv(r, r, (1, kw), a_w.t(), None, (1, sw), (0, pw), (1, dw), groups=r),
        _conv(r, o, (1, 1), a_o, bias),
    ).to(dev, dt)


@torch.no_grad()
def approx_weight(method: str, m: nn.Module, ranks: list[int], iterations: int = 25,
                  factor: Tensor | None = None) -> Tensor:
    """The dense weight the factorized layer applies (for weight-error sensitivity)."""
    from .cp import cp_reconstruct
    from .spatial_svd import spatial_reconstruct
    from .tucker import tucker_reconstruct

    w = m.weight.detach()  # type: ignore[union-attr, operator]
    if method == "svd":
        b, a = _svd(w, ranks[0], factor)
        return (b @ a).reshape(w.shape)
    if method == "spatial-svd":
        return spatial_reconstruct(*spatial_svd(w, ranks[0]))
    if method == "tucker":
        return tucker_reconstruct(*tucker2(w, (ranks[0], ranks[1]), iterations))
    return cp_reconstruct(cp_als(w, ranks[0], iterations))
