"""Truncated SVD of a weight matrix, the optimal low-rank approximation (Eckart and Young 1936).

``W [out, in] ~= B @ A`` with ``B = U_r S_r^(1/2)`` ``[out, r]`` and ``A = S_r^(1/2) V_r^T`` ``[r, in]``:
the singular values are split evenly so both factors have the same scale, which keeps them friendly
to per-channel quantization. The Frobenius error is ``sqrt(sum_{i>r} s_i^2)``, the least any rank-r
matrix can reach.

>>> import torch
>>> w = torch.randn(6, 4)
>>> b, a = truncated_svd(w, 4)
>>> torch.allclose(b @ a, w, atol=1e-5)
True
>>> rank_for_energy(torch.tensor([3.0, 1.0, 0.1]), 0.85)  # 9 of 10.01
1
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["truncated_svd", "singular_values", "rank_for_energy", "svd_error"]


def truncated_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B [out, r], A [r, in])`` with ``B @ A`` the best rank-``rank`` approximation of ``w``."""
    if w.dim() != 2:
        raise ValueError(f"truncated_svd needs a matrix, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} matrix, got {rank}")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)  # u [out, k], s [k], vh [k, in]
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # [out, r]
    a = root[:, None] * vh[:rank]  # [r, in]
    return b.to(w.dtype), a.to(w.dtype)


def singular_values(w: Tensor) -> Tensor:
    return torch.linalg.svdvals(w.double())


def rank_for_energy(s: Tensor, energy: float) -> int:
    """The smallest rank whose singular values hold ``energy`` of ``sum(s**2)``."""
    e = (s.double() ** 2).cumsum(0)
    if float(e[-1]) == 0.0:
        return 1
    return int(torch.searchsorted(e / e[-1], torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1


def svd_error(s: Tensor, rank: int) -> float:
    """The Eckart-Young optimum: the Frobenius error of the best rank-``rank`` approximation."""
    return float((s.double()[rank:] ** 2).sum().sqrt())
