"""Mixed precision from sensitivity: per-layer widths for a size or a fidelity budget."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.mixed_precision import allocate_for_noise, allocate_for_size, next_upgrade


def _sqnr(ref_model, q, x):
    with torch.no_grad():
        ref, out = ref_model(x), q(x)
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def test_allocation_spends_bits_where_they_remove_the_most_noise():
    noise = {"big": {4: 0.010, 8: 0.0010}, "small": {4: 0.050, 8: 0.0001}, "easy": {4: 0.001, 8: 0.0001}}
    params = {"big": 1000, "small": 10, "easy": 500}
    # the small, sensitive layer is the cheapest to widen
    assert allocate_for_size(noise, params, target_bits=4.1) == {"big": 4, "small": 8, "easy": 4}
    # a larger budget widens the big layer next, the easy one last
    assert allocate_for_size(noise, params, target_bits=6.7) == {"big": 8, "small": 8, "easy": 4}
    assert allocate_for_noise(noise, params, budget=0.012) == {"big": 4, "small": 8, "easy": 4}
    # past the widest width only float is left, and only when allowed
    widest = {"big": 8, "small": 8, "easy": 8}
    assert next_upgrade(noise, params, widest) is None
    assert next_upgrade(noise, params, widest, float_fallback=True) == ("small", None)
    assert allocate_for_noise(noise, params, budget=0.0005, float_fallback=True)["big"] is None


def test_size_budget_beats_the_opposite_choice_and_exports(trained_resnet, digits, tmp_path):
    calib = batches(digits.train_x[:128], None, 64)
    q = sk.quantize(trained_resnet, {"mixed_bits": [4, 8], "target_bits": 5.0}, calib_data=calib)
    plan = q.slimkit_plan
    report = plan.passes["mixed_precision"]
    assert report["average_bits"] <= 5.0 and set(report["bits"].values()) == {4, 8}
    assert plan.config.weights.layer_bits == report["bits"] and plan.config.find(sk.quant.MixedPrecision) is None
    for name, bits in report["bits"].items():
        assert int(q.get_submodule(name).weight_q.abs().max()) <= (7 if bits == 4 else 63)  # 8 is 7 (reduce_range)
    # the same number of 4-bit weights, spent on the layers the sensitivity says are the worst for it
    by_sensitivity = sorted(report["bits"], key=lambda n: report["sensitivity_db"][n]["4"])
    params = report["params"]
    four = sum(params[n] for n, b in report["bits"].items() if b == 4)
    opposite, spent = {}, 0
    for name in by_sensitivity:
        opposite[name] = 4 if spent < four else 8
        spent += params[name] if opposite[name] == 4 else 0
    worse = sk.quantize(trained_resnet, {"layer_bits": opposite}, calib_data=calib)
    x = digits.test_x
    assert _sqnr(trained_resnet, q, x) > _sqnr(trained_resnet, worse, x) + 6.0
    assert _sqnr(trained_resnet, q, x) > _sqnr(trained_resnet, sk.quantize(trained_resnet, {"weight_bits": 4, "reduce_range": False}, calib_data=calib), x) + 6.0
    lint = sk.export_onnx(q, tmp_path / "mixed.onnx", example_inputs=x[:8]).lint
    assert lint.integer_ops.get("QLinearConv", 0) == 20
    sk.save(q, tmp_path / "mixed")
    torch.testing.assert_close(sk.load(tmp_path / "mixed", trained_resnet)(x[:16]), q(x[:16]))


def test_fidelity_budget_is_met_with_the_fewest_bits_and_float_fallback(trained_mlp, digits):
    calib = batches(digits.train_x[:256], None, 64)
    q = sk.quantize(trained_mlp, {"mixed_bits": [4, 8], "target_sqnr_db": 30}, calib_data=calib)
    report = q.slimkit_plan.passes["mixed_precision"]
    assert report["measured_db"] >= 30 and 4 <= report["average_bits"] < 6
    assert _sqnr(trained_mlp, q, digits.test_x) > 29
    # 2-bit weights alone cannot reach 30 dB: the layers that need it stay in float
    q2 = sk.quantize(trained_mlp, {"mixed_bits": [2], "target_sqnr_db": 30, "reduce_range": False}, calib_data=calib)
    report2 = q2.slimkit_plan.passes["mixed_precision"]
    floats = [n for n, b in report2["bits"].items() if b == "float"]
    assert floats and report2["measured_db"] >= 30 and set(floats) <= set(q2.slimkit_plan.config.weights.exclude)
    with pytest.raises(ValueError, match="out of reach: quantizing the activations alone gives about"):
        sk.quantize(trained_mlp, {"mixed_bits": [4, 8], "target_sqnr_db": 80}, calib_data=calib)
    with pytest.raises(ValueError, match=r"out of reach: .* dB with every layer at 2 bits \(float_fallback is off\)"):
        sk.quantize(trained_mlp, {"mixed_bits": [2], "target_sqnr_db": 30, "reduce_range": False,
                                  "float_fallback": False}, calib_data=calib)


def test_mixed_precision_rejects_bad_input(trained_mlp):
    with pytest.raises(ValueError, match="exactly one budget"):
        sk.QuantConfig(mixed_bits=(4, 8))
    with pytest.raises(ValueError, match="exactly one budget"):
        sk.QuantConfig(mixed_bits=(4, 8), target_bits=5, target_sqnr_db=30)
    with pytest.raises(ValueError, match="target_bits is a mixed-precision budget"):
        sk.QuantConfig(target_bits=5)
    with pytest.raises(ValueError, match=r"target_bits must be in \[4, 8\], got 3"):
        sk.QuantConfig(mixed_bits=(4, 8), target_bits=3)
    with pytest.raises(ValueError, match="run it first, then pass the layer_bits"):
        sk.QuantConfig(mixed_bits=(4, 8), target_bits=5, rounding="adaround")
    with pytest.raises(ValueError, match=r"layer_bits\['1'\] must be in \[2, 8\], got 12"):
        sk.QuantConfig(layer_bits={"1": 12})
    with pytest.raises(ValueError, match=r"layer_bits names layers this model does not have: \['fc9'\]"):
        sk.quantize(trained_mlp, {"layer_bits": {"fc9": 4}}, calib_data=[torch.randn(4, 1, 32, 32)])
    with pytest.raises(ValueError, match="calib_data .the mixed-precision search measures on it. is required"):
        sk.quantize(trained_mlp, {"mixed_bits": [4, 8], "target_bits": 5})
    with pytest.raises(ValueError, match="no Linear/Conv layer to choose widths for"):
        sk.quantize(nn.Sequential(nn.ReLU()), {"mixed_bits": [4, 8], "target_bits": 5}, calib_data=[torch.randn(2, 3)])
