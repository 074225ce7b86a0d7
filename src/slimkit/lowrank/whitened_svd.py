"""Data-whitened truncated SVD: the rank-r factorization that is optimal for the layer's *outputs*
on the calibration data, not for its weights (the truncation-aware whitening of SVD-LLM, Wang et
al. 2024; ASVD, Yuan et al. 2023, scales by activations for the same reason).

Plain SVD minimises ``||W - W_r||_F``, which treats every input direction alike. A trained layer's
inputs are far from isotropic (a few directions carry most of the energy, others none), so the
error that matters is ``||(W - W_r) X||_F`` over inputs ``X [in, n]``. With the input covariance
``C = X X^T = S S^T`` (``S`` its Cholesky factor), ``||(W - W_r) X||_F = ||(W - W_r) S||_F``, so the
optimum is the truncated SVD of ``W S``, mapped back: ``W_r = (W S)_r S^(-1)``. Its output error is
the tail of ``svdvals(W S)`` -- the Eckart-Young bound in output space, which no rank-r matrix
beats. ``damp`` (a fraction of the mean input energy added to the diagonal of ``C``) keeps ``S``
invertible when some input directions never occur in the data.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> w, x = torch.randn(8, 6, generator=g), torch.randn(6, 100, generator=g)
>>> s = whitening_factor(x @ x.T, damp=0.0)
>>> b, a = whitened_svd(w, s, 3)
>>> err = float(((w - b @ a) @ x).norm())
>>> abs(err - float(torch.linalg.svdvals(w.double() @ s.double())[3:].norm())) < 1e-4
True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["whitening_factor", "whitened_svd", "whitened_singular_values", "covariance_update"]


def covariance_update(cov: Tensor | None, x: Tensor) -> Tensor:
    """Add the rows of ``x [n, in]`` to the running (un-normalised) input covariance ``sum x^T x``."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    c = x.T @ x
    return c if cov is None else cov + c


def whitening_factor(cov: Tensor, damp: float = 0.01) -> Tensor:
    """Lower-triangular ``S`` with ``S S^T = cov + damp * mean(diag(cov)) * I`` (float64)."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"a covariance must be a square matrix, got shape {tuple(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError("the input covariance holds NaN or infinity")
    c = cov.double()
    scale = float(c.diagonal().mean())
    if scale <= 0.0:
        raise ValueError("the layer's inputs were all zero on the calibration data; nothing to whiten by")
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    jitter = damp * scale
    for _ in range(6):  # raise the damping until the factorization succeeds (round-off on singular C)
        factor, info = torch.linalg.cholesky_ex(c + jitter * eye)
        if int(info) == 0:
            return factor
        jitter = max(jitter * 10, 1e-10 * scale)
    raise ValueError("the input covariance is not positive definite even with damping")


def whitened_singular_values(w: Tensor, factor: Tensor) -> Tensor:
    """Singular values of ``W S``: the layer's output energy per rank on the calibration data."""
    return torch.linalg.svdvals(w.double() @ factor)


def whitened_svd(w: Tensor, factor: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B [out, r], A [r, in])`` minimising ``||(W - B A) S||_F``; each rank-one term is split so that
    B's column and A's row have equal norms."""
    if w.dim() != 2 or factor.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"whitened_svd needs W [out, in] and S [in, in], got {tuple(w.shape)} and {tuple(factor.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}] for a {tuple(w.shape)} matrix, got {rank}")
    u, s, vh = torch.linalg.svd(w.double() @ factor, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    # A = root * Vh_r S^-1, i.e. solve A S = root * Vh_r (S lower-triangular: S^T A^T = (root * Vh_r)^T)
    a = torch.linalg.solve_triangular(factor.T, (root[:, None] * vh[:rank]).T, upper=True).T
    # S carries the data's scale (and S^-1 its inverse), so the split above leaves B and A far apart
    # in size; an unbalanced pair trains badly (the effective learning rate of A scales with |B|^2).
    # Rescale each rank-one term so that B's column and A's row have the same norm: B A is unchanged.
    c = (a.norm(dim=1) / b.norm(dim=0).clamp_min(1e-300)).sqrt()
    return (b * c).to(w.dtype), (a / c[:, None]).to(w.dtype)
