"""Spatial SVD of a convolution (Jaderberg, Vedaldi and Zisserman 2014, scheme 2): a ``kh x kw``
conv becomes a ``kh x 1`` conv into ``r`` channels followed by a ``1 x kw`` conv.

The kernel ``W [O, I, kh, kw]`` is laid out as the matrix ``M[(i, h), (o, w)]`` of shape
``[I*kh, O*kw]``; its truncated SVD ``M ~= U_r S_r V_r^T`` gives the vertical filters
``V1[r, i, h] = (U_r S_r^(1/2))[(i, h), r]`` and the horizontal ones
``V2[o, r, w] = (S_r^(1/2) V_r^T)[r, (o, w)]``. Composing the two convs applies exactly the rank-r
kernel, so the error is the Eckart-Young optimum for that layout.

>>> import torch
>>> w = torch.randn(4, 3, 3, 3)
>>> v, h = spatial_svd(w, 9)
>>> v.shape, h.shape
(torch.Size([9, 3, 3, 1]), torch.Size([4, 9, 1, 3]))
>>> torch.allclose(spatial_reconstruct(v, h), w, atol=1e-5)
True
"""

from __future__ import annotations

from torch import Tensor

from .svd import truncated_svd

__all__ = ["spatial_matrix", "spatial_svd", "spatial_reconstruct"]


def spatial_matrix(w: Tensor) -> Tensor:
    o, i, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(i * kh, o * kw)  # M[(i, h), (o, w)]


def spatial_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(vertical [r, I, kh, 1], horizontal [O, r, 1, kw])`` for the conv kernel ``w``."""
    o, i, kh, kw = w.shape
    b, a = truncated_svd(spatial_matrix(w), rank)  # b [I*kh, r], a [r, O*kw]
    vertical = b.t().reshape(rank, i, kh, 1)
    horizontal = a.reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


def spatial_reconstruct(vertical: Tensor, horizontal: Tensor) -> Tensor:
    """The ``[O, I, kh, kw]`` kernel the two convs apply together."""
    return (vertical[:, :, :, 0][None, :, :, :, None] * horizontal[:, :, 0, :][:, :, None, None, :]).sum(1)
