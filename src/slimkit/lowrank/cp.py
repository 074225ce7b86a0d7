"""CP (CANDECOMP/PARAFAC) decomposition of a convolution kernel by alternating least squares
(Lebedev et al. 2015, "Speeding-up Convolutional Neural Networks Using Fine-tuned
CP-Decomposition"; ALS as in Kolda and Bader 2009, sec. 3.4).

``W[o, i, h, w] ~= sum_r A_o[o, r] A_i[i, r] A_h[h, r] A_w[w, r]``: a 1x1 conv ``I -> R``
(``A_i^T``), a depthwise ``kh x 1`` conv (``A_h``), a depthwise ``1 x kw`` conv (``A_w``), and a
1x1 conv ``R -> O`` (``A_o``). Each ALS step solves one factor exactly given the others:
``A_n = W_(n) (Khatri-Rao of the others) (Hadamard of their Gram matrices)^+`` (Kolda and Bader,
eq. 3.5), computed as an einsum (the MTTKRP) without forming the Khatri-Rao product.

>>> import torch
>>> f = [torch.randn(d, 2) for d in (4, 3, 3, 3)]
>>> w = cp_reconstruct(f)
>>> g = cp_als(w, 2, iterations=200)
>>> float((cp_reconstruct(g) - w).norm() / w.norm()) < 1e-3
True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cp_als", "cp_reconstruct"]

_MODES = "oihw"


def cp_reconstruct(factors: list[Tensor]) -> Tensor:
    """``sum_r`` of the outer products of the factors' columns: ``[O, I, kh, kw]``."""
    spec = ",".join(f"{m}r" for m in _MODES) + "->" + _MODES
    return torch.einsum(spec, *factors)


def _mttkrp(t: Tensor, factors: list[Tensor], n: int) -> Tensor:
    others = [f"{m}r" for k, m in enumerate(_MODES) if k != n]
    spec = f"{_MODES}," + ",".join(others) + f"->{_MODES[n]}r"
    return torch.einsum(spec, t, *[f for k, f in enumerate(factors) if k != n])


def cp_als(w: Tensor, rank: int, iterations: int = 50, seed: int = 0, tol: float = 1e-7) -> list[Tensor]:
    """Rank-``rank`` CP factors ``[A_o [O, R], A_i [I, R], A_h [kh, R], A_w [kw, R]]`` of ``w``
    (the weights ``lambda`` folded into ``A_o``). Deterministic for a given ``seed``."""
    if w.dim() != 4:
        raise ValueError(f"cp_als needs a 4-D conv kernel, got shape {tuple(w.shape)}")
    if rank < 1:
        raise ValueError(f"CP rank must be at least 1, got {rank}")
    t = w.double()
    g = torch.Generator().manual_seed(seed)
    # start from the leading singular vectors of each unfolding, padded with random columns
    factors = []
    for n in range(4):
        u, _, _ = torch.linalg.svd(t.movedim(n, 0).reshape(t.shape[n], -1), full_matrices=False)
        f = torch.randn(t.shape[n], rank, generator=g, dtype=torch.float64)
        k = min(rank, u.shape[1])
        f[:, :k] = u[:, :k]
        factors.append(f)
    norm = float(t.norm())
    prev = float("inf")
    for _ in range(iterations):
        for n in range(4):
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for k, f in enumerate(factors):
                if k != n:
                    gram = gram * (f.t() @ f)  # Hadamard of the others' Gram matrices [R, R]
            factors[n] = _mttkrp(t, factors, n) @ torch.linalg.pinv(gram)
            if n < 3:  # keep the scale in the last-solved factor; avoids drift between factors
                scale = factors[n].norm(dim=0).clamp_min(1e-12)
                factors[n] = factors[n] / scale
        err = float((cp_reconstruct(factors) - t).norm()) / max(norm, 1e-12)
        if abs(prev - err) < tol:
            break
        prev = err
    # move the weights into A_o so the three other factors stay unit-norm
    scale = factors[3].norm(dim=0).clamp_min(1e-12)
    factors[3] = factors[3] / scale
    factors[0] = factors[0] * scale
    return [f.to(w.dtype) for f in factors]
