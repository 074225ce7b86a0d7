"""Tucker-2 decomposition of a convolution kernel (Kim et al. 2016, "Compression of Deep
Convolutional Neural Networks for Fast and Low Power Mobile Applications").

``W [O, I, kh, kw] ~= G x_0 U_out x_1 U_in`` with orthonormal ``U_out [O, r_out]``,
``U_in [I, r_in]`` and the core ``G [r_out, r_in, kh, kw]``: a 1x1 conv ``I -> r_in``
(``U_in^T``), the core as a ``kh x kw`` conv ``r_in -> r_out``, and a 1x1 conv ``r_out -> O``
(``U_out``). The factors start from the higher-order SVD (De Lathauwer et al. 2000: the leading
left singular vectors of each mode's unfolding) and are refined by higher-order orthogonal
iteration (HOOI), which never increases the error: with orthonormal factors the error is
``||W||^2 - ||G||^2`` and each HOOI step maximizes ``||G||`` over one factor given the other.

>>> import torch
>>> w = torch.randn(8, 6, 3, 3)
>>> g, uo, ui = tucker2(w, (8, 6))
>>> torch.allclose(tucker_reconstruct(g, uo, ui), w, atol=1e-5)
True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unfold", "leading_vectors", "hosvd", "tucker2", "tucker_reconstruct"]


def unfold(t: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding: ``[t.shape[mode], prod(other dims)]``."""
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def leading_vectors(m: Tensor, r: int) -> Tensor:
    """The ``r`` leading left singular vectors of ``m``, ``[rows, r]``."""
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r]


def _core(w: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    return torch.einsum("oihw,or,is->rshw", w, u_out, u_in)


def hosvd(w: Tensor, ranks: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated HOSVD on the output and input modes: ``(core, U_out, U_in)``."""
    r_out, r_in = ranks
    wd = w.double()
    u_out, u_in = leading_vectors(unfold(wd, 0), r_out), leading_vectors(unfold(wd, 1), r_in)
    return _core(wd, u_out, u_in).to(w.dtype), u_out.to(w.dtype), u_in.to(w.dtype)


def tucker2(w: Tensor, ranks: tuple[int, int], iterations: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 by HOSVD then ``iterations`` HOOI sweeps: ``(core [r_out, r_in, kh, kw],
    U_out [O, r_out], U_in [I, r_in])``."""
    o, i = w.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= o and 1 <= r_in <= i):
        raise ValueError(f"Tucker ranks must be in [1, {o}] x [1, {i}] for a kernel of shape "
                         f"{tuple(w.shape)}, got {ranks}")
    wd = w.double()
    u_out, u_in = leading_vectors(unfold(wd, 0), r_out), leading_vectors(unfold(wd, 1), r_in)
    for _ in range(iterations):
        y = torch.einsum("oihw,is->oshw", wd, u_in)  # project the input mode, solve the output one
        u_out = leading_vectors(unfold(y, 0), r_out)
        y = torch.einsum("oihw,or->rihw", wd, u_out)
        u_in = leading_vectors(unfold(y, 1), r_in)
    return _core(wd, u_out, u_in).to(w.dtype), u_out.to(w.dtype), u_in.to(w.dtype)


def tucker_reconstruct(core: Tensor, u_out: Tensor, u_in: Tensor) -> Tensor:
    return torch.einsum("rshw,or,is->oihw", core, u_out, u_in)
