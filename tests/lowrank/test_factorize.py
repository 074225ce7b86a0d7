"""sk.factorize on the zoo's trained models: shapes, budgets, allocation, save/load, export, chaining."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.lowrank.plan import FactorPlan
from slimkit.train.fit import accuracy, fit
from slimkit.zoo import digits_model


def _weights(model, kinds=(nn.Linear, nn.Conv2d)):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kinds))


def _rel_err(a, b, x):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).pow(2).sum() / yb.pow(2).sum())


def test_svd_on_the_mlp_halves_its_weights_and_leaves_the_caller_alone(trained_mlp, digits):
    before = {k: v.clone() for k, v in trained_mlp.state_dict().items()}
    f = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.5})
    assert all(torch.equal(v, trained_mlp.state_dict()[k]) for k, v in before.items())
    assert isinstance(f[1], nn.Sequential) and [type(m) for m in f[1]] == [nn.Linear, nn.Linear]
    assert _weights(f) <= 0.5 * _weights(trained_mlp)
    plan = f.slimkit_plan
    assert set(plan.ranks_) == {"1", "3", "5"} and all(a <= 0.5 * b for b, a in plan.params_.values())
    # a rank-4 classifier head costs accuracy; fine-tuning with the original as teacher wins it back
    base = accuracy(trained_mlp, digits.test_x, digits.test_y)
    raw = accuracy(f, digits.test_x, digits.test_y)
    fit(f, batches(digits.train_x, digits.train_y, 64), epochs=3, lr=0.01, teacher=trained_mlp)
    tuned = accuracy(f, digits.test_x, digits.test_y)
    assert tuned >= base - 1.5 and tuned > raw, (base, raw, tuned)


def test_energy_and_rank_and_layers(trained_mlp):
    f = sk.factorize(trained_mlp, {"method": "svd", "energy": 0.9, "layers": ["1"]})
    assert list(f.slimkit_plan.ranks_) == ["1"]
    s = torch.linalg.svdvals(trained_mlp[1].weight.detach().double())
    r = f.slimkit_plan.ranks_["1"][0]
    assert float((s[:r] ** 2).sum() / (s**2).sum()) >= 0.9 > float((s[: r - 1] ** 2).sum() / (s**2).sum())
    g = sk.factorize(trained_mlp, sk.FactorizeConfig(method="svd", rank=8))
    assert g.slimkit_plan.ranks_ == {"1": [8], "3": [8], "5": [8]}


def test_full_rank_request_is_skipped_when_it_saves_nothing(trained_mlp):
    f = sk.factorize(trained_mlp, {"method": "svd", "rank": 100})
    # not named in `layers`, so skipped and reported rather than an error
    assert f.slimkit_plan.skipped["5"] == "rank 100 is above this layer's limit of 10"
    assert "would not save weights" in f.slimkit_plan.skipped["3"]  # 100 * (256 + 128) > 256 * 128
    assert list(f.slimkit_plan.ranks_) == ["1"]


@pytest.mark.parametrize("method", ["spatial-svd", "tucker", "cp"])
def test_conv_methods_on_the_trained_resnet(trained_resnet, digits, method):
    f = sk.factorize(trained_resnet, {"method": method, "ratio": 0.5, "iterations": 10})
    plan = f.slimkit_plan
    assert "layers.2.shortcut.0" in plan.skipped and "1x1" in plan.skipped["layers.2.shortcut.0"]
    assert plan.ranks_ and all(a <= 0.5 * b for b, a in plan.params_.values())
    assert all(isinstance(m, nn.Conv2d) for name in plan.ranks_ for m in f.get_submodule(name))
    acc = accuracy(f, digits.test_x, digits.test_y)
    assert acc > 50, f"{method}: {acc}"  # unfine-tuned, but still a working classifier


def test_svd_takes_pointwise_convs_with_stride_and_padding():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(48, 40, 1, stride=2, padding=1), nn.ReLU(), nn.Conv2d(40, 8, 3))
    x = torch.randn(2, 48, 9, 9)
    from slimkit.lowrank.layers import factorized

    full = nn.Sequential(factorized("svd", m[0], [40]), m[1], m[2])  # full rank: the same function
    assert _rel_err(full, m, x) < 1e-10
    low = sk.factorize(m, {"method": "svd", "rank": 8})
    assert list(low.slimkit_plan.ranks_) == ["0"] and low.slimkit_plan.skipped["2"].startswith("Conv2d is not")
    first, second = low[0]
    assert (first.stride, first.padding, tuple(first.weight.shape)) == ((2, 2), (1, 1), (8, 48, 1, 1))
    assert tuple(second.weight.shape) == (40, 8, 1, 1) and second.bias is not None
    # the layer's own output error is the Eckart-Young optimum of its weight matrix
    w = m[0].weight.detach().reshape(40, 48).double()
    s = torch.linalg.svdvals(w)
    got = (second.weight.reshape(40, 8).double() @ first.weight.reshape(8, 48).double() - w).pow(2).sum()
    assert torch.isclose(got, s[8:].pow(2).sum(), rtol=1e-4)


def test_svd_on_the_trained_mobilenet_pointwise_convs(digits):
    from slimkit.zoo import trained

    mnv2 = trained("mobilenet_v2")
    f = sk.factorize(mnv2, {"method": "svd", "ratio": 0.5})
    plan = f.slimkit_plan
    assert plan.skipped["features.1.block.0.0"].startswith("Conv2d is not")  # depthwise 3x3
    assert len(plan.ranks_) > 20 and all(a <= 0.5 * b for b, a in plan.params_.values())
    assert all(tuple(c.kernel_size) == (1, 1) for name in plan.ranks_ if name != "classifier" for c in f.get_submodule(name))
    # an already-compact net: its pointwise weights spread their energy, so no svd rank keeping 99% saves weights
    with pytest.raises(ValueError, match=r"no layer would get smaller .* and \d+ more"):
        sk.factorize(mnv2, {"method": "svd", "energy": 0.99})


def test_global_allocation_beats_uniform_at_the_same_budget(trained_resnet, digits):
    calib = batches(digits.train_x[:128], None, 64)
    x = digits.test_x[:128]
    uni = sk.factorize(trained_resnet, {"method": "tucker", "ratio": 0.3, "iterations": 5})
    glo = sk.factorize(trained_resnet, {"method": "tucker", "ratio": 0.3, "allocation": "global", "iterations": 5},
                       data=calib)
    plan = glo.slimkit_plan
    chosen = sum(a for _, a in plan.params_.values())
    full = sum(b for b, _ in uni.slimkit_plan.params_.values())
    assert chosen <= 0.3 * full
    assert plan.sensitivity_ and all(len(v) > 3 for v in plan.sensitivity_.values())
    assert len({tuple(r) for r in plan.ranks_.values()}) > 1 or plan.skipped  # ranks differ by layer
    assert _rel_err(glo, trained_resnet, x) < _rel_err(uni, trained_resnet, x)


def test_global_allocation_with_a_metric_and_data_free(trained_mlp, digits):
    x, y = digits.test_x[:200], digits.test_y[:200]
    f = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.3, "allocation": "global"},
                     metric=lambda m: accuracy(m, x, y))
    assert f.slimkit_plan.sensitivity_
    g = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.3, "allocation": "global"})  # weight error
    for plan in (f.slimkit_plan, g.slimkit_plan):
        assert sum(a for _, a in plan.params_.values()) <= 0.3 * _weights(trained_mlp)


def test_save_load_round_trip_and_chain_with_quantization(trained_resnet, digits, tmp_path):
    f = sk.factorize(trained_resnet, {"method": "tucker", "ratio": 0.5, "iterations": 5})
    sk.save(f, tmp_path / "f")
    f2 = sk.load(tmp_path / "f", digits_model("resnet18"))
    x = digits.test_x[:8]
    assert torch.equal(f(x), f2(x))
    q = sk.quantize(f, "int8", calib_data=batches(digits.train_x[:128], None, 64))
    assert [p.kind for p in q.slimkit_plans] == ["lowrank", "quant"]
    sk.save(q, tmp_path / "fq")
    q2 = sk.load(tmp_path / "fq", digits_model("resnet18"))
    assert torch.equal(q(x), q2(x))
    with pytest.raises(ValueError, match="does not match this model"):
        sk.load(tmp_path / "f", digits_model("mobilenet_v2"))


def test_export_and_quantized_export(trained_resnet, digits, tmp_path):
    f = sk.factorize(trained_resnet, {"method": "spatial-svd", "ratio": 0.5})
    r = sk.export_onnx(f, tmp_path / "f.onnx", digits.test_x[:4])
    assert r.parity.ok and r.parity.tolerance < 1e-3
    q = sk.quantize(f, "int8", calib_data=batches(digits.train_x[:128], None, 64))
    rq = sk.export_onnx(q, tmp_path / "fq.onnx", digits.test_x[:4])
    assert rq.lint.integer_ops.get("QLinearConv", 0) > 20 and not rq.lint.float_ops


def test_plan_round_trips_as_a_dict(trained_mlp):
    plan = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.4}).slimkit_plan
    assert FactorPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert "| 1 |" in plan.summary()


@pytest.mark.parametrize("cfg,match", [
    ({"method": "svd", "rank": 0}, "rank must be an integer of at least 1"),
    ({"method": "svd", "energy": 1.5}, r"energy must be in \(0.0, 1.0\]"),
    ({"method": "svd", "energy": 0.0}, "energy must be in"),
    ({"method": "svd", "ratio": 1.0}, "ratio must be in"),
    ({"method": "svd"}, "exactly one of rank, energy or ratio"),
    ({"method": "svd", "rank": 4, "ratio": 0.5}, "exactly one"),
    ({"method": "cp", "energy": 0.9}, "energy is not defined for CP"),
    ({"method": "svd", "rank": 4, "allocation": "global"}, "needs ratio"),
    ({"method": "qr", "rank": 4}, "method must be one of"),
    ({"method": "svd", "rnak": 4}, "did you mean 'rank'"),
])
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        sk.factorize(nn.Linear(4, 4), cfg)


def test_bad_layers():
    mnv2 = digits_model("mobilenet_v2")
    with pytest.raises(ValueError, match="did you mean 'features.1.block.0.0'"):
        sk.factorize(mnv2, {"method": "tucker", "ratio": 0.5, "layers": ["features.1.block.0.00"]})
    with pytest.raises(ValueError, match="layer 'features.1.block.0.0' cannot take tucker: depthwise conv"):
        sk.factorize(mnv2, {"method": "tucker", "ratio": 0.5, "layers": ["features.1.block.0.0"]})
    f = sk.factorize(mnv2, {"method": "tucker", "ratio": 0.5})  # unnamed depthwise convs: skipped, reported
    assert f.slimkit_plan.skipped["features.1.block.0.0"].startswith("depthwise conv")
    lin = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="layer '0': rank 7 is above this layer's limit of 6"):
        sk.factorize(lin, {"method": "svd", "rank": 7, "layers": ["0"]})
    with pytest.raises(ValueError, match="has no layer that svd can factorize"):
        sk.factorize(nn.Sequential(nn.Conv2d(1, 1, 3)), {"method": "svd", "rank": 1})


def test_bad_data_and_weights(trained_mlp):
    cfg = {"method": "svd", "ratio": 0.5, "allocation": "global"}
    with pytest.raises(ValueError, match="empty"):
        sk.factorize(trained_mlp, cfg, data=[])
    bad = torch.randn(4, 1, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 0"):
        sk.factorize(trained_mlp, cfg, data=[bad])
    broken = sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.9})  # a copy to break
    with torch.no_grad():
        broken[3][0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer '3\.0' has NaN or infinite weights"):
        sk.factorize(broken, {"method": "svd", "ratio": 0.5})
    assert torch.isfinite(trained_mlp[3].weight).all()  # the caller's model is untouched


def test_corrupt_plan_list_is_a_clear_error(trained_mlp, tmp_path):
    import json

    sk.save(sk.factorize(trained_mlp, {"method": "svd", "ratio": 0.5}), tmp_path / "f")
    meta = json.loads((tmp_path / "f" / "plan.json").read_text())
    meta["plans"] = ["oops"]
    (tmp_path / "f" / "plan.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="plan 1 is not an object"):
        sk.load(tmp_path / "f", digits_model("mlp"))
