import logging

import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.modules import ActQuant, QuantConv, QuantLinear
from slimkit.train import accuracy


def _calib(d, n=256):
    return batches(d.train_x[:n], None, 64)


def test_int8_keeps_accuracy_and_leaves_caller_model_untouched(trained_resnet, digits):
    before = {k: v.clone() for k, v in trained_resnet.state_dict().items()}
    q = sk.quantize(trained_resnet, "int8", calib_data=_calib(digits))
    after = trained_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fp = accuracy(trained_resnet, digits.test_x, digits.test_y)
    assert accuracy(q, digits.test_x, digits.test_y) >= fp - 1.0
    plan = q.slimkit_plan
    assert plan.folded_bn and len(plan.quantized_layers) == 21
    assert all(0 < s for s, _ in plan.qparams_.values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())


def test_weights_are_7bit_with_reduce_range_and_8bit_without(trained_mlp, digits):
    q7 = sk.quantize(trained_mlp, "int8", calib_data=_calib(digits))
    q8 = sk.quantize(trained_mlp, {"reduce_range": False}, calib_data=_calib(digits))
    w7 = [m.weight_q for m in q7.modules() if isinstance(m, QuantLinear)]
    w8 = [m.weight_q for m in q8.modules() if isinstance(m, QuantLinear)]
    assert max(int(w.abs().max()) for w in w7) == 63
    assert max(int(w.abs().max()) for w in w8) == 127


def test_bn_folding_is_exact():
    from slimkit.core.graph import fold_batchnorm, trace

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    m[1].weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)  # before folding: the traced module shares (and folding rewrites) m's conv
    gm = trace(m)
    assert len(fold_batchnorm(gm)) == 1
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in gm.modules())
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-5)


def test_quantizers_sit_where_the_runtime_needs_them(trained_resnet, digits):
    q = sk.quantize(trained_resnet, "int8", calib_data=_calib(digits, 64))
    placed = q.slimkit_plan.placement
    assert "x" in placed.quantize  # the model input feeds a conv
    # both inputs of each residual addition are quantized (the conv branch and the shortcut)...
    assert sum("conv2" in n for n in placed.quantize) == 8
    # ...and its output is quantized after the ReLU that follows it, never between the two
    assert not any(n.startswith("add") for n in placed.quantize)
    assert sum("relu2" in n for n in placed.quantize) == 8
    assert "flatten" in placed.share  # flatten keeps the pooled tensor's scale


def test_dynamic_needs_no_calibration(trained_mlp, digits):
    q = sk.quantize(trained_mlp, "int8-dynamic")
    assert all(m.dynamic for m in q.modules() if isinstance(m, QuantLinear))
    assert not any(isinstance(m, ActQuant) for m in q.modules())
    assert accuracy(q, digits.test_x, digits.test_y) >= accuracy(trained_mlp, digits.test_x, digits.test_y) - 1


def test_dynamic_layers_take_sequences_whole_and_fuse_in_onnx_runtime(trained_mlp, digits, tmp_path):
    """[batch, sequence, features] goes straight into MatMulInteger: no reshapes around each layer,
    which cost shape ops per layer and hid transformers' residual adds from ONNX Runtime's fusions."""
    import onnx
    import onnxruntime as ort

    from slimkit.export.runtime import session

    q = sk.quantize(nn.Sequential(*list(trained_mlp)[1:]), "int8-dynamic")  # without its Flatten
    seqs = digits.test_x[:60].reshape(12, 5, -1)  # 12 "sequences" of 5 images
    path = sk.export_onnx(q, tmp_path / "seq.onnx", seqs[:4]).path
    assert "Reshape" not in {n.op_type for n in onnx.load(path).graph.node}
    s = session(path)
    with torch.no_grad():
        want = q(seqs)
    got = torch.from_numpy(s.run(None, {"input": seqs.numpy()})[0])
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    assert (got.argmax(-1).flatten() == digits.test_y[:60]).float().mean() >= 0.9
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    linears = sum(isinstance(m, QuantLinear) for m in q.modules())
    assert ops.count("DynamicQuantizeMatMul") == linears, ops


@pytest.mark.parametrize("calibrator", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_every_calibrator_quantizes_a_trained_model(trained_mlp, digits, calibrator):
    q = sk.quantize(trained_mlp, {"calibrator": calibrator}, calib_data=_calib(digits))
    fp = accuracy(trained_mlp, digits.test_x, digits.test_y)
    assert accuracy(q, digits.test_x, digits.test_y) >= fp - 1.5


def test_exclude_keeps_named_layers_in_float(trained_mlp, digits):
    q = sk.quantize(trained_mlp, {"exclude": ["3"]}, calib_data=_calib(digits))
    assert "3" in q.slimkit_plan.skipped
    assert isinstance(dict(q.named_modules())["3"], nn.Linear)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.b(torch.relu(self.a(x)))


def test_untraceable_model_falls_back_with_a_warning(caplog):
    torch.manual_seed(0)
    m = _Untraceable().eval()
    calib = torch.randn(256, 4)
    with caplog.at_level(logging.WARNING):
        q = sk.quantize(m, "int8", calib_data=[calib])
    assert "falling back to module-level" in caplog.text
    assert q.slimkit_plan.mode == "module"
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 2
    x = calib[:32]  # inputs inside the calibrated range
    with torch.no_grad():
        assert (q(x) - m(x)).abs().max() < 0.1 * m(x).abs().max()


@pytest.mark.parametrize("data,match", [
    ([torch.tensor([[float("nan")] * 4])], "batch 0 holds NaN"),
    ([torch.randn(2, 4), torch.tensor([[1.0, float("inf"), 0, 0]])], "batch 1 holds NaN or inf"),
    ([], "empty"),
    (None, "required"),
])
def test_bad_calibration_data(data, match):
    with pytest.raises(ValueError, match=match):
        sk.quantize(nn.Sequential(nn.Linear(4, 2)), "int8", calib_data=data)


def test_model_with_nothing_to_quantize_names_it():
    with pytest.raises(ValueError, match="no layer of Sequential could be quantized"):
        sk.quantize(nn.Sequential(nn.ReLU()), "int8", calib_data=[torch.randn(2, 3)])


def test_unsupported_layers_are_kept_in_float_and_reported():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                      nn.Linear(2 * 16, 2)).eval()
    q = sk.quantize(m, "int8", calib_data=[torch.randn(2, 1, 4, 4)])
    assert "0" in q.slimkit_plan.skipped and "padding" in q.slimkit_plan.skipped["0"]
    assert isinstance(dict(q.named_modules())["2"], QuantLinear)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_is_quantized(padding):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=padding), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=padding)).eval()
    x = torch.rand(4, 1, 8, 8)
    q = sk.quantize(m, "int8", calib_data=[x])
    assert q.slimkit_plan.quantized_layers == ["0", "2"] and not q.slimkit_plan.skipped
    conv = q.get_submodule("0")
    assert isinstance(conv, nn.Conv2d) and conv.padding == padding and conv.stride == (1, 1)
    ref = m(x)
    assert q(x).shape == ref.shape
    assert float((q(x) - ref).norm() / ref.norm()) < 0.05


def test_conv1d_and_per_tensor_weights():
    m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    x = torch.randn(8, 2, 8)
    q = sk.quantize(m, {"per_channel": False}, calib_data=[x])
    conv = [mod for mod in q.modules() if isinstance(mod, QuantConv)][0]
    assert torch.unique(conv.weight_scale).numel() == 1
    assert (q(x) - m(x)).abs().max() < 0.2


def test_bounded_activations_are_not_clipped_by_the_clipping_calibrators(digits):
    """The KL search clipped the trained MobileNetV2's ReLU6 outputs at about 1.6 (the saturated
    values at 6 are a spike it trades away), taking its SQNR from 35 to 10 dB; after a bounded
    clamp every calibrator now keeps min-max."""
    import torch.nn.functional as F
    from torch import fx, nn

    from slimkit.quant.placement import bounded_nodes
    from slimkit.zoo import trained

    class Clamps(nn.Module):
        def __init__(self):
            super().__init__()
            self.r6, self.ht, self.r = nn.ReLU6(), nn.Hardtanh(-2, 2), nn.ReLU()

        def forward(self, x):
            return self.r6(x) + self.ht(x) + self.r(x) + F.relu6(x) + x.clamp(0, 1) + torch.clamp(x, min=0.0)

    gm = fx.symbolic_trace(Clamps())
    assert bounded_nodes(gm) == {"r6", "ht", "relu6", "clamp"}  # the ReLU and the one-sided clamp are not
    m = trained("mobilenet_v2")
    calib = batches(digits.train_x[:64], None, 32)
    x = digits.test_x[:200]
    with torch.no_grad():
        ref = m(x)

    def sqnr(q):
        with torch.no_grad():
            return float(-10 * torch.log10(((q(x) - ref) ** 2).sum() / (ref**2).sum()))

    plain = [sk.quant.Weights(), sk.quant.Activations()]  # the calibrators alone, no bias correction
    minmax = sqnr(sk.quantize(m, plain, calib_data=calib))
    assert sqnr(sk.quantize(m, [plain[0], sk.quant.Activations(calibrator="entropy")], calib_data=calib)) > minmax - 3.0


def test_keep_float_keeps_the_most_sensitive_layers_by_name(trained_resnet, digits, tmp_path):
    from slimkit.core.batch import output_error
    from slimkit.zoo import digits_model

    calib = batches(digits.train_x[:64], None, 32)
    scheme = [sk.quant.Weights(), sk.quant.Activations()]
    plain = sk.quantize(trained_resnet, scheme, calib_data=calib)
    q = sk.quantize(trained_resnet, [*scheme, sk.quant.KeepFloat(layers=2)], calib_data=calib)
    report = q.slimkit_plan.passes["keep_float"]
    alone = report["sqnr_db_alone"]
    ranked = sorted(alone, key=alone.get)  # the lowest SQNRs first
    assert len(alone) == 21 and len(report["kept"]) == 2 and report["kept"][0] == ranked[0]
    # tried in that order, each kept only where it brought the outputs closer: the digits ResNet's stem,
    # second most sensitive alone, moves them further away beside the head
    tried = list(report["sqnr_db_tried"])
    assert tried == ranked[: len(tried)] and set(report["kept"]) < set(tried)
    assert report["sqnr_db"] == max(report["sqnr_db_tried"].values())
    for name in report["kept"]:
        assert isinstance(q.get_submodule(name), nn.Conv2d | nn.Linear)  # left in float
    assert set(report["kept"]) <= set(q.slimkit_plan.config.weights.exclude) and q.slimkit_plan.config.find(sk.quant.KeepFloat) is None
    x = digits.test_x[:128]
    with torch.no_grad():
        ref = [[trained_resnet(x)]]
        assert output_error(q, [x], ref) < output_error(plain, [x], ref)
    sk.save(q, tmp_path / "q")  # the choice is in the plan: loading does not scan again
    back = sk.load(tmp_path / "q", digits_model("resnet18"))
    assert torch.equal(back(x), q(x))
    sk.export_onnx(q, tmp_path / "q.onnx", x[:8])
    with pytest.raises(ValueError, match="keep_float is a number of layers"):
        sk.QuantConfig(keep_float=-1)
    with pytest.raises(ValueError, match="keep_float chooses"):
        sk.QuantConfig(keep_float=1, mixed_bits=(4, 8), target_bits=6.0)
    with pytest.raises(ValueError, match="would keep every quantizable layer"):
        sk.quantize(trained_resnet, {"keep_float": 21}, calib_data=calib)
    with pytest.raises(ValueError, match="keep_float scan"):
        sk.quantize(trained_resnet, {"activations": "dynamic", "keep_float": 1})


def test_depthwise_convs_keep_8_bit_weights_under_reduce_range(tmp_path):
    """``reduce_range`` keeps weights to 7 bits where the uint8 x int8 kernels could saturate; a
    depthwise conv runs on ONNX Runtime's depthwise kernel, which widens to 16 bits, so it keeps
    all 8 (its 9 weights a channel are where precision is scarcest)."""
    from slimkit.quant.config import cannot_saturate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    assert [cannot_saturate(m) for m in (model[0], model[2], model[4], model[6])] == [False, True, False, False]
    x = torch.randn(16, 3, 6, 6)
    q = sk.quantize(model, "int8", calib_data=[x])
    widths = {n: int(q.get_submodule(n).weight_q.abs().max()) for n in ("0", "2", "4", "6")}
    assert widths == {"0": 63, "2": 127, "4": 63, "6": 63}
    rep = sk.export_onnx(q, tmp_path / "dw.onnx", x[:2])
    assert rep.parity.ok and rep.lint.ok


class _UserNet(nn.Module):
    """A user's CNN with its own attribute and method beside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.labels = ["a", "b", "c"]
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def embed(self, x):
        return self.features(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.embed(x))

    def predict(self, x):
        return [self.labels[i] for i in self(x).argmax(1).tolist()]


def test_static_int8_keeps_the_users_class_methods_and_containers(tmp_path):
    """The traced, BatchNorm-folded graph with its quantizers is run by the user's own model: its
    class, attributes, methods and containers stay, each quantized layer at its own path."""
    torch.manual_seed(0)
    model = _UserNet().eval()
    for bn in (model.features[1], model.features[4]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(16, 1, 8, 8)
    q = sk.quantize(model, "int8", calib_data=[x, torch.randn(16, 1, 8, 8)])
    assert isinstance(q, _UserNet) and type(q).__name__ == "Slim_UserNet" and q.labels == ["a", "b", "c"]
    assert isinstance(q.features, nn.Sequential) and isinstance(q.features[0], (nn.Conv2d, QuantConv))
    assert isinstance(q.features[0], QuantConv) and isinstance(q.head, QuantLinear)
    assert isinstance(q.features[1], nn.Identity)  # folded into features.0: its scale and shift live there
    assert any(isinstance(m, ActQuant) for m in q.modules())
    assert isinstance(model.features[1], nn.BatchNorm2d) and type(model) is _UserNet  # the caller's model as it was
    ref = model(x)
    assert float((q(x) - ref).norm() / ref.norm()) < 0.05
    assert sum(a == b for a, b in zip(q.predict(x), model.predict(x), strict=True)) >= 14  # its own method
    emb = q.embed(x)  # a method of the user's own: runs the quantized layers (without the graph's quantizers)
    assert float((emb - model.embed(x)).norm() / model.embed(x).norm()) < 0.05
    sk.save(q, tmp_path / "q")
    loaded = sk.load(tmp_path / "q", _UserNet().eval())
    assert isinstance(loaded, _UserNet) and torch.equal(loaded(x), q(x))
    assert sk.export_onnx(q, tmp_path / "q.onnx", x).parity.ok
