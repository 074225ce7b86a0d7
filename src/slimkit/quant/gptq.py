"""GPTQ (Frantar et al. 2022): round a Linear layer's weights one input column at a time and push
each column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
``H = 2 X^T X`` of the layer's calibration inputs, so the layer's *output* error stays small.

The paper's implementation choices are kept: the Cholesky factor of ``H^-1`` (numerically stable),
dampening ``H`` by ``damp`` times its mean diagonal, lazy batch updates over ``block_size``
columns, dead inputs (never non-zero) zeroed, and optional act-order (columns by decreasing
``H`` diagonal) with group parameters fixed up front ("static groups"), so that the groups still
run along the original input order MatMulNBits expects.

>>> import torch
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> x = torch.randn(512, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(512, 64)  # correlated inputs
>>> w = torch.randn(32, 64)
>>> h = hessian(x)
>>> q, scale, zp = gptq(w, h, bits=4, group_size=32)
>>> from slimkit.quant.weight_only import dequantize_groups, rtn_groups
>>> def err(q, s, z): return float(((x @ (dequantize_groups(q, s, z) - w).T) ** 2).mean())
>>> err(q, scale, zp) < 0.2 * err(*rtn_groups(w, 4, 32))  # the error the next layer sees
True
>>> err(*gptq(w, h, bits=4, group_size=32, act_order=True)) < err(q, scale, zp)
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimkit.quant.weight_only import group_qparams

__all__ = ["hessian", "gptq", "inverse_cholesky"]


def hessian(x: Tensor) -> Tensor:
    """``2 X^T X / n`` of inputs ``x`` (any leading shape, features last), in float64."""
    flat = x.detach().reshape(-1, x.shape[-1]).double()
    if flat.shape[0] == 0:
        raise ValueError("GPTQ needs calibration inputs; the layer saw none")
    return (flat.T @ flat).mul_(2.0).div_(flat.shape[0])  # in place: [in, in] float64 is large


def inverse_cholesky(h: Tensor) -> Tensor:
    """The upper Cholesky factor ``U`` of ``h^-1`` (``h^-1 = U^T U``) for a symmetric positive
    definite ``h``, computed in ``h``'s own memory (``h`` is consumed): the factor, the inverse and
    the factor of the inverse each overwrite it, so a ``[5632, 5632]`` float64 Hessian needs 254 MB,
    not twice that. ``h`` is symmetric, so its transpose is the same matrix in the column-major
    layout LAPACK works in, and each step writes there in place. Returns a (column-major) view of
    ``h``'s storage; where torch will not write a result over its input, an ordinary copy."""
    t = _in_place(torch.linalg.cholesky, h.mT)
    t = _in_place(torch.cholesky_inverse, t)
    return _in_place(torch.linalg.cholesky, t, upper=True)


def _in_place(fn: Any, t: Tensor, **kwargs: Any) -> Tensor:
    try:
        fn(t, out=t, **kwargs)
    except RuntimeError as e:
        if "memory location" not in str(e):  # not the refusal to alias: not positive definite
            raise
        return fn(t, **kwargs)
    return t


@torch.no_grad()
def gptq(weight: Tensor, h: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
         block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         rows: int = 4096, overwrite: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``weight`` ``[out, in]`` given the Hessian ``h`` ``[in, in]`` of its inputs.
    Returns ``(q, scale, zp)`` in the layout of ``weight_only.rtn_groups``. Output rows are
    independent given ``H``: they are rounded ``rows`` at a time, so the float64 working copy of a
    large layer (an output head over 32000 tokens) is a slice of it. ``overwrite``: ``h`` (float64)
    is the caller's to give up, and is used as the working copy."""
    out_f, in_f = weight.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"the Hessian is {tuple(h.shape)}, the weight has {in_f} inputs")
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian holds NaN or inf: the calibration inputs are not finite")
    # the float64 [in, in] Hessian is the largest thing here (254 MB for an input of 5632): one copy at most
    h = h if overwrite and h.dtype == torch.float64 else h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    if act_order:
        h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        hinv = inverse_cholesky(h)
    except RuntimeError as e:
        raise ValueError(f"GPTQ: the Hessian is not positive definite even after dampening ({e}); "
                         "raise damp or give more calibration data") from e
    del h
    q = torch.zeros(out_f, in_f, dtype=torch.uint8)
    groups = -(-in_f // group_size)
    scale, zp = torch.zeros(out_f, groups), torch.zeros(out_f, groups)
    for r in range(0, out_f, rows):
        q[r:r + rows], scale[r:r + rows], zp[r:r + rows] = _rows(
            weight[r:r + rows], hinv, perm, dead, bits, group_size, symmetric, block_size, act_order)
    return q, scale, zp


def _rows(weight: Tensor, hinv: Tensor, perm: Tensor, dead: Tensor, bits: int, group_size: int, symmetric: bool,
          block_size: int, act_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's column sweep over some output rows of the weight."""
    out_f, in_f = weight.shape
    w = weight.detach().double()  # a copy, unless the weight is float64 already
    if weight.dtype == torch.float64:
        w = w.clone()
    w[:, dead] = 0.0
    # the group grids: from the weights as they are (static groups) when the order is permuted,
    # else from the updated weights as each group is reached, as in the paper
    scale, zp = group_qparams(w, bits, group_size, symmetric)
    scale, zp = scale.double(), zp.double()
    if act_order:
        w = w[:, perm]
    qmax = 2**bits - 1
    q = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if not act_order and col % group_size == 0:  # entering a group: its grid from the current weights
                cur = torch.cat([w1[:, i:], w[:, i2:i2 + group_size]], 1)[:, :group_size]
                s, z = group_qparams(cur, bits, group_size, symmetric)
                scale[:, g], zp[:, g] = s[:, 0].double(), z[:, 0].double()
            wi = w1[:, i]
            qi = torch.clamp(torch.round(wi / scale[:, g]) + zp[:, g], 0, qmax)
            q[:, col] = qi.to(torch.uint8)
            delta = (wi - (qi - zp[:, g]) * scale[:, g]) / hinv1[i, i]
            w1[:, i:] -= delta[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = delta
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q, scale.float(), zp.float()
