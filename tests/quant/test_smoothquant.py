"""Dynamic INT8 for transformer-style layers: SmoothQuant, full-range 8-bit weights that do not
saturate, 4-bit embedding tables, the swapping keep_float scan and transformer bad input."""

import copy
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import slimkit as sk
from slimkit.data import batches
from slimkit.quant.modules import QuantLinear
from slimkit.quant.smoothquant import smooth_search, smoothing_scales

SMOOTH_ONLY = sk.quant.PRESETS["int8-smoothquant"].without(sk.quant.OutlierChannels)  # the preset also splits outliers


def _sqnr(ref_model, q, x):
    with torch.no_grad():
        ref, out = ref_model(x), q(x)
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


@pytest.fixture(scope="module")
def outlier_mlp(trained_mlp):
    """The trained digits MLP with the function unchanged but 8 of layer 3's input channels 30x
    larger (layer 1's rows scaled up, layer 3's columns down): the activation outliers real
    transformers have, on a trained model."""
    m = copy.deepcopy(trained_mlp).eval()
    with torch.no_grad():
        m[1].weight[:8] *= 30.0
        m[1].bias[:8] *= 30.0
        m[3].weight[:, :8] /= 30.0
    return m


def test_smoothing_preserves_the_float_function_and_the_guard_never_picks_worse():
    torch.manual_seed(0)
    x = torch.randn(256, 32) * torch.where(torch.arange(32) < 3, 25.0, 1.0)
    w = torch.randn(16, 32)
    s = smoothing_scales(x.abs().amax(0), w, 0.5)
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-4, atol=1e-3)
    expected = x.abs().amax(0).pow(0.5) / w.abs().amax(0).pow(0.5)
    torch.testing.assert_close(s, expected)
    plain = torch.randn(256, 32)  # no outliers: smoothing may not help, and then it is not used
    scale, alpha, errors = smooth_search(w, [plain], plain.abs().amax(0), (0.5, 0.9), bits=8)
    assert errors[alpha] == min(errors.values()) and (scale is None) == (alpha is None)
    with pytest.raises(ValueError, match="alpha must be in"):
        smoothing_scales(x.abs().amax(0), w, 1.5)
    with pytest.raises(ValueError, match="weight has 16 inputs"):
        smoothing_scales(torch.ones(32), w.T, 0.5)


def test_smoothquant_recovers_the_outlier_channels_of_a_trained_mlp(outlier_mlp, digits, tmp_path):
    calib = batches(digits.train_x[:512], None, 128)
    x = digits.test_x
    dyn = sk.quantize(outlier_mlp, "int8-dynamic")
    smooth = sk.quantize(outlier_mlp, SMOOTH_ONLY, calib_data=calib)
    report = smooth.slimkit_plan.passes["smoothquant"]
    assert report["3"]["smoothed"] and report["3"]["sqnr_db_with"] > report["3"]["sqnr_db_without"] + 6
    assert _sqnr(outlier_mlp, smooth, x) > _sqnr(outlier_mlp, dyn, x) + 3
    assert float(smooth.get_submodule("3").input_scale[:8].min()) > float(smooth.get_submodule("3").input_scale[8:].max())
    exported = sk.export_onnx(smooth, tmp_path / "sq.onnx", example_inputs=x[:16])
    assert exported.parity.rel_l2 < 1e-3 and not exported.lint.float_ops.get("MatMul")
    sk.save(smooth, tmp_path / "sq")
    torch.testing.assert_close(sk.load(tmp_path / "sq", outlier_mlp)(x[:32]), smooth(x[:32]))
    assert outlier_mlp[3].weight.abs().max() < 10  # the caller's model is untouched


class _SharedInput(nn.Module):
    """Three projections of one normalized input, as a transformer's query, key and value."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q, self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(64, 32)
        with torch.no_grad():
            self.norm.weight[:4] = 20.0  # LayerNorm gains with outliers, as in BERT

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) + self.k(h) * self.v(h)


def test_layers_reading_one_input_share_one_scale_and_one_quantization(tmp_path):
    torch.manual_seed(0)
    m = _SharedInput().eval()
    calib = [torch.randn(8, 64) for _ in range(4)]
    for cfg in (SMOOTH_ONLY, "int8-smoothquant"):  # smoothing alone, and with the LayerNorm's outlier channels
        q = sk.quantize(m, cfg, calib_data=calib)
        report = q.slimkit_plan.passes["smoothquant"]
        assert report["q"]["shares_input_with"] == ["k", "v"]
        torch.testing.assert_close(q.q.input_multiplier, q.v.input_multiplier, rtol=0, atol=0)
        split = q.slimkit_plan.passes.get("outlier_channels", {})
        assert report["q"]["smoothed"] or split["q"] == split["k"] == split["v"] == [0, 1, 2, 3]
        path = sk.export_onnx(q, tmp_path / "qkv.onnx", example_inputs=calib[0]).path
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
        quantizations = ops.count("DynamicQuantizeLinear") + ops.count("DynamicQuantizeMatMul")
        assert quantizations == 1, ops  # the input is divided and quantized once for the three


def test_full_range_8bit_weights_do_not_saturate_in_onnx_runtime(tmp_path):
    """u8 x s8 kernels without VNNI add pairs of products in int16: 255 * 127 * 2 overflows. The
    8-bit weights go as uint8 with zero-point 128, which those CPUs multiply exactly."""
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight.fill_(0.5)
        lin.weight[1] = -0.5
        lin.bias.zero_()
    q = QuantLinear(lin, bits=8, dynamic=True)
    assert int(q.weight_q.abs().max()) == 127
    x = torch.rand(8, 64) * 0.999 + 0.001  # every input near the top of its uint8 range
    report = sk.export_onnx(q, tmp_path / "full_range.onnx", example_inputs=x)
    assert report.parity.rel_l2 < 1e-5
    s = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, (x @ lin.weight.T).detach().numpy(), rtol=0.02)


class _TinyLM(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.emb, self.body = nn.Embedding(300, width), nn.Linear(width, 8)

    def forward(self, ids):
        return self.body(self.emb(ids))


def test_4bit_embedding_tables_export_as_plain_onnx_and_reload(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (4, 12))
    m = _TinyLM().eval()
    q8 = sk.quantize(m, "int8-dynamic")
    q4 = sk.quantize(m, sk.quant.PRESETS["int8-dynamic"].with_pass(sk.quant.Embeddings(bits=4)))
    assert q4.emb.table.dtype == torch.uint8 and q4.emb.table.shape == (300, 32) and q4.emb.scales.shape == (300, 2)
    with torch.no_grad():
        rel = float((q4.emb(ids) - m.emb(ids)).norm() / m.emb(ids).norm())
    assert 0.01 < rel < 0.12  # 4 bits in groups of 32: coarser than int8 rows, still close
    r8 = sk.export_onnx(q8, tmp_path / "e8.onnx", example_inputs={"ids": ids})
    r4 = sk.export_onnx(q4, tmp_path / "e4.onnx", example_inputs={"ids": ids})  # a dict: sequence axis dynamic
    assert r4.parity.rel_l2 < 1e-4 and r4.size_bytes < r8.size_bytes
    longer = torch.randint(0, 300, (2, 40))  # a longer sequence than exported with: dynamic axes
    s = ort.InferenceSession(str(r4.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s.run(None, {"ids": longer.numpy()})[0],
                               q4(longer).detach().numpy(), rtol=1e-3, atol=1e-3)
    sk.save(q4, tmp_path / "lm4")
    torch.testing.assert_close(sk.load(tmp_path / "lm4", m)(ids), q4(ids))
    m48 = _TinyLM(width=48).eval()
    odd = sk.quantize(m48, sk.quant.PRESETS["int8-dynamic"].with_pass(sk.quant.Embeddings(bits=4)))
    # a width the 4-bit groups of 32 do not divide: int8 rows instead, and the plan says why
    assert odd.emb.bits == 8 and "emb" in odd.slimkit_plan.quantized_layers and "emb" not in odd.slimkit_plan.skipped
    assert "not a multiple of the 4-bit groups of 32" in odd.slimkit_plan.passes["embeddings"]["emb"]
    with torch.no_grad():
        e48 = m48.emb(ids)
    assert float((odd.emb(ids) - e48).norm() / e48.norm()) < 0.01  # int8 rows: close
    with pytest.raises(ValueError, match="embedding_bits must be one of"):
        sk.QuantConfig(embedding_bits=6)
    with pytest.raises(ValueError, match="it needs quantize_embeddings=True"):
        sk.QuantConfig(activations="dynamic", embedding_bits=4)


def test_the_swapping_keep_float_scan_measures_what_requantizing_measures(outlier_mlp, digits):
    from slimkit.quant.mixed_precision import sqnr_db

    calib = batches(digits.train_x[:256], None, 64)
    cfg = sk.quant.PRESETS["int8-smoothquant"].with_pass(sk.quant.KeepFloat(layers=1))
    q = sk.quantize(outlier_mlp, cfg, calib_data=calib)
    scan = q.slimkit_plan.passes["keep_float"]["sqnr_db_alone"]
    assert set(scan) == {"1", "3", "5"}
    from slimkit.core.batch import output_error

    with torch.no_grad():
        reference = [[outlier_mlp(b)] for b in calib]
    for name in scan:  # the slow way: quantize with every other layer excluded
        alone = sk.quantize(outlier_mlp, sk.quant.PRESETS["int8-smoothquant"].with_weights(exclude=tuple(n for n in scan if n != name)),
                            calib_data=calib)
        with torch.no_grad():
            assert scan[name] == pytest.approx(sqnr_db(output_error(alone, calib, reference)), abs=0.05)
    assert q.slimkit_plan.passes["keep_float"]["kept"] == [max(scan, key=lambda n: -scan[n])]


def test_smoothquant_bad_input(outlier_mlp, digits):
    with pytest.raises(ValueError, match="smooth_alpha .* works with activations='dynamic'"):
        sk.QuantConfig(smooth_alpha=0.5)
    with pytest.raises(ValueError, match=r"smooth_alpha must be in \[0.0, 1.0\]"):
        sk.QuantConfig(activations="dynamic", smooth_alpha=1.5)
    with pytest.raises(ValueError, match="SmoothQuant, OutlierChannels need calib_data"):
        sk.quantize(outlier_mlp, "int8-smoothquant")
    nan = [digits.train_x[:8].clone()]
    nan[0][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="batch 0 holds NaN or inf"):
        sk.quantize(outlier_mlp, "int8-smoothquant", calib_data=nan)
    with pytest.raises(ValueError, match="calib_data is empty|no batches"):
        sk.quantize(outlier_mlp, "int8-smoothquant", calib_data=[])


def test_tokenizer_batches_without_attention_mask_are_named(caplog):
    """A tokenizer batch without ``attention_mask`` lets padding into the statistics: said, not silent."""
    torch.manual_seed(0)

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(50, 32), nn.Linear(32, 32)

        def forward(self, input_ids, attention_mask=None):
            return self.proj(self.emb(input_ids))

    m = Tok().eval()
    ids = torch.randint(1, 50, (4, 10))
    with caplog.at_level(logging.WARNING, logger="slimkit"):
        q = sk.quantize(m, "int8-smoothquant", calib_data=[{"input_ids": ids}])
    assert "calibration batch 0 has input_ids but no attention_mask" in caplog.text
    assert q.slimkit_plan.quantized_layers == ["proj", "emb"]


def test_outlier_channels_multiply_in_float_beside_the_int8_product(outlier_mlp, digits, tmp_path):
    """LLM.int8()'s decomposition: the 8 outlier channels leave the INT8 grid and run in float."""
    calib = batches(digits.train_x[:512], None, 128)
    x = digits.test_x
    before = {k: v.clone() for k, v in outlier_mlp.state_dict().items()}
    dyn = sk.quantize(outlier_mlp, "int8-dynamic")
    split = sk.quantize(outlier_mlp, sk.quant.PRESETS["int8-dynamic"].with_pass(sk.quant.OutlierChannels(threshold=8)), calib_data=calib)
    chans = split.slimkit_plan.passes["outlier_channels"]
    assert list(chans) == ["3"] and set(chans["3"]) <= set(range(8)) and len(chans["3"]) >= 6, chans
    layer, idx = split.get_submodule("3"), chans["3"]
    assert bool((layer.weight_q[:, idx] == 0).all()) and bool((layer.input_multiplier[idx] == 0).all())
    assert bool((layer.input_multiplier[8:] == 1).all())
    torch.testing.assert_close(layer.outlier_weight, outlier_mlp[3].weight[:, idx])
    assert _sqnr(outlier_mlp, split, x) > _sqnr(outlier_mlp, dyn, x) + 6
    assert split.slimkit_plan.passes["outlier_candidates"]["3"]["error_down"] > 10  # without smoothing they pay
    # With smoothing, the same channels barely lower the INT8 product's error (smoothing already
    # shrank their range), so they do not pay for a float branch unless outlier_min_gain says so.
    smooth_cfg = sk.quant.PRESETS["int8-smoothquant"].with_pass(sk.quant.OutlierChannels(threshold=8))
    with_smoothing = sk.quantize(outlier_mlp, smooth_cfg, calib_data=calib)
    candidate = with_smoothing.slimkit_plan.passes["outlier_candidates"]["3"]
    assert candidate["channels"] == chans["3"] and 1.0 < candidate["error_down"] < 3.0, candidate
    assert with_smoothing.slimkit_plan.passes["outlier_channels"] == {}
    assert with_smoothing.get_submodule("3").outliers.numel() == 0
    assert _sqnr(outlier_mlp, with_smoothing, x) > _sqnr(outlier_mlp, dyn, x) + 6
    forced = sk.quantize(outlier_mlp, smooth_cfg.with_pass(sk.quant.OutlierChannels(threshold=8, min_gain=1.0)), calib_data=calib)
    assert forced.slimkit_plan.passes["outlier_channels"] == chans
    assert _sqnr(outlier_mlp, forced, x) > _sqnr(outlier_mlp, dyn, x) + 6
    exported = sk.export_onnx(split, tmp_path / "split.onnx", example_inputs=x[:16])
    assert exported.parity.rel_l2 < 1e-3
    ops = [n.op_type for n in onnx.load(exported.path).graph.node]
    assert ops.count("MatMulInteger") == 3 and ops.count("MatMul") == 1 and "Gather" in ops, ops
    sk.save(split, tmp_path / "split")
    torch.testing.assert_close(sk.load(tmp_path / "split", outlier_mlp)(x[:32]), split(x[:32]))
    for k, v in outlier_mlp.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_quant_linear_state_dicts_saved_before_outlier_channels_still_load(outlier_mlp, digits):
    calib = batches(digits.train_x[:512], None, 128)
    smooth = sk.quantize(outlier_mlp, SMOOTH_ONLY, calib_data=calib).get_submodule("3")
    old = {k: v for k, v in smooth.state_dict().items() if k not in ("input_multiplier", "outliers", "outlier_weight")}
    old["input_scale"] = smooth.input_scale.clone()  # the earlier format: the scale itself, no outlier buffers
    fresh = QuantLinear(outlier_mlp[3], 7, dynamic=True)
    fresh.load_state_dict(old)
    x = torch.relu(outlier_mlp[1](digits.test_x[:32].flatten(1)))
    torch.testing.assert_close(fresh(x), smooth(x))
    torch.testing.assert_close(fresh.input_scale, smooth.input_scale)


def test_outlier_channels_bad_input(outlier_mlp, digits):
    from slimkit.quant.llm_int8 import outlier_channels

    with pytest.raises(ValueError, match="outlier_threshold .* works with activations='dynamic'"):
        sk.QuantConfig(outlier_threshold=8)
    with pytest.raises(ValueError, match="outlier_threshold must be in"):
        sk.QuantConfig(activations="dynamic", outlier_threshold=1.0)
    with pytest.raises(ValueError, match="outlier_min_gain must be in"):
        sk.QuantConfig(activations="dynamic", outlier_threshold=8.0, outlier_min_gain=0.5)
    with pytest.raises(ValueError, match="outlier_min_gain .* needs outlier_threshold"):
        sk.QuantConfig(activations="dynamic", outlier_min_gain=1.0)
    with pytest.raises(ValueError, match="OutlierChannels need calib_data"):
        sk.quantize(outlier_mlp, sk.quant.PRESETS["int8-dynamic"].with_pass(sk.quant.OutlierChannels(threshold=8)))
    with pytest.raises(ValueError, match="NaN or inf"):
        outlier_channels(torch.tensor([1.0, float("nan"), 3.0]), 4.0)
    with pytest.raises(ValueError, match="distinct indices below 4"):
        QuantLinear(nn.Linear(4, 2), dynamic=True, outliers=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="need dynamic activations"):
        QuantLinear(nn.Linear(4, 2), outliers=torch.tensor([1]))
    assert outlier_channels(torch.zeros(6), 4.0).numel() == 0  # a layer that saw only zeros has none
