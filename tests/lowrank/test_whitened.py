"""Data-whitened SVD: the core's optimality, and the model-level path (statistics, plan, save/load)."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.lowrank.layers import ranks_for_energy
from slimkit.lowrank.plan import FactorPlan, apply_plan, input_covariances
from slimkit.lowrank.svd import truncated_svd
from slimkit.lowrank.whitened_svd import covariance_update, whitened_svd, whitening_factor
from slimkit.train import accuracy


def _anisotropic(n_in, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n_in, dtype=torch.float64)  # a few strong input directions, many weak
    basis = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))[0]
    return basis @ (scales[:, None] * torch.randn(n_in, n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_output_error_is_the_optimum_and_beats_plain_svd(rank):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 16, generator=g, dtype=torch.float64)
    x = _anisotropic(16, 400)
    s = whitening_factor(x @ x.T, damp=0.0)
    b, a = whitened_svd(w, s, rank)
    err = float(((w - b @ a) @ x).norm())
    optimum = float(torch.linalg.svdvals(w @ x)[rank:].norm())  # the best any rank-r matrix does on X
    assert err == pytest.approx(optimum, rel=1e-6)
    pb, pa = truncated_svd(w, rank)
    assert err < float(((w - pb @ pa) @ x).norm())
    # balanced factors: B's columns and A's rows have equal norms, whatever the data's scale
    b2, a2 = whitened_svd(w, whitening_factor(1e6 * (x @ x.T), damp=0.0), rank)
    for bb, aa in ((b, a), (b2, a2)):
        assert torch.allclose(bb.norm(dim=0), aa.norm(dim=1)) and aa.shape == (rank, 16)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-8)


def test_full_rank_and_rank_deficient_inputs():
    w = torch.randn(6, 10, dtype=torch.float64)
    x = torch.randn(10, 4, dtype=torch.float64)  # 4 samples: the covariance has rank 4 of 10
    s = whitening_factor(x @ x.T)  # damping keeps it invertible
    b, a = whitened_svd(w, s, 6)
    assert torch.allclose(b @ a, w, atol=1e-8)  # full rank: exactly W, whatever the whitening
    b, a = whitened_svd(w, s, 4)
    assert float(((w - b @ a) @ x).norm()) < 0.05 * float((w @ x).norm())  # the 4 seen directions are kept


def test_covariance_update_accumulates_rows():
    x1, x2 = torch.randn(3, 5, 4), torch.randn(7, 4)
    c = covariance_update(covariance_update(None, x1), x2)
    rows = torch.cat([x1.reshape(-1, 4), x2]).double()
    assert torch.allclose(c, rows.T @ rows)


def test_bad_covariances():
    with pytest.raises(ValueError, match="square"):
        whitening_factor(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="all zero"):
        whitening_factor(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="needs W"):
        whitened_svd(torch.zeros(3, 4), torch.eye(3), 1)


def test_conv_statistics_follow_padding_and_stride():
    conv = nn.Conv2d(3, 4, 1, stride=2, padding=1)
    x = torch.randn(2, 3, 5, 5)
    cov = input_covariances(nn.Sequential(conv), ["0"], [x])["0"]
    seen = torch.nn.functional.pad(x, (1, 1, 1, 1))[..., ::2, ::2]  # the pixels the conv reads
    rows = seen.permute(0, 2, 3, 1).reshape(-1, 3).double()
    assert torch.allclose(cov, rows.T @ rows)


def test_whitened_mlp_beats_plain_svd_on_held_out_digits(trained_mlp, digits):
    calib = batches(digits.train_x[:512], None, 128)
    hidden = ["1", "3"]  # the classifier (5) is too narrow for any method to be good at 25%
    plain = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.25, "layers": hidden})
    white = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.25, "whiten": True, "layers": hidden}, data=calib)
    assert white.slimkit_plan.ranks_ == plain.slimkit_plan.ranks_
    with torch.no_grad():
        ref = trained_mlp(digits.test_x)
        err = {k: float((m(digits.test_x) - ref).norm() / ref.norm()) for k, m in (("plain", plain), ("white", white))}
    assert err["white"] < 0.4 * err["plain"], err  # measured: 0.014 against 0.051
    assert accuracy(white, digits.test_x, digits.test_y) >= accuracy(trained_mlp, digits.test_x, digits.test_y) - 0.5


def test_whitened_energy_and_global_allocation(trained_mlp, digits):
    calib = batches(digits.train_x[:256], None, 128)
    e = sk.factorize(trained_mlp, {"method": "svd", "energy": 0.99, "whiten": True}, data=calib)
    # output energy sits in far fewer directions than weight energy: the 8x8 digits, upscaled,
    # span at most 64 of the first layer's 1024 input directions
    assert e.slimkit_plan.ranks_["1"][0] <= 64 < ranks_for_energy("svd", trained_mlp[1], 0.99)[0]
    g = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.3, "whiten": True, "allocation": "global"}, data=calib)
    before = sum(m.weight.numel() for m in trained_mlp.modules() if isinstance(m, nn.Linear))
    after = sum(m.weight.numel() for m in g.modules() if isinstance(m, nn.Linear))
    assert after <= 0.3 * before and accuracy(g, digits.test_x, digits.test_y) > 90


def test_save_load_and_replay_rules(trained_resnet, digits, tmp_path):
    calib = batches(digits.train_x[:128], None, 64)
    net = trained_resnet.train()  # in train mode: the statistics pass must not touch BN or the flags
    bn_before = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        f = sk.factorize(net, {"method": "svd", "ratio": 0.5, "whiten": True}, data=calib)
        assert net.training and all(m.training for m in net.modules())
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in bn_before.items())
    finally:
        net.eval()
    assert "layers.2.shortcut.0" in f.slimkit_plan.ranks_ and "fc" in f.slimkit_plan.ranks_
    sk.save(f, tmp_path / "w")
    from slimkit.zoo import digits_model

    loaded = sk.load(tmp_path / "w", digits_model("resnet18"))
    with torch.no_grad():
        assert torch.equal(loaded(digits.test_x[:16]), f.eval()(digits.test_x[:16]))
    replay = FactorPlan.from_dict(f.slimkit_plan.to_dict())
    with pytest.raises(ValueError, match="no whitening factor for layer 'layers.2.shortcut.0'"):
        apply_plan(trained_resnet, replay)
    same = apply_plan(trained_resnet, f.slimkit_plan)  # the in-memory plan replays exactly
    with torch.no_grad():
        assert torch.equal(same(digits.test_x[:16]), f(digits.test_x[:16]))


def test_whiten_bad_input(trained_mlp):
    with pytest.raises(ValueError, match="whiten=True needs data"):
        sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.5, "whiten": True})
    with pytest.raises(ValueError, match="whiten applies to method 'svd', not 'tucker'"):
        sk.factorize(trained_mlp, {"method": "tucker", "ratio": 0.5, "whiten": True})
    with pytest.raises(ValueError, match="whiten must be true or false"):
        sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.5, "whiten": "yes"})
    with pytest.raises(ValueError, match="NaN"):
        sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.5, "whiten": True},
                     data=[torch.full((2, 1, 32, 32), float("nan"))])
    skip = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    skip.forward = lambda x: skip[0](x)  # the second layer never runs
    with pytest.raises(ValueError, match="layer '1' never ran on the data"):
        sk.factorize(skip, {"method": "svd", "rank": 1, "whiten": True}, data=[torch.randn(3, 4)])


def test_whitened_factors_fine_tune_stably(trained_mlp, digits):
    # regression: unbalanced factors (|B| ~ 50x |A|) made SGD at lr 0.01 diverge to NaN here
    from slimkit.train import fit

    f = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.25, "whiten": True},
                     data=batches(digits.train_x[:256], None, 64))
    before = accuracy(f, digits.test_x, digits.test_y)
    fit(f, batches(digits.train_x, digits.train_y, 32), epochs=1, lr=0.01, teacher=trained_mlp)
    assert accuracy(f, digits.test_x, digits.test_y) > before + 20  # measured: 42.5 -> 72.2 in one epoch
