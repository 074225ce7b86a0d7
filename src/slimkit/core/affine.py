"""Affine (uniform) quantization as pure tensor functions.

A real value ``x`` maps to an integer ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
back to ``x_hat = (q - zero_point) * scale`` (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", eq. 1). Rounding is half-to-even, and the
division is done as a multiplication by ``1 / scale`` in float32, exactly as torch's
``fake_quantize_per_*_affine`` kernels do, so the two agree bit for bit.

Granularity is expressed by the shape of ``scale``/``zero_point`` and an ``axis``:
per-tensor (0-d scale), per-channel (1-d scale along ``axis``) and per-group (see ``group_view``).

>>> import torch
>>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), bits=8, signed=False)
>>> float(s), int(z)
(0.01568627543747425, 64)
>>> fake_quantize(torch.tensor([0.5, 9.0]), s, z, 0, 255).tolist()
[0.501960813999176, 2.9960784912109375]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "qrange",
    "choose_qparams",
    "quantize",
    "dequantize",
    "requantize",
    "fake_quantize",
    "group_view",
    "tensor_minmax",
]

_EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range for ``bits`` bits; ``narrow`` drops the most negative code (symmetric range).

    >>> qrange(8, True), qrange(8, False), qrange(4, True, narrow=True)
    ((-128, 127), (0, 255), (-7, 7))
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, 2**bits - 1 - (1 if narrow else 0)


def _broadcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Reshape a per-channel parameter so it broadcasts against ``x`` along ``axis``."""
    if axis is None or p.dim() == 0:
        return p
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def choose_qparams(
    min_val: Tensor,
    max_val: Tensor,
    bits: int = 8,
    signed: bool = True,
    symmetric: bool = False,
    narrow: bool = False,
) -> tuple[Tensor, Tensor]:
    """Scale and zero-point covering ``[min_val, max_val]`` (any shape: one pair per element).

    The range is first widened to include 0 so that zero is exactly representable (padding and
    ReLU outputs must dequantize to exact zeros). Symmetric schemes put the zero-point in the
    middle of the range (0 for signed, ``2**(bits-1)`` for unsigned).

    >>> s, z = choose_qparams(torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 4.0]), symmetric=True)
    >>> [round(v, 6) for v in s.tolist()], z.tolist()
    ([0.015686, 0.031373], [0, 0])
    """
    qmin, qmax = qrange(bits, signed, narrow)
    min_val = torch.clamp(torch.as_tensor(min_val, dtype=torch.float32), max=0.0)
    max_val = torch.clamp(torch.as_tensor(max_val, dtype=torch.float32), min=0.0)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("choose_qparams: the observed range holds NaN or inf")
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = amax / ((qmax - qmin) / 2)
        scale = torch.clamp(scale, min=_EPS)
        mid = 0 if signed else (qmin + qmax + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
        return scale, zero_point
    scale = torch.clamp((max_val - min_val) / float(qmax - qmin), min=_EPS)
    zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Integers (as an integer tensor of the narrowest fitting dtype) for ``x``."""
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), x, axis)
    z = _broadcast(torch.as_tensor(zero_point), x, axis)
    q = torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax)
    return q.to(_int_dtype(qmin, qmax))


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values for integers ``q``."""
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), q, axis)
    z = _broadcast(torch.as_tensor(zero_point), q, axis)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


def requantize(
    q: Tensor,
    scale_in: Tensor,
    zero_point_in: Tensor,
    scale_out: Tensor,
    zero_point_out: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """Move integers from one (scale, zero-point) to another, as an integer kernel's epilogue does:
    ``q_out = clamp(round((q_in - z_in) * s_in / s_out) + z_out)``.

    >>> requantize(torch.tensor([10, 20]), torch.tensor(0.5), torch.tensor(0),
    ...            torch.tensor(1.0), torch.tensor(3), 0, 255).tolist()
    [8, 13]
    """
    real = dequantize(q, scale_in, zero_point_in, axis)
    return quantize(real, scale_out, zero_point_out, qmin, qmax, axis)


class _RoundSTE(torch.autograd.Function):
    """Round in the forward pass, identity gradient (straight-through estimator, Bengio et al.)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Quantize then dequantize, in float. Gradients pass straight through inside the range and
    are zero outside it (clipped values), as in torch's fake-quant ops and QAT practice.
    """
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32, device=x.device), x, axis)
    z = _broadcast(torch.as_tensor(zero_point, device=x.device), x, axis).to(x.dtype)
    q = _RoundSTE.apply(x * (1.0 / s)) + z
    q = torch.clamp(q, qmin, qmax)
    return (q - z) * s


def group_view(w: Tensor, group_size: int) -> Tensor:
    """View a weight ``[out, in, ...]`` as ``[out, in // group_size, group_size * prod(...)]``.

    Per-group quantization computes one (scale, zero-point) per row of the last dimension; groups
    run along the input dimension, as in GPTQ/AWQ's group-wise INT4.
    """
    if w.dim() < 2:
        raise ValueError(f"group_view needs a weight with at least 2 dims, got shape {tuple(w.shape)}")
    cin = w.shape[1]
    if group_size <= 0 or cin % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the input dimension {cin}; "
            "choose a divisor of it"
        )
    return w.reshape(w.shape[0], cin // group_size, -1)


def tensor_minmax(x: Tensor, axis: int | None = None) -> tuple[Tensor, Tensor]:
    """Min and max of ``x``, over everything (``axis=None``) or per slice along ``axis``."""
    if x.numel() == 0:
        raise ValueError("cannot take the range of an empty tensor")
    if axis is None:
        return x.min(), x.max()
    axis = axis % x.dim()
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= -(2**15) and qmax < 2**15:
        return torch.int16
    return torch.int32
