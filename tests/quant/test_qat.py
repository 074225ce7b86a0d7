"""Quantization-aware training: fake quantization with the STE, LSQ, PACT, simulated BatchNorm
folding, freezing schedules, conversion to integer ONNX, and the bad inputs."""

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.modules import QuantConv
from slimkit.quant.qat import QATConfig, _freezer, prepare_qat
from slimkit.quant.qat_modules import FakeQuantAct, FakeQuantWeighted
from slimkit.train import accuracy

W4 = {"weight_bits": 4, "reduce_range": False}


def _sqnr(ref_model, q, x):
    with torch.no_grad():
        ref, out = ref_model(x), q(x)
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def _conv_bn():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


def test_simulated_folding_trains_with_batch_statistics_then_matches_the_folded_integer_layer():
    conv, bn = _conv_bn()
    fq = FakeQuantWeighted(conv, bn, bits=4)
    x = torch.randn(8, 3, 5, 5)
    fq.train()
    before = bn.running_mean.clone()
    y = fq(x)
    # training: per-channel batch statistics normalize the output, and the running ones move
    torch.testing.assert_close(y.mean((0, 2, 3)), bn.bias.detach(), atol=1e-5, rtol=0)
    assert not torch.equal(bn.running_mean, before)
    # the weights trained are the folded ones, on a 4-bit grid: at most 15 levels per channel
    w = fq.quantized_weight().detach()
    assert all(len(torch.unique(row)) <= 15 for row in w.reshape(6, -1))
    y.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    fq.freeze_bn()
    frozen = bn.running_mean.clone()
    out = fq(x)  # still in training mode, but the statistics no longer move
    assert torch.equal(bn.running_mean, frozen)
    q = fq.to_quant()
    assert isinstance(q, QuantConv) and int(q.weight_q.abs().max()) <= 7
    torch.testing.assert_close(q(x), out.detach(), rtol=1e-4, atol=1e-4)
    fq.eval()
    torch.testing.assert_close(fq(x).detach(), out.detach())


def test_moving_average_ranges_move_until_frozen():
    act = FakeQuantAct(method="ste", observer=sk.quant.calibrators.make_observer("minmax"))
    act(torch.rand(100) * 2)
    act.init_from_observer()
    act.train()
    hi = float(act.running_max)
    act(torch.rand(100) * 10)
    assert float(act.running_max) > hi
    act.freeze_observer()
    hi = float(act.running_max)
    act(torch.rand(100) * 10)
    assert float(act.running_max) == hi


def test_lsq_and_pact_learn_their_ranges():
    x = torch.randn(64, 16) * 3
    for method, name in (("lsq", "step"), ("pact", "alpha")):
        act = FakeQuantAct(method=method, observer=sk.quant.calibrators.make_observer("minmax"))
        act(x)
        act.init_from_observer()
        act(x).pow(2).sum().backward()
        assert getattr(act, name).grad is not None and float(getattr(act, name).grad) != 0.0


def test_freezing_schedule_follows_the_config():
    conv, bn = _conv_bn()
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    calib = [torch.randn(4, 3, 4, 4)]
    cfg = QATConfig(freeze_bn_step=3, freeze_observers_step=5)
    gm, plan = prepare_qat(model, cfg, calib)
    assert plan.folded_bn == ["_1"] and plan.placement.quantize
    fq = [m for m in gm.modules() if isinstance(m, FakeQuantWeighted)]
    acts = [m for m in gm.modules() if isinstance(m, FakeQuantAct)]
    hook = _freezer(gm, cfg)
    hook(1, 10)  # after step 2 nothing is frozen
    assert not bool(fq[0].bn_frozen) and not any(bool(a.observer_frozen) for a in acts)
    hook(2, 10)
    assert bool(fq[0].bn_frozen) and not any(bool(a.observer_frozen) for a in acts)
    hook(4, 10)
    assert all(bool(a.observer_frozen) for a in acts)
    # defaults: half-way and three quarters of the way
    gm2, _ = prepare_qat(nn.Sequential(*_conv_bn(), nn.ReLU()), QATConfig(), calib)
    hook2 = _freezer(gm2, QATConfig())
    hook2(49, 100)
    assert all(bool(m.bn_frozen) for m in gm2.modules() if isinstance(m, FakeQuantWeighted))


def test_qat_w4a8_beats_round_to_nearest_ptq_and_exports_integer_onnx(trained_resnet, digits, tmp_path):
    calib = batches(digits.train_x[:256], None, 64)
    train = batches(digits.train_x[:640], digits.train_y[:640], 32)
    ptq = sk.quantize(trained_resnet, W4, calib_data=calib)  # round to nearest, every layer 4-bit
    q = sk.qat(trained_resnet, {**W4, "epochs": 1}, train, calib_data=calib)
    x = digits.test_x
    # one epoch: +1.5 to +3 dB over round to nearest, depending on the checkpoint the zoo trained
    assert _sqnr(trained_resnet, q, x) > _sqnr(trained_resnet, ptq, x) + 1.0
    assert accuracy(q, x, digits.test_y) >= accuracy(ptq, x, digits.test_y)
    plan = q.slimkit_plan
    assert plan.passes["qat"]["batchnorm_frozen_after"] == 10 and plan.passes["qat"]["ranges_frozen_after"] == 15
    assert len(plan.folded_bn) > 10
    assert all(int(q.get_submodule(n).weight_q.abs().max()) <= 7 for n in plan.quantized_layers)
    report = sk.export_onnx(q, tmp_path / "qat.onnx", example_inputs=x[:8])
    assert report.lint.integer_ops.get("QLinearConv", 0) == 20 and not report.lint.float_ops
    sk.save(q, tmp_path / "qat-model")
    back = sk.load(tmp_path / "qat-model", trained_resnet)
    torch.testing.assert_close(back(x[:16]), q(x[:16]))
    assert accuracy(trained_resnet, x, digits.test_y) > 98  # the caller's model is untouched


def test_lsq_with_distillation_and_pact_beat_round_to_nearest(trained_resnet, digits, tmp_path):
    calib = batches(digits.train_x[:256], None, 64)
    train = batches(digits.train_x[:320], digits.train_y[:320], 32)
    ptq = sk.quantize(trained_resnet, W4, calib_data=calib)  # round to nearest, every layer 4-bit
    base = _sqnr(trained_resnet, ptq, digits.test_x)
    for preset, extra in (("w4a8-lsq", {"distill": True}), ("w4a8-pact", {})):
        cfg = sk.QATConfig(**{**sk.qat_presets()[preset], "epochs": 1, **extra})
        q = sk.qat(trained_resnet, cfg, train, calib_data=calib)
        assert _sqnr(trained_resnet, q, digits.test_x) > base + 1.0, preset
    report = sk.export_onnx(q, tmp_path / "pact.onnx", example_inputs=digits.test_x[:8])
    assert report.lint.integer_ops.get("QLinearConv", 0) == 20


def test_qat_rejects_bad_input(trained_mlp, digits):
    train = batches(digits.train_x[:64], digits.train_y[:64], 32)
    frozen = nn.Sequential(nn.Linear(4, 2))
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sk.qat(frozen, "int8", [(torch.randn(8, 4), torch.randint(0, 2, (8,)))])
    with pytest.raises(ValueError, match=r"weight_bits must be in \[2, 8\], got 9"):
        sk.qat(trained_mlp, {"weight_bits": 9}, train)
    with pytest.raises(ValueError, match="learns its ranges .step sizes.; there is no observer to freeze"):
        sk.qat(trained_mlp, {"method": "lsq", "freeze_observers_step": 10}, train)
    with pytest.raises(ValueError, match="train_data is empty"):
        sk.qat(trained_mlp, "w4a8", [])
    bad = [(digits.train_x[:8].clone(), digits.train_y[:8])]
    bad[0][0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="train_data: batch 0 holds NaN"):
        sk.qat(trained_mlp, "w4a8", bad)
    with pytest.raises(ValueError, match="batch 0 is not an .inputs, labels. pair"):
        sk.qat(trained_mlp, "w4a8", [digits.train_x[:8]])
    with pytest.raises(ValueError, match="unknown preset 'w4a8-adaround'"):
        sk.qat(trained_mlp, "w4a8-adaround", train)
    with pytest.raises(ValueError, match="no layer of Sequential can be quantized"):
        sk.qat(nn.Sequential(nn.Linear(4, 2)), {"exclude": ["0"]}, [(torch.randn(8, 4), torch.randint(0, 2, (8,)))])
