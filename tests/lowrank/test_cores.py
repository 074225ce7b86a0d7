"""The decomposition cores against their references: numpy's SVD, HOSVD, exact reconstruction."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.lowrank.cp import cp_als, cp_reconstruct
from slimkit.lowrank.layers import approx_weight, factorized
from slimkit.lowrank.spatial_svd import spatial_reconstruct, spatial_svd
from slimkit.lowrank.svd import rank_for_energy, svd_error, truncated_svd
from slimkit.lowrank.tucker import hosvd, tucker2, tucker_reconstruct


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_truncated_svd_reaches_the_eckart_young_optimum(rank):
    w = torch.randn(20, 30, dtype=torch.float64)
    b, a = truncated_svd(w, rank)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    optimum = np.sqrt((s[rank:] ** 2).sum())
    assert float((w - b @ a).norm()) == pytest.approx(optimum, rel=1e-9)
    assert svd_error(torch.from_numpy(s), rank) == pytest.approx(optimum, rel=1e-12)
    # the singular values are split evenly: both factors carry the same column/row norms
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1))


def test_rank_for_energy_keeps_at_least_the_energy():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5])
    e = s**2 / (s**2).sum()
    for energy in (0.1, 0.5, 0.9, 0.99, 1.0):
        r = rank_for_energy(s, energy)
        assert float(e[:r].sum()) >= energy - 1e-9
        assert r == 1 or float(e[: r - 1].sum()) < energy


def _conv_with(weight, conv):
    return lambda x: F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)


@pytest.mark.parametrize("method,ranks", [("spatial-svd", [5]), ("tucker", [6, 4]), ("cp", [7])])
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), stride=2, padding=(1, 2)),
                                      dict(kernel_size=3, dilation=2, padding=2, stride=(2, 1))])
def test_factorized_convs_apply_exactly_the_approximate_kernel(method, ranks, geometry):
    conv = nn.Conv2d(8, 12, **geometry)
    x = torch.randn(2, 8, 15, 17)
    seq = factorized(method, conv, ranks, iterations=10)
    ref = _conv_with(approx_weight(method, conv, ranks, iterations=10), conv)(x)
    assert seq(x).shape == conv(x).shape
    assert torch.allclose(seq(x), ref, atol=1e-4)


@pytest.mark.parametrize("method,ranks", [("svd", [16]), ("spatial-svd", [24]), ("tucker", [12, 8])])
def test_full_rank_reproduces_the_layer(method, ranks):
    layer = nn.Linear(24, 16) if method == "svd" else nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(3, 24) if method == "svd" else torch.randn(3, 8, 9, 9)
    assert torch.allclose(factorized(method, layer, ranks)(x), layer(x), atol=1e-5)


def test_tucker_error_is_not_above_hosvd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 16, 3, 3, generator=g) + 0.5 * torch.randn(32, 1, 3, 3, generator=g)
    for ranks in [(8, 4), (16, 8), (4, 12)]:
        err_hosvd = float((tucker_reconstruct(*hosvd(w, ranks)) - w).norm())
        err_hooi = float((tucker_reconstruct(*tucker2(w, ranks, iterations=10)) - w).norm())
        assert err_hooi <= err_hosvd + 1e-6


def test_spatial_svd_is_optimal_for_its_layout():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    m = w.permute(1, 2, 0, 3).reshape(12, 18).numpy()
    s = np.linalg.svd(m, compute_uv=False)
    v, h = spatial_svd(w, 4)
    assert float((spatial_reconstruct(v, h) - w).norm()) == pytest.approx(np.sqrt((s[4:] ** 2).sum()), rel=1e-9)


def test_cp_error_falls_with_rank_and_recovers_a_low_rank_kernel():
    g = torch.Generator().manual_seed(1)
    truth = [torch.randn(d, 3, generator=g) for d in (10, 6, 3, 3)]
    w = cp_reconstruct(truth)
    assert float((cp_reconstruct(cp_als(w, 3, iterations=300)) - w).norm() / w.norm()) < 1e-3
    dense = torch.randn(10, 6, 3, 3, generator=g)
    errs = [float((cp_reconstruct(cp_als(dense, r, iterations=50)) - dense).norm()) for r in (2, 8, 24)]
    assert errs[0] > errs[1] > errs[2]


def test_bad_ranks_are_rejected():
    with pytest.raises(ValueError, match="rank must be in"):
        truncated_svd(torch.randn(4, 6), 5)
    with pytest.raises(ValueError, match="Tucker ranks"):
        tucker2(torch.randn(4, 6, 3, 3), (5, 2))
    with pytest.raises(ValueError, match="CP rank"):
        cp_als(torch.randn(4, 6, 3, 3), 0)


@pytest.mark.parametrize("shape", [(16, 1, 3, 3), (1, 16, 3, 3), (64, 3, 7, 7), (8, 8, 3, 3)])
@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.9])
def test_tucker_ratio_ranks_fit_the_budget(shape, ratio):
    from slimkit.lowrank.layers import param_count, ranks_for_ratio

    conv = nn.Conv2d(shape[1], shape[0], shape[2:])
    r = ranks_for_ratio("tucker", conv, ratio)
    assert 1 <= r[0] <= shape[0] and 1 <= r[1] <= shape[1]
    assert param_count("tucker", conv, r) <= ratio * conv.weight.numel() or r == [1, 1]
